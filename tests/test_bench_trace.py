"""bench step --trace's kernel table (coca_jax/bench/trace.py) on hand-made traces: a GPU
plane (one event per kernel on its streams) and a TPU plane ("XLA Ops" beside whole-program
lines that must not be counted)."""

import pytest
from jax.profiler import ProfileData

from coca_jax.bench import trace


def xspace(plane_name: str, lines: dict, names: dict) -> ProfileData:
  """A trace of one plane: lines {line name: [(metadata id, offset us, duration us)]}."""
  text = [f'planes {{ id: 1 name: "{plane_name}"']
  for i, (line, events) in enumerate(lines.items()):
    text.append(f'lines {{ id: {i + 1} name: "{line}" timestamp_ns: 0')
    text += [
      f"events {{ metadata_id: {m} offset_ps: {start * 10**6} duration_ps: {length * 10**6} }}"
      for m, start, length in events
    ]
    text.append("}")
  text += [
    f'event_metadata {{ key: {k} value {{ id: {k} name: "{v}" }} }}' for k, v in names.items()
  ]
  text.append("}")
  return ProfileData.from_serialized_xspace(
    ProfileData.text_proto_to_serialized_xspace("\n".join(text))
  )


def test_gpu_streams_are_summed_per_kernel_and_step():
  # 2 steps: a 300 us gemm twice and a 100 us fusion once on one stream, the fusion again
  # on another: gemm 600 us, fusion 200 us of 800 us.
  data = xspace(
    "/device:GPU:0",
    {
      "Stream #14(Compute)": [(1, 0, 300), (2, 400, 100), (1, 600, 300)],
      "Stream #15(Compute)": [(2, 0, 100)],
    },
    {1: "nvjet_gemm", 2: "loop_add_fusion"},
  )
  ops = trace.top_ops(data, steps=2)
  assert ops == [
    trace.Op("nvjet_gemm", ms_per_step=0.3, share=0.75, calls_per_step=1.0),
    trace.Op("loop_add_fusion", ms_per_step=0.1, share=0.25, calls_per_step=1.0),
  ]
  assert trace.top_ops(data, steps=2, count=1) == ops[:1]
  assert "nvjet_gemm" in trace.table(ops).splitlines()[1]


def test_tpu_counts_xla_ops_not_the_module_and_step_lines():
  data = xspace(
    "/device:TPU:0",
    {"XLA Modules": [(3, 0, 1000)], "Steps": [(4, 0, 1000)], "XLA Ops": [(1, 0, 400)]},
    {1: "convolution.1", 3: "jit_train_step", 4: "0"},
  )
  assert trace.top_ops(data, steps=1) == [trace.Op("convolution.1", 0.4, 1.0, 1.0)]


def test_a_cpu_trace_has_no_device_kernels():
  data = xspace("/host:CPU", {"python": [(1, 0, 5)]}, {1: "f"})
  assert trace.top_ops(data, steps=1) == []
  assert "no device kernels" in trace.table([])


def test_no_trace_file(tmp_path):
  assert trace.latest_trace(str(tmp_path)) is None


def test_kernel_time_by_kind():
  """Every kernel counts, by the words of its name: cuBLAS and Triton GEMMs, cuDNN's
  attention (before "fusion" or "gemm" words it may also hold), XLA's fusions."""
  names = {
    1: "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT",
    2: "gemm_fusion_dot_354",
    3: "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16",
    4: "input_add_reduce_fusion_106",
    5: "input_transpose_fusion_38",
    6: "loop_convert_multiply_fusion_35",
    7: "Memset 0",
  }
  events = [(k, 1000 * k, 100 * k) for k in names]  # kernel k takes 100 k us
  data = xspace("/device:GPU:0", {"Stream #14(Compute)": events}, names)
  assert trace.kinds(data, steps=2) == pytest.approx(
    {
      "matmul": 0.15,
      "elementwise": 0.3,
      "transpose/copy": 0.25,
      "reduction": 0.2,
      "attention": 0.15,
      "other": 0.35,
    }
  )
  assert list(trace.kinds(data, steps=2))[0] == "other"  # largest first
  assert (
    trace.kinds_line({"matmul": 3.0, "other": 1.0}) == "matmul 3.0 ms (75%), other 1.0 ms (25%)"
  )
