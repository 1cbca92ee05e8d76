"""Training throughput of coca_jax vs open_clip's CoCa (PyTorch), same model size, this CPU.

    python -m coca_jax.bench open_clip [--width=128,256,512] [--precision=float32,bfloat16]
        [--batch_size=32] [--steps=20] [--no_install]

(the same as `python benchmarks/open_clip.py ...` from the repository root; the script
lives outside the coca_jax package because open_clip needs torch.)

Both sides train the same shapes from random init on synthetic data (no downloads):
width D=256, 4 heads, ViT 4 layers MLP 1024 on 64x64 images in 8x8 patches (64 tokens),
2 unimodal + 2 multimodal decoder layers MLP 1024, vocabulary 4096, text length 32,
64 caption queries, joint embedding 256, batch 32, no rematerialisation; `--width`
takes a comma list (heads stay 4, MLPs 4 x width) and each width is one row group.
Each `--precision` is a row: float32 on both sides, or bfloat16 mixed precision:
coca_jax with model.dtype = bfloat16 (float32 parameters and optimizer state), open_clip
under torch.autocast(bfloat16) (its `--precision amp_bf16`). coca_jax's layer loop is
`--layers`: unrolled by default (the faster loop for these shallow stacks), or lax.scan. A
training example/s counts forward + backward + optimizer step; compilation (JAX) and
warm-up steps are excluded; the median (and best) step time of `--steps` timed steps is
reported. The sides run one after the other (never together: they would share the cores;
which goes first alternates from row to row),
each with every CPU this process may run on: XLA's CPU backend sizes its thread pool by
the affinity mask, so `taskset -c` pins both sides, and torch gets `--threads`, by
default and at most that many (coca_jax/bench/threads.py). The ratio is coca_jax /
open_clip. Other work on the machine skews it (torch's OpenMP threads suffer more from a
busy core than XLA's pool): the load average is printed before each side, run it on an
otherwise idle machine. Prints a table and a final JSON line; asserts nothing about time.

open_clip runs in a subprocess with this Python when it imports open_clip (the
`[open_clip]` extra), else in its own virtualenv, `.bench-venv` at the repository root
(ignored by git). Without either the script creates the latter (unless --no_install)
with the project's Python 3.11, printing the command:
    python3.11 -m venv .bench-venv && .bench-venv/bin/pip install torch==2.14.1 \\
        torchvision==0.29.1 open-clip-torch==3.3.0
(pip takes torch and torchvision from this machine's local wheel store; 5.5 GB). The
PyTorch side is benchmarks/open_clip_worker.py, run there as a subprocess that prints
one JSON line; the JAX side runs in this process with the trainer's own step.

With `--layout=open_clip` (the default) coca_jax builds open_clip's own architecture
(config.open_clip_layout; parameter counts printed, equal but for one text position row:
open_clip's unimodal tower holds T + 2 positions, [BOS, l1..lT] and [CLS]). With
`--layout=paper` the models are the same size, not the same architecture (~7% fewer
FLOPs on coca_jax's side):
- open_clip's vision tower has one 256-query (here `caption_queries`) attentional pooler;
  its token 0 goes to the contrastive loss and all tokens to the decoder. coca_jax has the
  paper's two poolers, a 1-query contrastive pooler reading the caption pooler ("cascade").
- open_clip's multimodal layers are two residual blocks each (self-attention + MLP, then
  cross-attention + MLP): two MLPs per layer where coca_jax (and the paper) has one.
- open_clip's ViT has a class token and a pre-LayerNorm; its pooler output is
  `embed_dim` wide (the benchmark sets embed_dim = width so the decoder sees D-wide tokens
  on both sides).
- open_clip's text input is [BOS, l1..lT] (T + 1 ids, so its caption loss covers T tokens
  like coca_jax's); its unimodal tower sees T + 2 positions with [CLS], coca_jax's T + 1.
Either way:
- Optimizer: torch AdamW (open_clip's training default) vs coca_jax's Adafactor with
  decoupled weight decay (the paper's); Adafactor keeps factored second moments.
- Loss: open_clip's CoCaLoss vs coca_jax's total loss, the same objective: open_clip's
  CLIP loss averages the two directions (half of the paper's Eq. 1, coca_jax's
  contrastive loss), so it runs with twice coca_jax's contrastive weight; caption weight 2
  on both sides (coca_jax also computes contrastive accuracy and norms as metrics).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from coca_jax import config as config_lib
from coca_jax import flops, host_memory, sharding, tokens
from coca_jax import params as params_lib
from coca_jax import state as state_lib
from coca_jax import step as step_lib
from coca_jax.bench import threads
from coca_jax.data import synthetic

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("open_clip_worker.py")
BENCH_VENV = REPO_ROOT / ".bench-venv"
# These versions install together on Python 3.11 (torch and torchvision from this
# machine's local wheel store).
BENCH_PACKAGES = ("torch==2.14.1", "torchvision==0.29.1", "open-clip-torch==3.3.0")


def bench_config(args, width: int, precision: str):
  """coca_jax's config for the benchmark model: coca_jax.config.coca_config, benchmark numbers."""
  config = config_lib.coca_config(
    width=width,
    heads=args.heads,
    vision_layers=args.vision_layers,
    vision_mlp=4 * width,
    unimodal_layers=args.unimodal_layers,
    multimodal_layers=args.multimodal_layers,
    # open_clip's decoder tower always uses MLP ratio 4.
    text_mlp=4 * width,
    embed_dim=width,
    image_size=args.image_size,
    patch_size=args.patch_size,
    vocab_size=args.vocab_size,
    max_text_len=args.text_len,
    caption_queries=args.caption_queries,
  )
  if args.layout == "open_clip":
    # open_clip's own architecture in coca_jax (config.open_clip_layout): one pooler whose
    # query 0 is the image embedding, two MLPs per multimodal layer, a class token, exact
    # GELU, key biases: the same parameters and FLOPs as the open_clip side.
    config_lib.open_clip_layout(
      config.model, vision_width=width, vision_heads=args.heads, pooler_heads=args.heads
    )
    # CLIP's special ids (49406, 49407) are outside the benchmark's vocabulary.
    config.model.text.bos_id = args.vocab_size - 2
    config.model.text.eos_id = args.vocab_size - 1
  config.model.dtype = precision
  config.model.scan_layers = args.layers == "scan"
  config.model.remat_policy = "none"  # open_clip does not recompute activations by default
  config.data.source = "synthetic"
  config.data.global_batch_size = args.batch_size
  config.train.steps = args.warmup_steps + args.steps
  config.optim.lr = 1e-4
  config.eval.evals = ""
  return config


def worker_spec(config, args) -> dict:
  m = config.model
  return dict(
    width=m.width,
    heads=m.heads,
    embed_dim=m.embed_dim,
    image_size=m.vision.image_size,
    patch_size=m.vision.patch_size,
    vision_layers=m.vision.layers,
    vision_mlp=m.vision.mlp_dim,
    unimodal_layers=m.text.unimodal_layers,
    multimodal_layers=m.text.multimodal_layers,
    text_mlp=m.text.mlp_dim,
    vocab_size=m.text.vocab_size,
    max_text_len=m.text.max_len,
    caption_queries=m.pooler.caption_queries,
    # open_clip's ClipLoss averages the two directions, half of coca_jax's Eq. 1 sum:
    # twice the weight gives both sides the same objective.
    contrastive_weight=2 * config.loss.contrastive_weight,
    caption_weight=config.loss.caption_weight,
    lr=config.optim.lr,
    precision="amp_bf16" if m.dtype == "bfloat16" else "fp32",
    threads=args.threads,
    warmup_steps=args.warmup_steps,
    steps=args.steps,
  )


def install_command(venv: Path) -> list[list[str]]:
  return [
    [sys.executable, "-m", "venv", str(venv)],
    [str(venv / "bin" / "pip"), "install", *BENCH_PACKAGES],
  ]


def imports_open_clip(python) -> bool:
  return subprocess.run([python, "-c", "import open_clip"], capture_output=True).returncode == 0


def ensure_bench_venv(venv: Path, install: bool) -> Path:
  """A Python with open_clip: this one, else the benchmark venv's, creating it when
  missing (5.5 GB: torch is a CUDA build)."""
  if imports_open_clip(sys.executable):
    return Path(sys.executable)
  python = venv / "bin" / "python"
  if python.exists() and imports_open_clip(python):
    return python
  commands = install_command(venv)
  shown = " && ".join(" ".join(c) for c in commands)
  if not install:
    raise SystemExit(f"open_clip is not installed in {venv}; create it with\n  {shown}")
  print(f"creating the benchmark virtualenv {venv} (once):\n  {shown}", flush=True)
  for command in commands:
    subprocess.run(command, check=True)
  return python


def run_open_clip(python: Path, spec: dict, batch: dict) -> dict:
  with tempfile.TemporaryDirectory(prefix="coca_bench_") as tmp:
    batch_file = Path(tmp) / "batch.npz"
    np.savez(
      batch_file, image=batch["image"], ids=batch["text"]["ids"], labels=batch["text"]["labels"]
    )
    # Each side with its faster allocator setting: coca_jax's glibc settings (applied to
    # this process) sped open_clip's float32 steps up (width 256: 0.61-0.65 vs 0.66-0.69
    # s) but slowed its bfloat16 ones 1.7x (width 128: 0.39-0.47 vs 0.23-0.25 s).
    tuned = host_memory.environment() if spec["precision"] == "fp32" else {}
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), **tuned)
    result = subprocess.run(
      # -P: the worker's own folder must not shadow the open_clip package with this file.
      [python, "-P", str(WORKER), json.dumps(spec), str(batch_file)],
      capture_output=True,
      text=True,
      env=env,
    )
  if result.returncode != 0:
    raise RuntimeError(
      f"open_clip worker failed (exit {result.returncode}):\n{result.stderr[-4000:]}"
    )
  return json.loads(result.stdout.strip().splitlines()[-1])


def run_coca_jax(config, args, batch: dict) -> dict:
  """Median step time of coca_jax's jitted train step (the trainer's own step function)."""
  run = state_lib.setup(config)
  mesh, layout = run.mesh, run.layout
  params = params_lib.total(layout.abstract["params"])
  state = state_lib.create(config, run)
  train_step = step_lib.make_train_step(config, run)
  global_batch = sharding.global_batch(batch, mesh, config.sharding_rules)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = train_step.jitted.lower(layout.abstract, global_batch).compile()
  compile_s = time.perf_counter() - start

  def timed_step(state):
    start = time.perf_counter()
    with jax.set_mesh(mesh):
      state, metrics = compiled(state, global_batch)
    jax.block_until_ready(state)
    return state, metrics, time.perf_counter() - start

  for _ in range(args.warmup_steps):
    state, metrics, _ = timed_step(state)
  first_loss = float(metrics["loss"])
  times = []
  for _ in range(args.steps):
    state, metrics, seconds = timed_step(state)
    times.append(seconds)
  step_s = float(np.median(times))
  return dict(
    params=params,
    step_s=step_s,
    best_step_s=float(np.min(times)),
    examples_per_s=args.batch_size / step_s,
    steps=args.steps,
    compile_s=compile_s,
    first_loss=first_loss,
    last_loss=float(metrics["loss"]),
    jax=jax.__version__,
    device=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
  )


PRECISIONS = ("float32", "bfloat16")


def int_list(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def precision_list(text: str) -> list[str]:
  names = [x for x in text.split(",") if x]
  unknown = sorted(set(names) - set(PRECISIONS))
  if unknown or not names:
    raise argparse.ArgumentTypeError(f"--precision {text!r}: use {', '.join(PRECISIONS)}")
  return names


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog="python -m coca_jax.bench open_clip",
    description=__doc__.splitlines()[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    "--width", type=int_list, default=[256], help="comma list: one row group each"
  )
  parser.add_argument("--precision", type=precision_list, default=list(PRECISIONS))
  parser.add_argument(
    "--layers",
    choices=("scan", "unrolled"),
    default="unrolled",
    # Measured here at widths 128/256/512 (2026-11-29): unrolled is 1.35-1.6x faster in
    # bfloat16 (scan's stacked bf16 residuals go through float32 on XLA CPU) and 0-12%
    # faster in float32 (scan was 10-20% faster before matmul's float32 backward).
    help="coca_jax's layer loop (config.model.scan_layers)",
  )
  parser.add_argument(
    "--layout",
    choices=("open_clip", "paper"),
    default="open_clip",
    help="coca_jax's model: open_clip's CoCa architecture (the same work as the open_clip "
    "side) or the paper's (cascade poolers, one MLP per multimodal layer: ~7%% fewer FLOPs)",
  )
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--vision_layers", type=int, default=4)
  parser.add_argument("--unimodal_layers", type=int, default=2)
  parser.add_argument("--multimodal_layers", type=int, default=2)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--patch_size", type=int, default=8)
  parser.add_argument("--text_len", type=int, default=32)
  parser.add_argument("--vocab_size", type=int, default=4096)
  parser.add_argument("--caption_queries", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--warmup_steps", type=int, default=2)
  parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
  threads.add_flag(parser)
  parser.add_argument("--bench_venv", type=Path, default=BENCH_VENV)
  parser.add_argument(
    "--no_install",
    action="store_true",
    help="fail with the install command instead of installing",
  )
  parser.add_argument("--skip_open_clip", action="store_true", help="time coca_jax only")
  args = parser.parse_args(argv)
  if args.warmup_steps < 1 or args.steps < 1:
    parser.error("--warmup_steps and --steps must be at least 1")
  if not args.width or any(w % args.heads for w in args.width):
    parser.error(f"--width {args.width}: each must be a multiple of --heads={args.heads}")
  # Before JAX's CPU client exists (coca_jax.train does the same).
  host_memory.tune_for_cpu()
  python = None if args.skip_open_clip else ensure_bench_venv(args.bench_venv, not args.no_install)

  rows = []
  for width in args.width:
    for precision in args.precision:
      config = bench_config(args, width, precision)
      m = config.model
      # The layout's token contract (open_clip's: BOS and EOS ids, EOS an input), which
      # the worker's text [BOS, labels] then follows too.
      batch = synthetic.batch(
        0,
        0,
        range(args.batch_size),
        m.vision.image_size,
        m.text.max_len,
        m.text.vocab_size,
        tokens.Contract.from_config(config),
      )
      image_tokens = (m.vision.image_size // m.vision.patch_size) ** 2
      print(
        f"model: width {m.width}, {m.heads} heads, "
        f"ViT {m.vision.layers} layers MLP {m.vision.mlp_dim} on "
        f"{m.vision.image_size}px / {m.vision.patch_size}px patches "
        f"({image_tokens} tokens), decoder "
        f"{m.text.unimodal_layers}+{m.text.multimodal_layers} layers MLP {m.text.mlp_dim}, "
        f"vocab {m.text.vocab_size}, text {m.text.max_len}, "
        f"{m.pooler.caption_queries} caption queries, {args.layout} layout; "
        f"batch {args.batch_size}, {precision}; "
        f"{args.threads} threads",
        flush=True,
      )
      row = dict(
        width=width,
        precision=precision,
        layout=args.layout,
        layers="scan" if m.scan_layers else "unrolled",
      )
      sides = {"coca_jax": lambda: run_coca_jax(config, args, batch)}
      if python is not None:
        sides["open_clip"] = lambda: run_open_clip(python, worker_spec(config, args), batch)
      # The sides take turns going first, row by row: whatever the machine's state drifts
      # to during a row (clocks, caches, another job) does not favour one side throughout.
      order = sorted(sides, reverse=len(rows) % 2 == 1)
      for side in order:
        print(f"{side}: load average {os.getloadavg()[0]:.2f} before; running ...", flush=True)
        row[side] = sides[side]()
      row["first"] = order[0]
      row["coca_jax_model_gflops_per_example"] = flops.train_flops_per_example(config) / 1e9
      if python is not None:
        row["ratio"] = row["coca_jax"]["examples_per_s"] / row["open_clip"]["examples_per_s"]
        row["ratio_best_steps"] = row["open_clip"]["best_step_s"] / row["coca_jax"]["best_step_s"]
      rows.append(row)

  header = (
    f"{'width':>5} {'precision':<9} {'layers':<8} {'side':<10} {'params':>8} {'step s':>7} "
    f"{'best s':>7} "
    f"{'examples/s':>11} {'loss first->last':>17} {'ratio':>6}"
  )
  print(header)
  print("-" * len(header))
  for row in rows:
    for side in ("open_clip", "coca_jax"):
      if side not in row:
        continue
      r = row[side]
      ratio = f"{row['ratio']:>5.2f}x" if side == "coca_jax" and "ratio" in row else ""
      print(
        f"{row['width']:>5} {row['precision']:<9} "
        f"{row['layers'] if side == 'coca_jax' else '':<8} {side:<10} {r['params'] / 1e6:>7.2f}M "
        f"{r['step_s']:>7.3f} {r['best_step_s']:>7.3f} {r['examples_per_s']:>11.1f} "
        f"{r['first_loss']:>8.3f}->{r['last_loss']:<8.3f} {ratio:>6}"
      )
  sides = rows[0]
  if "open_clip" in sides:
    o = sides["open_clip"]
    print(f"open_clip: torch {o['torch']}, open_clip {o['open_clip']}, {o['threads']} threads")
  print(f"coca_jax: jax {sides['coca_jax']['jax']}, {sides['coca_jax']['device']}")
  print(
    "ratio: coca_jax / open_clip training examples/s at the same width and precision (median steps)"
  )
  summary = dict(bench="open_clip", batch_size=args.batch_size, rows=rows)
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
