"""Compile report: the real train step, lowered and compiled for a device set it never runs on.

    python -m coca_jax.aot --config=configs/coca.py --topology=v4:8x16x16
    python -m coca_jax.aot --config=configs/tiny.py --cpu_devices=8

`--topology=GEN:AxBxC` compiles for a TPU slice from this machine, with no TPU: libtpu
(`pip install -e ".[tpu]"`) describes the slice's chips and XLA compiles for them.
Names count chips: v4:8x16x16 is 2,048 v4 chips (the paper's pod; Cloud TPU calls it
v4-4096, counting TensorCores); v4 and v5p chips are one "megacore" device each, as on a TPU VM.
`--cpu_devices=N` compiles for N forced host CPU devices instead (no libtpu needed).

Prints per-device memory (arguments, outputs, temporaries, generated code), XLA's FLOPs
and bytes accessed, the model FLOPs by formula (coca_jax/flops.py), the memory of one
device and whether the step fits in it, then one JSON line with the same numbers.
The state, mesh, shardings and step are the trainer's own (coca_jax.state, .step,
.sharding) and the batch has the shapes of config.data.source's batches (`batch_spec`:
image-text, VQA or video, each its own step), so a step that compiles and fits here
compiles and fits in `train`.
"""

import json
import math
import os
import re
import sys
import time

import jax
import numpy as np
from absl import app, flags
from jax._src import xla_bridge
from ml_collections import config_flags

from coca_jax import config as config_lib
from coca_jax import console, flops, predict, sharding
from coca_jax import params as params_lib
from coca_jax import state as state_lib
from coca_jax import step as step_lib
from coca_jax.data import loader
from coca_jax.sharding import MeshError

GIB = 2**30

# HBM per chip in GiB (vendors' data sheets), matched as substrings of `device_kind`,
# most specific first. A device is a chip, or a TensorCore where a chip shows several.
HBM_GIB_PER_CHIP = (
  ("TPU v6 lite", 32),  # v6e (Trillium)
  ("TPU v5 lite", 16),  # v5e
  ("TPU v5p", 95),
  ("TPU v5", 95),  # v5p reports "TPU v5"
  ("TPU v4", 32),
  ("GH200", 0),  # 96 or 144 GiB by model ("H200" is a substring of its name): --hbm_gib
  ("H200", 141),
  ("H100", 80),
  ("A100-SXM4-80GB", 80),
  ("A100 80GB", 80),
  ("A100", 40),
)

# libtpu's generation names -> extra arguments of its topology description. v4 and v5p
# chips hold two TensorCores; "megacore" shows each chip as one device, as a TPU VM does.
TPU_GENERATIONS = {
  "v4": dict(chip_config_name="megacore"),
  "v5p": dict(chip_config_name="megacore"),
  "v5e": {},
  "v6e": {},
}

# v5e and v6e slices of up to 8 chips are one host (Cloud TPU's v5litepod-1/4/8, v6e-1/4/8),
# larger ones hosts of 4 chips. libtpu's description assumes 2x2 chips per host for every
# shape: it gave 2x4 two processes, as no such slice has, and refused 1x1.
SINGLE_HOST_UP_TO_8 = ("v5e", "v6e")

MEMORY_FIELDS = {
  "arguments": "argument_size_in_bytes",
  "outputs": "output_size_in_bytes",
  "aliased": "alias_size_in_bytes",  # outputs written into donated arguments
  "temps": "temp_size_in_bytes",
  "generated_code": "generated_code_size_in_bytes",
}


class TopologyError(ValueError):
  """A --topology that cannot be compiled for (bad name, or libtpu missing)."""


def topology_devices(name: str) -> list:
  """The compile-only devices of TPU slice `name` ("v4:8x8x16"), described by libtpu."""
  match = re.fullmatch(r"(v\w+):(\d+(?:x\d+){1,2})", name)
  if not match:
    raise TopologyError(
      f"--topology={name!r} is not GENERATION:AxB[xC] (e.g. v4:8x8x16, v5e:16x16)"
    )
  generation = match.group(1)
  if generation not in TPU_GENERATIONS:
    raise TopologyError(
      f"--topology={name!r}: unknown TPU generation {generation!r}; "
      f"known: {', '.join(TPU_GENERATIONS)}"
    )
  if xla_bridge.get_tpu_library_path() is None:
    raise TopologyError(
      f"--topology={name!r} needs libtpu to describe the slice, and it is not installed: "
      'pip install -e ".[tpu]" (or pass --cpu_devices=N to compile for host CPU devices)'
    )
  from jax.experimental import topologies

  options = dict(TPU_GENERATIONS[generation])
  shape = [int(n) for n in match.group(2).split("x")]
  if generation in SINGLE_HOST_UP_TO_8 and math.prod(shape) <= 8:
    options["chips_per_host_bounds"] = (*shape, 1)[:3]

  # libtpu takes an exclusive lock (/tmp/libtpu_lockfile) for the chips it drives; a
  # description for compiling drives none, so a second report, or a report beside another
  # process with libtpu loaded, may share it (libtpu's own switch; tests set it too).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    with console.libtpu_quiet():  # its failed TPU lookup on this CPU host is expected
      description = topologies.get_topology_desc(name, "tpu", **options)
    return list(description.devices)
  except Exception as e:  # libtpu's own words on a shape it does not know
    raise TopologyError(f"--topology={name!r}: libtpu cannot describe this slice: {e}") from e


def use_cpu_devices(count: int) -> list:
  """`count` host CPU devices; must run before JAX starts its backends, or find them so."""
  if not xla_bridge.backends_are_initialized():
    # Takes precedence over any --xla_force_host_platform_device_count in XLA_FLAGS.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
  devices = jax.devices()
  if len(devices) != count or devices[0].platform != "cpu":
    raise ValueError(
      f"--cpu_devices={count}, but JAX already started with {len(devices)} "
      f"{devices[0].platform} device(s)"
    )
  return devices


def devices_per_chip(devices) -> int:
  """Devices that share one chip (TPU devices know their chip's coordinates)."""
  coords = getattr(devices[0], "coords", None)
  if coords is None:
    return 1
  return sum(1 for d in devices if getattr(d, "coords", None) == coords)


def gpu_memory_fraction() -> float:
  """The share of a GPU's memory JAX's allocator takes: XLA_CLIENT_MEM_FRACTION (or the
  older XLA_PYTHON_CLIENT_MEM_FRACTION), else JAX's default 0.75."""
  for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
    if os.environ.get(name):
      return float(os.environ[name])
  return 0.75


def memory_per_device(devices, hbm_gib_override: float = 0.0) -> tuple[int | None, str]:
  """(bytes of memory one device may use, where the number comes from). On a GPU, the
  share of its HBM that JAX's allocator takes (`gpu_memory_fraction`): a step that fits
  the whole HBM but not that share runs out of memory under JAX's default settings."""
  kind = devices[0].device_kind
  gpu = devices[0].platform == "gpu"
  share = gpu_memory_fraction() if gpu else 1.0
  allocator = f"{share:.0%} of " if gpu else ""
  if hbm_gib_override > 0:
    usable = int(hbm_gib_override * GIB * share) // devices_per_chip(devices)
    return usable, f"{allocator}--hbm_gib={hbm_gib_override:g}"
  for name, gib in HBM_GIB_PER_CHIP:
    if name not in kind:
      continue
    if not gib:
      return None, f"{kind}: HBM size differs by model, pass --hbm_gib"
    usable = int(gib * GIB * share) // devices_per_chip(devices)
    return usable, f"{kind}: {allocator}{gib} GiB HBM per chip"
  if devices[0].platform == "cpu":
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // len(
      devices
    ), f"host RAM {host / GIB:.0f} GiB shared by {len(devices)} CPU devices"
  return None, f"{kind}: memory unknown, pass --hbm_gib"


def batch_spec(config) -> dict:
  """ShapeDtypeStructs (unsharded) of one global training batch of config.data.source, as
  its loader yields it (coca_jax/data/loader.py; B global batch, S image size, T text
  length, A answers, F frames):

    "mixture", "synthetic": {"image" [B,S,S,3] f32, "text" {"ids","labels","mask" [B,T] i32}}
    "vqa":   the same, the question as "text", + "answer_scores" [B,A] f32 (data/vqa.py)
    "video": {"video" [B,F,S,S,3] f32, "label" [B] i32} (data/video.py)

  S is config.data.image_size (config.model.vision.image_size for "synthetic"); the train
  step compiles the video step for a batch with "video" (coca_jax/step.py).
  """
  data = config.data
  if data.source not in loader.SOURCES:
    raise ValueError(f"config.data.source={data.source!r}; expected one of {loader.SOURCES}")
  b = data.global_batch_size
  size = config.model.vision.image_size if data.source == "synthetic" else data.image_size
  if data.source == "video":
    return dict(
      video=jax.ShapeDtypeStruct((b, data.video.frames, size, size, 3), np.float32),
      label=jax.ShapeDtypeStruct((b,), np.int32),
    )
  text = jax.ShapeDtypeStruct((b, data.max_text_len), np.int32)
  spec = dict(
    image=jax.ShapeDtypeStruct((b, size, size, 3), np.float32),
    text=dict(ids=text, labels=text, mask=text),
  )
  if data.source == "vqa":
    spec["answer_scores"] = jax.ShapeDtypeStruct((b, config.model.vqa.num_answers), np.float32)
  return spec


def abstract_batch(config, mesh) -> dict:
  """`batch_spec`, sharded as the trainer shards a batch (over its leading axis)."""
  spec = batch_spec(config)
  shardings = sharding.named(mesh, sharding.batch_specs(spec, config.sharding_rules))
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), spec, shardings
  )


def check_host_batches(mesh, rules, global_batch: int) -> tuple[int | None, str | None]:
  """(rows per host batch, None), or (None, why not) when the processes cannot feed it.

  Splits the batch for every process of the mesh's devices (each knows its process
  index, also on a compile-only topology) exactly as the trainer's data entry does on
  that process; `sharding.data_shards` raises, naming the process and its rows, unless
  the shards are disjoint, equal in size and cover the global batch.
  """
  try:
    shards = sharding.data_shards(mesh, rules, global_batch)
  except ValueError as e:
    return None, str(e)
  return len(next(iter(shards.values())).rows), None


def shared_shards(processes: int, shards: int) -> str:
  """A note when fewer data shards than processes: each of `shards` is read by
  processes / shards hosts (their devices all lie in one batch shard group: e.g. a data
  axis inside each host and a tensor axis across them), which multiplies the input work."""
  if shards >= processes:
    return ""
  return (
    f" ({shards} distinct shard(s): {processes // shards} hosts read each, the same rows; "
    "a mesh whose batch axes span the hosts splits the input work)"
  )


def report(config, devices, *, topology: str | None = None, hbm_gib: float = 0.0) -> dict:
  """Compiles config's train step for `devices` (not run) and returns the compile report."""
  run = state_lib.setup(config, devices)
  mesh, layout = run.mesh, run.layout
  step_lib.check_batch_size(config, mesh)
  # The rows per evaluation call: config.eval.batch_size rounded up to the batch shards.
  eval_batch_size = predict.mesh_batch_size(config.eval.batch_size, mesh, config.sharding_rules)
  shards = sharding.batch_ways(mesh, config.sharding_rules)
  accum = config.train.grad_accum_steps
  global_batch = config.data.global_batch_size
  local_batch, host_batches_error = check_host_batches(mesh, config.sharding_rules, global_batch)
  train_step = step_lib.make_train_step(config, run)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = train_step.jitted.lower(layout.abstract, abstract_batch(config, mesh))
    lowered_s = time.perf_counter() - start
    compiled = lowered.compile()
  compile_s = time.perf_counter() - start - lowered_s

  stats = compiled.memory_analysis()
  memory = {key: int(getattr(stats, field, 0) or 0) for key, field in MEMORY_FIELDS.items()}
  # Live at once: arguments, outputs not written into donated arguments, temporaries, code.
  memory["total"] = (
    memory["arguments"]
    + memory["outputs"]
    - memory["aliased"]
    + memory["temps"]
    + memory["generated_code"]
  )
  costs = compiled.cost_analysis()
  costs = (costs[0] if costs else {}) if isinstance(costs, (list, tuple)) else (costs or {})
  hbm_bytes, hbm_source = memory_per_device(devices, hbm_gib)
  flops_per_example = flops.train_flops_per_example(config)
  return dict(
    topology=topology or f"{devices[0].platform}:{len(devices)}",
    device_kind=devices[0].device_kind,
    devices=len(devices),
    chips=len(devices) // devices_per_chip(devices),
    mesh=dict(mesh.shape),
    mesh_reason=run.mesh_reason,
    params=params_lib.total(layout.abstract["params"]),
    dtype=config.model.dtype,
    remat_policy=config.model.remat_policy,
    global_batch=global_batch,
    grad_accum_steps=accum,
    micro_batch_per_shard=global_batch // (shards * accum),
    processes=len({d.process_index for d in devices}),
    local_batch=local_batch,
    host_batches_ok=host_batches_error is None,
    host_batches_error=host_batches_error,
    eval_batch_size=eval_batch_size,
    memory_per_device=memory,
    xla_flops_per_device=float(costs.get("flops", -1.0)),
    xla_bytes_accessed_per_device=float(costs.get("bytes accessed", -1.0)),
    model_flops_per_example=flops_per_example,
    model_flops_per_step=flops_per_example * global_batch,
    hbm_bytes=hbm_bytes,
    hbm_source=hbm_source,
    fits=None if hbm_bytes is None else bool(memory["total"] <= hbm_bytes),
    lower_s=round(lowered_s, 2),
    compile_s=round(compile_s, 2),
  )


def table(rep: dict) -> str:
  """The report as aligned lines for a terminal."""

  def gib(n: int) -> str:
    return (
      f"{n / GIB:,.2f} GiB"
      if n >= GIB
      else f"{n / 2**20:,.1f} MiB"
      if n >= 2**20
      else f"{n / 2**10:,.1f} KiB"
    )

  memory = rep["memory_per_device"]
  fits = {True: "yes", False: "NO", None: "unknown"}[rep["fits"]]
  chips = f" ({rep['chips']} chips)" if rep["device_kind"].startswith("TPU") else ""
  per_step = rep["model_flops_per_step"]
  hbm = (
    rep["hbm_source"]
    if rep["hbm_bytes"] is None
    else f"{gib(rep['hbm_bytes'])} ({rep['hbm_source']})"
  )
  rows = [
    ("target", f"{rep['topology']}: {rep['devices']} x {rep['device_kind']}" + chips),
    ("mesh", ", ".join(f"{k}={v}" for k, v in rep["mesh"].items())),
    ("mesh chosen by", rep["mesh_reason"]),
    ("parameters", f"{rep['params']:,} ({rep['params'] / 1e6:,.1f}M)"),
    ("compute dtype / remat", f"{rep['dtype']} / {rep['remat_policy']}"),
    (
      "batch",
      f"{rep['global_batch']:,} global = {rep['grad_accum_steps']} accumulation step(s) of "
      f"{rep['micro_batch_per_shard']:,} per batch shard",
    ),
    (
      "host batches",
      f"{rep['processes']} process(es) x {rep['local_batch']:,} rows: ok"
      + shared_shards(rep["processes"], rep["global_batch"] // rep["local_batch"])
      if rep["host_batches_ok"]
      else f"{rep['processes']} process(es): FAILED: {rep['host_batches_error']}",
    ),
    ("eval batch (rows per call, rounded up to the batch shards)", str(rep["eval_batch_size"])),
    *((f"memory: {k}", gib(v)) for k, v in memory.items() if k != "total"),
    ("memory: total per device", gib(memory["total"])),
    ("memory available", hbm),
    ("fits", fits),
    # XLA's cost analysis counts a while loop's body once: scanned layers and gradient
    # accumulation are undercounted, so the model FLOPs below are the ones to use.
    ("XLA FLOPs per device", f"{rep['xla_flops_per_device']:.4g} (loop bodies counted once)"),
    ("XLA bytes accessed per device", f"{rep['xla_bytes_accessed_per_device']:.4g}"),
    ("model FLOPs per example", f"{rep['model_flops_per_example']:.4g}"),
    ("model FLOPs per step", f"{per_step:.4g} ({per_step / rep['devices']:.4g} per device)"),
    ("lower / compile time", f"{rep['lower_s']:.1f} s / {rep['compile_s']:.1f} s"),
  ]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def define_flags() -> None:
  """The command line; defined only when run as a program (importing registers nothing)."""
  config_lib.configs_importable()
  config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py[:switches]).", lock_config=True
  )
  flags.DEFINE_string(
    "topology",
    None,
    "TPU slice to compile for, GENERATION:AxB[xC] (e.g. v4:8x8x16, v5e:16x16); needs libtpu.",
  )
  flags.DEFINE_integer(
    "cpu_devices", None, "Compile for this many forced host CPU devices instead."
  )
  flags.DEFINE_float(
    "hbm_gib",
    0.0,
    "Memory per chip in GiB, for a device kind not in HBM_GIB_PER_CHIP (0: that table's).",
    lower_bound=0.0,
  )


def main(argv):
  console.quiet(start=False)  # jax_platforms and the CPU device count come first
  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if f.config is None:
    raise app.UsageError("--config=FILE is required (e.g. --config=configs/coca.py)")
  if (f.topology is None) == (f.cpu_devices is None):
    raise app.UsageError("pass exactly one of --topology=GEN:AxBxC or --cpu_devices=N")
  if f.topology is not None:
    # Compile-only: JAX itself runs on the host CPU; libtpu only describes the slice.
    if not xla_bridge.backends_are_initialized():
      jax.config.update("jax_platforms", "cpu")
    try:
      devices = topology_devices(f.topology)
    except TopologyError as e:
      sys.exit(f"error: {e}")
  else:
    devices = use_cpu_devices(f.cpu_devices)
  try:
    rep = report(f.config, devices, topology=f.topology, hbm_gib=f.hbm_gib)
  except MeshError as e:
    sys.exit(f"error: {e}")
  print(table(rep))
  print(json.dumps(rep))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_lib.parse_flags)
