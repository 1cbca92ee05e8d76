"""Caption decoding of coca_jax vs open_clip's CoCa `generate` (PyTorch), same shapes, this CPU.

    python benchmarks/open_clip_decode.py [--tokens=32] [--greedy_batches=1,16]
        [--beam_size=3] [--beam_batch=16] [--repeats=2] [--open_clip_repeats=1]
        [--skip_open_clip] [--open_clip_config=configs/open_clip/coca_vit_b32.py]

(from the repository root; it lives outside the coca_jax package because open_clip needs
torch.) Both sides build open_clip coca_ViT-B-32's exact shapes from random init
(coca_jax: configs/open_clip/coca_vit_b32.py, the layout its public checkpoints convert
to; open_clip: its own model config), float32, 224px random images, and decode exactly
`tokens` tokens per caption (end-of-text suppressed), image encoding included:
- greedy at each of `greedy_batches`: coca_jax's KV-cached greedy loop vs open_clip
  `generate(generation_type="top_k", top_k=1, ...)`;
- beam search, K = beam_size at beam_batch: coca_jax's beam search (GNMT alpha 0.6) vs
  open_clip `generate(generation_type="beam_search", num_beams=K, num_beam_groups=1)`.
coca_jax also runs each row with bfloat16 weights. Exact calls: open_clip_decode_worker.py
(open_clip) and coca_jax/bench/decode.py (coca_jax, its "open_clip" section).

The sides run one after the other (never together), each with every CPU this process may
run on (`--threads`, see coca_jax/bench/threads.py; `taskset -c` pins both); open_clip in a
subprocess (torch must not share a process with TensorFlow, which coca_jax's data code
imports) with the Python given by --python: by default this one when it imports
open_clip (the `[open_clip]` extra), else .bench-venv (see benchmarks/open_clip.py).
coca_jax's seconds are a median of `repeats` calls after a compiling one, open_clip's a
median of `open_clip_repeats` calls after a 2-token warm-up. The load average is printed
before each side: other work on the machine skews the ratios. Prints a table and a final
JSON line; asserts nothing about time.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from coca_jax.bench import decode as decode_bench
from coca_jax.bench import threads

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("open_clip_decode_worker.py")
BENCH_VENV = REPO_ROOT / ".bench-venv"
# Issue 15's targets: coca_jax float32 tokens/s over open_clip's, per (method, batch).
TARGETS = {("greedy", 1): 3.0, ("greedy", 16): 5.0, ("beam 3", 16): 5.0}


def open_clip_python(python: str | None) -> str:
  """--python, else this interpreter when it has open_clip, else .bench-venv's."""
  if python:
    return python
  probe = subprocess.run([sys.executable, "-c", "import open_clip"], capture_output=True)
  if probe.returncode == 0:
    return sys.executable
  fallback = BENCH_VENV / "bin" / "python"
  if not fallback.exists():
    raise SystemExit(
      "open_clip is not importable here: install the `[open_clip]` extra, or create "
      f"{BENCH_VENV} (see benchmarks/open_clip.py), or pass --python"
    )
  return str(fallback)


def run_open_clip(python: str, spec: dict) -> dict:
  env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
  result = subprocess.run(
    # -P: the worker's own folder must not shadow the open_clip package.
    [python, "-P", str(WORKER), json.dumps(spec)],
    stdout=subprocess.PIPE,
    text=True,
    env=env,
  )
  if result.returncode != 0:
    raise RuntimeError(f"open_clip worker failed (exit {result.returncode})")
  return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(coca: dict, reference: dict | None, beam_size: int) -> list[dict]:
  """One row per (method, batch): open_clip, coca_jax float32 and bfloat16, ratios."""
  by_key = {(r["dtype"], r["method"], r["batch"]): r for r in coca["rows"]}
  theirs = {
    (f"beam {beam_size}" if r["method"] == "beam" else "greedy", r["batch"]): r
    for r in (reference or {}).get("rows", [])
  }
  keys = [(m, b) for dtype, m, b in by_key if dtype == "float32"]
  header = (
    f"{'method':<7} {'batch':>5} {'open_clip s':>11} {'tok/s':>7} {'coca_jax f32 s':>14} "
    f"{'tok/s':>7} {'ratio':>6} {'bf16 s':>7} {'tok/s':>7} {'ratio':>6} {'target':>6}"
  )
  print(header)
  print("-" * len(header))
  table = []
  for method, batch in keys:
    f32 = by_key["float32", method, batch]
    bf16 = by_key.get(("bfloat16", method, batch))
    ref = theirs.get((method, batch))
    row = dict(method=method, batch=batch, coca_jax_f32_tokens_per_s=f32["tokens_per_s"])
    cells = [f"{method:<7} {batch:>5}"]
    cells.append(f"{ref['seconds']:>11.2f} {ref['tokens_per_s']:>7.2f}" if ref else f"{'-':>19}")
    ratio = f"{f32['tokens_per_s'] / ref['tokens_per_s']:>5.1f}x" if ref else f"{'-':>6}"
    cells.append(f"{f32['seconds']:>14.2f} {f32['tokens_per_s']:>7.1f} {ratio}")
    if bf16:
      bf16_ratio = f"{bf16['tokens_per_s'] / ref['tokens_per_s']:>5.1f}x" if ref else f"{'-':>6}"
      cells.append(f"{bf16['seconds']:>7.2f} {bf16['tokens_per_s']:>7.1f} {bf16_ratio}")
      row["coca_jax_bf16_tokens_per_s"] = bf16["tokens_per_s"]
    target = TARGETS.get((method, batch))
    cells.append(f"{target:>5.0f}x" if target else f"{'':>6}")
    if ref:
      row["open_clip_tokens_per_s"] = ref["tokens_per_s"]
      row["ratio_f32"] = f32["tokens_per_s"] / ref["tokens_per_s"]
      if bf16:
        row["ratio_bf16"] = bf16["tokens_per_s"] / ref["tokens_per_s"]
      if ref["tokens"] != coca["tokens"]:
        cells.append(f" (open_clip decoded {ref['tokens']} tokens)")
    print(" ".join(cells))
    table.append(row)
  return table


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog="python -m coca_jax.bench open_clip_decode",
    description=__doc__.splitlines()[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--open_clip_model", default="coca_ViT-B-32")
  parser.add_argument("--open_clip_config", default=decode_bench.OPEN_CLIP_CONFIG)
  parser.add_argument("--tokens", type=int, default=32)
  parser.add_argument("--greedy_batches", default="1,16")
  parser.add_argument("--beam_size", type=int, default=3)
  parser.add_argument("--beam_batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=2, help="coca_jax timed calls")
  parser.add_argument("--open_clip_repeats", type=int, default=1)
  parser.add_argument("--copy_megabytes", type=int, default=512, help="bandwidth probe size")
  threads.add_flag(parser)
  parser.add_argument("--python", help="a Python with torch + open_clip (default: see above)")
  parser.add_argument("--skip_open_clip", action="store_true", help="time coca_jax only")
  args = parser.parse_args(argv)
  greedy_batches = [int(b) for b in args.greedy_batches.split(",")]

  config = decode_bench.load_config_file(args.open_clip_config)
  print(
    f"{args.open_clip_model} shapes, random init, float32: {decode_bench.describe(config)}; "
    f"{args.tokens} tokens per caption",
    flush=True,
  )
  reference = None
  if not args.skip_open_clip:
    spec = dict(
      model=args.open_clip_model,
      threads=args.threads,
      tokens=args.tokens,
      greedy_batches=greedy_batches,
      beam_size=args.beam_size,
      beam_batch=args.beam_batch,
      repeats=args.open_clip_repeats,
    )
    python = open_clip_python(args.python)
    print(f"open_clip: load average {os.getloadavg()[0]:.2f} before; running ...", flush=True)
    reference = run_open_clip(python, spec)
  print(f"coca_jax: load average {os.getloadavg()[0]:.2f} before; running ...", flush=True)
  coca = decode_bench.open_clip_rows(
    config,
    tokens=args.tokens,
    greedy_batches=greedy_batches,
    beam_size=args.beam_size,
    beam_batch=args.beam_batch,
    repeats=args.repeats,
    copy_megabytes=args.copy_megabytes,
  )
  print(f"load average {os.getloadavg()[0]:.2f} after")
  decode_bench.print_open_clip_rows(coca)
  print()
  table = print_table(coca, reference, args.beam_size)
  if reference:
    print(
      f"open_clip: {reference['params']:,} params, torch {reference['torch']}, open_clip "
      f"{reference['open_clip']}, transformers {reference['transformers']}, "
      f"{reference['threads']} threads"
    )
  summary = dict(bench="open_clip_decode", tokens=args.tokens, table=table, coca_jax=coca)
  if reference:
    summary["open_clip"] = reference
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
