"""The device kernels that took longest in a jax.profiler trace (`bench step --trace=DIR`).

Reads the newest `*.xplane.pb` under DIR with jax.profiler.ProfileData (no TensorBoard
needed) and sums each kernel's time over the device's op line: "XLA Ops" where the
device plane has one (TPU), else its "Stream ..." lines (GPU: one event per kernel).
The "XLA Modules" and "Steps" lines span whole programs and would count time twice.
A CPU trace has no device plane: its ops run on host threads, and none are returned.
`kinds` sums every kernel by what its name says it is (matmul, attention, reduction,
transpose or copy, elementwise): the README's "where the time goes" breakdowns.
"""

import collections
import dataclasses
from pathlib import Path

from jax.profiler import ProfileData

DEVICE_PLANE_PREFIXES = ("/device:GPU:", "/device:TPU:")


@dataclasses.dataclass(frozen=True)
class Op:
  name: str
  ms_per_step: float
  share: float  # of the device's summed kernel time
  calls_per_step: float


def latest_trace(trace_dir: str) -> Path | None:
  """The newest .xplane.pb under `trace_dir` (jax writes plugins/profile/DATE/HOST.xplane.pb)."""
  files = sorted(Path(trace_dir).glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
  return files[-1] if files else None


def op_lines(plane) -> list:
  """The lines of a device plane that hold one event per kernel (see the module doc)."""
  lines = [line for line in plane.lines if line.name == "XLA Ops"]
  return lines or [line for line in plane.lines if line.name.startswith("Stream")]


def kernel_times(data: ProfileData) -> tuple[collections.Counter, collections.Counter]:
  """(summed ns, calls) per kernel name of the first device plane; empty without one."""
  total, calls = collections.Counter(), collections.Counter()
  planes = [p for p in data.planes if p.name.startswith(DEVICE_PLANE_PREFIXES)]
  for line in op_lines(planes[0]) if planes else []:
    for event in line.events:
      total[event.name] += event.duration_ns
      calls[event.name] += 1
  return total, calls


def top_ops(data: ProfileData, steps: int, count: int = 15) -> list[Op]:
  """The `count` kernels of the first device plane with the most summed time, per step."""
  total, calls = kernel_times(data)
  busy = sum(total.values())
  return [
    Op(name, ns / 1e6 / steps, ns / busy, calls[name] / steps)
    for name, ns in total.most_common(count)
  ]


# What a kernel is, by the words its name holds (first match): cuBLAS's (nvjet, gemm,
# cutlass, xmma) and XLA's matmuls (Triton's gemm_fusion, TPUs' convolution and dot ops),
# cuDNN's fused attention, then XLA's fusion kinds.
KINDS = (
  ("attention", ("cudnn", "sdpa", "flash", "fmha")),
  ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "convolution", "dot")),
  ("transpose/copy", ("transpose", "copy", "memcpy")),
  ("reduction", ("reduce",)),
  ("elementwise", ("fusion", "loop_")),
)


def kind(name: str) -> str:
  """The KINDS entry a kernel name falls under, else "other"."""
  lower = name.lower()
  return next((k for k, words in KINDS if any(w in lower for w in words)), "other")


def kinds(data: ProfileData, steps: int) -> dict[str, float]:
  """{kind: ms per step} over every kernel of the first device plane, largest first."""
  total, _ = kernel_times(data)
  by_kind = collections.Counter()
  for name, ns in total.items():
    by_kind[kind(name)] += ns / 1e6 / steps
  return dict(by_kind.most_common())


def table(ops: list[Op]) -> str:
  if not ops:
    return "no device kernels in the trace (a CPU runs its ops on host threads)"
  lines = [f"{'ms/step':>9}  {'share':>6}  {'calls/step':>10}  kernel"]
  lines += [
    f"{op.ms_per_step:9.2f}  {op.share * 100:5.1f}%  {op.calls_per_step:10.1f}  {op.name[:100]}"
    for op in ops
  ]
  return "\n".join(lines)


def kinds_line(ms_per_kind: dict[str, float]) -> str:
  busy = sum(ms_per_kind.values())
  return ", ".join(f"{k} {ms:.1f} ms ({ms / busy:.0%})" for k, ms in ms_per_kind.items())
