"""Train-step throughput: examples/s, step time, model FLOP/s and MFU of the real train step.

    python -m coca_jax.bench step --config=configs/tiny.py [--batch=N] [--steps=N] [--warmup=N]
    python -m coca_jax.bench step --config=configs/base.py --base_width --batch=8 --steps=3
    python -m coca_jax.bench step --config=configs/base.py --config.model.remat_policy=none ...

The step is the trainer's (coca_jax.step on the config's mesh over all local devices,
state donated, config.train.frozen applied) and so is the batch format: random data in
the shapes of config.data.source's batches (coca_jax.aot.batch_spec), so that a config
times its own step: image-text pairs (coca_jax/data/synthetic.py) for "mixture" and
"synthetic", the same plus answer scores for "vqa" (the VQA head's loss), clips of
data.video.frames frames and class labels for "video" (the video head's step,
configs/demo_video.py). Batches are made and placed on the devices before the clock
starts, so input is not measured. Compilation is excluded (timed on its own), then
`--warmup` steps run before `--steps` timed steps; the host waits only after the last.
Model FLOPs come from coca_jax/flops.py (rematerialisation not counted; a video step's
are its clips'); MFU needs the device's peak, from the table there or
`--config.train.peak_flops` (the 2-core dev machine: 200-216e9 on one large float32
matmul, README "Training speed against open_clip").
`--trace=DIR` records `--steps` more steps, after the timed ones, with jax.profiler
(TensorBoard's profile plugin, or xprof, reads DIR) and prints the device kernels that
took longest and their time by kind (matmul, attention, reduction, transpose or copy,
elementwise; coca_jax/bench/trace.py; none on a CPU). On a GPU the table also gives the
device's peak memory in use.
Prints a table and a final JSON line; asserts nothing about time.

`--base_width` keeps the config's width and heads (Base: 768, 12 heads, MLP 3072,
vocabulary 64k, 256 caption queries, text length 64) but only 2 vision layers and 1 + 1
decoder layers at 224px / patch 16, so that a Base-width step runs on a laptop CPU.
Overrides `--config.KEY=VALUE` apply after it, as in `python -m coca_jax.train`.
"""

import argparse
import dataclasses
import json
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from coca_jax import aot, flops, sharding, tokens
from coca_jax import config as config_lib
from coca_jax import params as params_lib
from coca_jax import state as state_lib
from coca_jax import step as step_lib
from coca_jax.bench import trace
from coca_jax.data import loader, synthetic
from coca_jax.models import coca

PROG = "python -m coca_jax.bench step"


def load_config(config_args: list[str], prog: str = PROG):
  """The config of `--config=FILE[:ARG]` plus `--config.KEY=VALUE` overrides, parsed as
  absl parses them."""
  flag_values = flags.FlagValues()
  argv = [prog, *config_args]
  config_lib.configs_importable()
  holder = config_flags.DEFINE_config_file(
    "config", None, "Config file.", flag_values, lock_config=True, sys_argv=argv
  )
  try:
    flag_values(argv)
  except (
    flags.Error,
    AttributeError,
    KeyError,
  ) as e:  # a misspelt key fails here, before compiling
    raise SystemExit(
      f"{prog}: bad --config argument in {config_args}: {type(e).__name__} {e}"
    ) from e
  if holder.value is None:
    raise SystemExit(f"{prog}: --config=configs/FILE.py is required")
  return holder.value


# --base_width: few layers at 224px / patch 16; width, heads, MLPs, vocabulary and text
# length stay the config's.
BASE_WIDTH = {
  "model.vision.layers": 2,
  "model.vision.image_size": 224,
  "model.vision.patch_size": 16,
  "model.text.unimodal_layers": 1,
  "model.text.multimodal_layers": 1,
}


def overridden_keys(config_args: list[str]) -> set[str]:
  """{"model.width", ...} of the `--config.KEY=VALUE` arguments."""
  keys = (a.lstrip("-").split("=")[0] for a in config_args)
  return {k.removeprefix("config.") for k in keys if k.startswith("config.")}


def host_batch(config, step: int, rows) -> dict:
  """Random global rows `rows` of batch `step` in the format of config.data.source's
  batches (`aot.batch_spec`; B rows, S image size, T text length, A answers, F frames):
    "mixture", "synthetic": {"image" [B,S,S,3], "text" {"ids","labels","mask" [B,T]}}
    "vqa": the same + "answer_scores" [B,A] float32 (one answer of full credit per row)
    "video": {"video" [B,F,S,S,3] float32, "label" [B] int32 below the head's classes}
  Row r is a function of (config.data.seed, step, r), as in coca_jax/data/synthetic.py."""
  spec = aot.batch_spec(config)
  seed = config.data.seed
  if "video" in spec:
    classes = config.model.video.get("num_classes", 0)
    if classes < 1:
      raise ValueError(
        f"config.data.source='video' needs config.model.video.num_classes > 0 (it is "
        f"{classes}): the video step trains the video head"
      )
    rngs = [np.random.default_rng((seed, step, int(row))) for row in rows]
    clip = spec["video"].shape[1:]
    return dict(
      video=np.stack([rng.standard_normal(clip, np.float32) for rng in rngs]),
      label=np.array([rng.integers(classes) for rng in rngs], np.int32),
    )
  image_size, text_len = spec["image"].shape[1], spec["text"]["ids"].shape[1]
  vocab_size, contract = config.model.text.vocab_size, tokens.Contract.from_config(config)
  batch = synthetic.batch(seed, step, rows, image_size, text_len, vocab_size, contract)
  if "answer_scores" in spec:
    answers = spec["answer_scores"].shape[1]
    scores = np.zeros((len(rows), answers), np.float32)
    picks = [np.random.default_rng((seed, step, int(row), 1)).integers(answers) for row in rows]
    scores[np.arange(len(rows)), picks] = 1.0
    batch["answer_scores"] = scores
  return batch


def device_batches(config, mesh, count: int) -> list:
  """`count` global batches of `host_batch`, this process's rows, placed on the mesh."""
  rules = config.sharding_rules
  rows = sharding.host_shard(mesh, rules, config.data.global_batch_size).rows
  return [sharding.global_batch(host_batch(config, i, rows), mesh, rules) for i in range(count)]


def shapes(batch) -> dict:
  """{"video": [B, F, S, S, 3], "label": [B]} or {"image": ..., "text/ids": ..., ...}."""
  leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
  return {"/".join(params_lib.path_names(path)): list(x.shape) for path, x in leaves}


def peak_memory_bytes(device) -> int | None:
  """The device's peak memory in use since the process started (None where the backend
  keeps no statistics, as on CPU)."""
  stats = device.memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def run(config, *, steps: int, warmup: int, trace_dir: str | None = None) -> dict:
  """Compiles and times `steps` train steps of `config` (then records `steps` more with
  jax.profiler into `trace_dir`, if given); returns the measurements."""
  run = state_lib.setup(config)
  mesh, layout = run.mesh, run.layout
  state = state_lib.create(config, run)
  train_step = step_lib.make_train_step(config, run)
  batches = device_batches(config, mesh, min(steps, 4))

  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = train_step.jitted.lower(layout.abstract, batches[0]).compile()
  compile_s = time.perf_counter() - start

  for i in range(warmup):
    state, metrics = compiled(state, batches[i % len(batches)])
  jax.block_until_ready((state, metrics) if warmup else state)
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = compiled(state, batches[i % len(batches)])
  loss = float(metrics["loss"])  # waits for the last step
  step_s = (time.perf_counter() - start) / steps
  top_ops = kernel_kinds = None
  if trace_dir:  # `steps` more steps, so that the profiler's overhead is not timed
    jax.profiler.start_trace(trace_dir)
    for i in range(steps):
      state, metrics = compiled(state, batches[i % len(batches)])
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    path = trace.latest_trace(trace_dir)
    data = jax.profiler.ProfileData.from_file(str(path)) if path else None
    top_ops = [] if data is None else trace.top_ops(data, steps)
    kernel_kinds = {} if data is None else trace.kinds(data, steps)

  global_batch = config.data.global_batch_size
  flops_per_step = flops.train_flops_per_example(config) * global_batch
  peak = flops.peak_flops_per_device(jax.devices()[0], config.model.dtype, config.train.peak_flops)
  achieved = flops_per_step / step_s
  m = config.model
  return dict(
    model=(
      f"width {m.width}, {m.heads} heads, {m.vision.layers} vision + {m.text.unimodal_layers}+"
      f"{m.text.multimodal_layers} decoder layers, {m.vision.image_size}px/{m.vision.patch_size}, "
      f"vocab {m.text.vocab_size}, {m.dtype}, remat {m.remat_policy}, "
      f"{'scanned' if m.scan_layers else 'unrolled'} layers, "
      f"attention {coca.attention_implementation(m)}"
    ),
    params=params_lib.total(layout.abstract["params"]),
    devices=jax.device_count(),
    device_kind=jax.devices()[0].device_kind,
    mesh=dict(mesh.shape),
    source=config.data.source,
    frozen=list(config.train.get("frozen", ())),
    batch=shapes(batches[0]),
    global_batch=global_batch,
    steps=steps,
    warmup=warmup,
    compile_s=compile_s,
    step_s=step_s,
    examples_per_s=global_batch / step_s,
    model_flops_per_step=flops_per_step,
    achieved_flops_per_s=achieved,
    peak_flops_per_s=None if peak is None else peak * jax.device_count(),
    mfu=None if peak is None else achieved / (peak * jax.device_count()),
    peak_of=(
      "config.train.peak_flops"
      if config.train.peak_flops > 0
      else f"dense {flops.peak_precision(jax.devices()[0], config.model.dtype)} peak"
    ),
    peak_memory_bytes=peak_memory_bytes(jax.local_devices()[0]),
    loss=loss,
    **(
      {}
      if top_ops is None
      else dict(top_ops=[dataclasses.asdict(op) for op in top_ops], kernel_kinds=kernel_kinds)
    ),
  )


def table(result: dict) -> str:
  mfu = (
    "n/a (peak unknown)"
    if result["mfu"] is None
    else f"{result['mfu'] * 100:.1f}% (of {result['peak_flops_per_s']:.4g} FLOP/s, the "
    f"{result['peak_of']})"
  )
  rows = [
    ("model", result["model"]),
    ("parameters", f"{result['params']:,}"),
    ("devices", f"{result['devices']} x {result['device_kind']}, mesh {result['mesh']}"),
    ("global batch", f"{result['global_batch']}"),
    (
      "batch",
      ", ".join(f"{k} {v}" for k, v in result["batch"].items())
      + f" (config.data.source={result['source']!r})",
    ),
    ("frozen", ", ".join(result["frozen"]) or "nothing"),
    ("compile (excluded)", f"{result['compile_s']:.1f} s"),
    (
      "step time",
      f"{result['step_s'] * 1e3:,.1f} ms (mean of {result['steps']} after "
      f"{result['warmup']} warm-up)",
    ),
    ("examples/s", f"{result['examples_per_s']:,.1f}"),
    ("model FLOPs per step", f"{result['model_flops_per_step']:.4g}"),
    ("achieved FLOP/s", f"{result['achieved_flops_per_s']:.4g}"),
    ("MFU", mfu),
  ]
  if result["peak_memory_bytes"] is not None:
    rows.append(("peak device memory", f"{result['peak_memory_bytes'] / 2**30:.1f} GiB"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog=PROG,
    description=__doc__.splitlines()[0],
    epilog="Config: --config=configs/FILE.py[:ARG] and --config.KEY=VALUE overrides (absl syntax).",
    allow_abbrev=False,
  )
  parser.add_argument(
    "--batch", type=int, default=None, help="global batch (default: the config's)"
  )
  parser.add_argument("--steps", type=int, default=5, help="timed steps")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
  parser.add_argument(
    "--trace", default=None, help="record --steps more steps into this folder (profile)"
  )
  parser.add_argument(
    "--base_width", action="store_true", help="Base width with few layers at 224px (see above)"
  )
  args, config_args = parser.parse_known_args(argv)
  unknown = [a for a in config_args if not a.startswith(("--config", "-config"))]
  if args.steps < 1:
    parser.error("--steps must be at least 1")
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  config = load_config(config_args)
  if args.base_width:  # keys also given as --config.KEY=VALUE keep the command line's value
    skipped = overridden_keys(config_args)
    config.update_from_flattened_dict({k: v for k, v in BASE_WIDTH.items() if k not in skipped})
  if args.batch is not None:
    config.data.global_batch_size = args.batch
  loader.check_heads(config)  # the trainer's check (loader.resolve would build demo data)
  result = run(config, steps=args.steps, warmup=args.warmup, trace_dir=args.trace)
  print(table(result))
  if "top_ops" in result:
    print(f"\nlongest device kernels (--trace={args.trace}):")
    print(trace.table([trace.Op(**op) for op in result["top_ops"]]))
    if result["kernel_kinds"]:
      print(f"kernel time per step by kind: {trace.kinds_line(result['kernel_kinds'])}")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
