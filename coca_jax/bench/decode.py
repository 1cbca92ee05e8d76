"""Decoding throughput: KV-cached vs recompute, open_clip's B/32 shapes, bfloat16, the API.

    python -m coca_jax.bench decode [--sections=small,open_clip,demo] [--repeats=3]
        [--batch_sizes=1,32] [--lengths=32,64]                         # small
        [--open_clip_config=configs/open_clip/coca_vit_b32.py] [--tokens=32]
        [--greedy_batches=1,16] [--beam_size=3] [--beam_batch=16]      # open_clip
        [--demo_export=/tmp/coca_demo/export] [--demo_images=128]      # demo

Three sections, each a table; compilation is excluded (one warm-up call) and the median of
`repeats` timed calls is reported. Asserts nothing about time.

small: a small-but-real decoder built with `coca_jax.config.coca_config` (width 256,
  4 heads, 2 + 2 decoder layers, MLP 1024, vocabulary 1024, 32 caption queries; max text
  length 64; ViT 2 layers on 32px images in 4px patches; float32). Both variants run the
  same greedy `lax.while_loop` of `coca_jax.decode`; only the step function differs (KV
  cache + cross-attention keys/values projected once, or the whole prefix through both
  stacks each step).
open_clip: exactly open_clip coca_ViT-B-32's shapes (configs/open_clip/coca_vit_b32.py,
  random init: 224px, ViT-B/32, text width 512, 12 + 12 decoder layers, vocabulary
  49,408, context 76), greedy and beam-search rows in float32 and bfloat16 (weights
  stored in bfloat16, bfloat16 compute), image encoding included as open_clip's
  `generate` includes it. EOS (and pad, a stop id of open_clip's contract) is held back
  (min_length) so every run decodes exactly `tokens` tokens. Per row: seconds and
  tokens/s of the whole call; the setup's seconds (image encoding, decoder layers sliced
  out, image keys/values: timed alone); ms per decode step of the token loop (the call
  minus the setup); decoder weights read per step (every step reads each decoder weight
  once, whatever the batch; the token embedding table only one row per token, the
  cross-attention key/value projections not at all: they run once per image) and that
  over the loop's step time, against this machine's copy bandwidth measured in the same
  run. Then the quality cost of bfloat16: its greedy tokens against float32's on the same
  images.
demo: a trained export (the demo run's, real weights; skipped when absent) on real
  images (the demo's emoji validation split, raw 64px RGBA PNG pixels): captions/s through
  `coca_jax.load(export).caption` at batch 32 against the benchmark loop (the same
  jitted decode on the same preprocessed batches), the API's time split into its parts,
  and bfloat16 vs float32 captions of those images (the export's decoding method).

The PyTorch side (open_clip's `generate` on the same shapes) is
`python benchmarks/open_clip_decode.py`, which runs the open_clip section of this file.
"""

import argparse
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coca_jax import config as config_lib
from coca_jax import decode
from coca_jax import params as params_lib
from coca_jax import tokens as tokens_lib
from coca_jax.models import coca

SECTIONS = ("small", "open_clip", "demo")
OPEN_CLIP_CONFIG = "configs/open_clip/coca_vit_b32.py"
DEMO_EXPORT = "/tmp/coca_demo/export"
DEMO_IMAGES = "~/.cache/coca_jax/tfds/coca_emoji/1.1.0"  # the demo's prepared TFDS emoji


def bench_config():
  """The small benchmark model, built from the package's own config builder (float32)."""
  config = config_lib.coca_config(
    width=256,
    heads=4,
    vision_layers=2,
    vision_mlp=1024,
    unimodal_layers=2,
    multimodal_layers=2,
    text_mlp=1024,
    embed_dim=256,
    image_size=32,
    patch_size=4,
    vocab_size=1024,
    max_text_len=64,
    caption_queries=32,
  )
  config.model.remat_policy = "none"
  return config


def make_decoder(
  graphdef,
  length: int,
  cached: bool = True,
  beam_size: int = 0,
  contract: tokens_lib.Contract = tokens_lib.PAPER,
) -> Callable:
  """-> jitted fn(params, images [B, S, S, 3]) -> tokens [B, length]: image encoding then
  `length` greedy (beam_size 0) or beam-search steps; min_length holds the stop ids back
  until the last step (as open_clip's min_seq_len does on its side), so every run takes
  exactly `length` steps."""
  make_step_model = decode.cached_step_model if cached else decode.recompute_step_model

  @jax.jit
  def run(params, images):
    model = nnx.merge(graphdef, params)
    _, caption_tokens = model.encode_image(images)
    step_model = make_step_model(model, caption_tokens, length)
    common = dict(batch=images.shape[0], max_length=length, min_length=length, contract=contract)
    if beam_size:
      return decode.beam_search_loop(step_model, beam_size=beam_size, **common).tokens
    return decode.sample_loop(step_model, **common).tokens

  return run


def make_setup(graphdef, length: int) -> Callable:
  """-> jitted fn(params, images [B, S, S, 3]) -> what a cached decode call of `length`
  steps computes before its first step: the image encoding, the decoder's layers sliced
  out of their stacks, the image keys/values and the empty KV caches. Timed on its own so
  that the token loop's time (the call's minus this) gives the step time and bandwidth."""

  @jax.jit
  def setup(params, images):
    model = nnx.merge(graphdef, params)
    _, caption_tokens = model.encode_image(images)
    step_model = decode.cached_step_model(model, caption_tokens, length)
    return step_model.cache, step_model.context

  return setup


def time_call(fn, *args, repeats: int) -> float:
  """Median seconds of `repeats` calls of fn(*args), after one untimed (compiling) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def interleaved_medians(candidates: dict[str, Callable], repeats: int) -> dict[str, float]:
  """Median seconds of each candidate over `repeats` rounds, one call of each per round
  (after one untimed call each), so drifting load on a shared machine hits all alike."""
  for fn in candidates.values():
    fn()
  times = {name: [] for name in candidates}
  for _ in range(repeats):
    for name, fn in candidates.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def random_images(batch: int, size: int, seed: int = 0) -> np.ndarray:
  """[B, S, S, 3] float32 standard normal (preprocessed-image statistics)."""
  return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Section "small": cached vs recompute.


def small_section(batch_sizes, lengths, repeats: int) -> list[tuple]:
  config = bench_config()
  graphdef, params = nnx.split(coca.build(config.model, seed=0))
  size = config.model.vision.image_size
  m = config.model
  print(
    f"\n[small] decoder: width {m.width}, heads {m.heads}, "
    f"{m.text.unimodal_layers}+{m.text.multimodal_layers} layers, "
    f"MLP {m.text.mlp_dim}, vocab {m.text.vocab_size}, "
    f"{m.pooler.caption_queries} caption queries; greedy, float32"
  )
  header = (
    f"{'batch':>5} {'tokens':>6} {'cached tok/s':>13} {'recompute tok/s':>16} {'speed-up':>9}"
  )
  print(header)
  print("-" * len(header))
  rows = []
  for batch in batch_sizes:
    images = jnp.asarray(random_images(batch, size))
    for length in lengths:
      cached = make_decoder(graphdef, length, cached=True)
      recompute = make_decoder(graphdef, length, cached=False)
      # The two must agree token for token before their speeds are compared.
      same = np.array_equal(
        np.asarray(cached(params, images)), np.asarray(recompute(params, images))
      )
      cached_s = time_call(cached, params, images, repeats=repeats)
      recompute_s = time_call(recompute, params, images, repeats=repeats)
      tokens = batch * length
      row = (batch, length, tokens / cached_s, tokens / recompute_s, recompute_s / cached_s, same)
      rows.append(row)
      print(
        f"{batch:>5} {length:>6} {row[2]:>13.0f} {row[3]:>16.0f} {row[4]:>8.1f}x"
        + ("" if same else "  (tokens differ!)")
      )
  return rows


# ---------------------------------------------------------------------------------------
# Section "open_clip": open_clip coca_ViT-B-32's shapes, float32 and bfloat16.


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
  """Best copy bandwidth in GB/s (bytes read + bytes written, as STREAM's copy counts):
  numpy's copy of a `megabytes` float32 array (one core) and XLA's (all cores)."""
  src = np.ones(megabytes * 2**20 // 4, np.float32)
  dst = np.empty_like(src)
  x = jnp.asarray(src)
  xla_copy = jax.jit(lambda a: a + 1.0)
  jax.block_until_ready(xla_copy(x))
  best = np.inf
  for _ in range(repeats):
    for copy in (lambda: np.copyto(dst, src), lambda: jax.block_until_ready(xla_copy(x))):
      start = time.perf_counter()
      copy()
      best = min(best, time.perf_counter() - start)
  return 2 * src.nbytes / best / 1e9


def as_bfloat16(config, params):
  """(graphdef, params) of the model computing in bfloat16 with its weights STORED in
  bfloat16 (the config's bf16 switch alone keeps float32 weights and casts them at use,
  which reads as many weight bytes as float32)."""
  config = config.copy_and_resolve_references()
  config.model.dtype = "bfloat16"
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: coca.build(config.model)))
  cast = jax.tree.map(
    lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
  )
  return graphdef, cast


def weight_bytes_per_step(params, batch: int) -> int:
  """Decoder weight bytes one decode step of `batch` sequences reads (params: a CoCa's
  nnx.State, arrays or abstract): every text-side weight once, except the token embedding
  table (`batch` rows), the position embeddings (one row) and what no step touches
  (cross-attention key/value projections and their norm: run once per image; the [CLS]
  embedding and its norm: contrastive side only)."""
  total = 0
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params["text"]))[0]
  for path, leaf in flat:
    name = "/".join(params_lib.path_names(path))
    nbytes = leaf.size * jnp.dtype(leaf.dtype).itemsize
    if name in ("token_embedding", "pos_embedding"):
      rows = min(batch, leaf.shape[0]) if name == "token_embedding" else 1
      total += rows * nbytes // leaf.shape[0]
    elif not any(
      part in name for part in ("cross_attention/key", "cross_attention/value", "cross_kv_norm")
    ) and not name.startswith("cls_"):
      total += nbytes
  return total


def load_config_file(path: str):
  """A config file's get_config()."""
  import importlib.util
  import pathlib

  config_lib.configs_importable()
  file = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"bench_config_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def token_agreement(a: np.ndarray, b: np.ndarray, contract: tokens_lib.Contract) -> dict:
  """Two decodes of the same images, a and b [N, L] int32 -> agreement.

  Positions compared per row: up to the longer caption's stop token (all L when neither
  stops). token_agreement: equal tokens / positions compared; identical: rows equal in
  every compared position; first_divergence: mean over rows of the first differing
  position (L when none).
  """

  def lengths(t):
    stops = np.isin(t, contract.stop_ids)
    return np.where(stops.any(1), stops.argmax(1) + 1, t.shape[1])

  compared = np.maximum(lengths(a), lengths(b))
  within = np.arange(a.shape[1])[None] < compared[:, None]
  equal = (a == b) & within
  differs = (a != b) & within
  first = np.where(differs.any(1), differs.argmax(1), a.shape[1])
  return dict(
    token_agreement=float(equal.sum() / within.sum()),
    identical=float(np.mean(~differs.any(1))),
    first_divergence=float(first.mean()),
    rows=len(a),
  )


def open_clip_rows(
  config,
  *,
  tokens: int,
  greedy_batches,
  beam_size: int,
  beam_batch: int,
  repeats: int,
  dtypes=("float32", "bfloat16"),
  copy_megabytes: int = 512,
  log=print,
) -> dict:
  """coca_jax's decoding at `config`'s shapes (random init); -> dict with "rows" (one per
  dtype x method x batch: seconds and tokens_per_s of the whole call; setup_seconds, the
  image encoding and decoder setup timed alone; step_ms and gb_per_s of the token loop,
  the call minus its setup; weight_bytes_per_step), "copy_gb_per_s" and "bf16_agreement"
  (greedy tokens of the largest greedy batch). step_ms and gb_per_s are NaN when noise
  makes the setup's median reach the call's."""
  contract = tokens_lib.Contract.from_config(config)
  graphdef, params = nnx.split(coca.build(config.model, seed=0))
  models = {"float32": (graphdef, params)}
  if "bfloat16" in dtypes:
    models["bfloat16"] = as_bfloat16(config, params)
  size = config.model.vision.image_size
  runs = [("greedy", b) for b in greedy_batches] + ([("beam", beam_batch)] if beam_size else [])
  rows, greedy_tokens = [], {}
  for dtype in dtypes:
    graphdef, params = models[dtype]
    greedy = make_decoder(graphdef, tokens, contract=contract)
    beam = make_decoder(graphdef, tokens, beam_size=beam_size, contract=contract)
    setup = make_setup(graphdef, tokens)
    for method, batch in runs:
      images = jnp.asarray(random_images(batch, size))
      fn = beam if method == "beam" else greedy
      log(f"  coca_jax {dtype} {method} batch {batch} ...")
      seconds = time_call(fn, params, images, repeats=repeats)
      setup_seconds = time_call(setup, params, images, repeats=repeats)
      loop_seconds = seconds - setup_seconds if seconds > setup_seconds else float("nan")
      if method == "greedy":
        greedy_tokens[dtype, batch] = np.asarray(fn(params, images))
      sequences = batch * (beam_size if method == "beam" else 1)
      weight_bytes = weight_bytes_per_step(params, sequences)
      rows.append(
        dict(
          dtype=dtype,
          method=f"beam {beam_size}" if method == "beam" else "greedy",
          batch=batch,
          seconds=seconds,
          tokens_per_s=batch * tokens / seconds,
          setup_seconds=setup_seconds,
          step_ms=loop_seconds / tokens * 1e3,
          weight_bytes_per_step=weight_bytes,
          gb_per_s=weight_bytes * tokens / loop_seconds / 1e9,
        )
      )
  result = dict(rows=rows, copy_gb_per_s=copy_bandwidth(copy_megabytes), tokens=tokens)
  if "bfloat16" in dtypes and greedy_batches:
    batch = max(greedy_batches)
    result["bf16_agreement"] = token_agreement(
      greedy_tokens["float32", batch], greedy_tokens["bfloat16", batch], contract
    )
  return result


def describe(config) -> str:
  m = config.model
  return (
    f"{m.vision.image_size}px / {m.vision.patch_size}px patches, ViT width "
    f"{m.vision.get('width') or m.width} x {m.vision.layers} layers; text width {m.width}, "
    f"{m.text.unimodal_layers}+{m.text.multimodal_layers} decoder layers, MLP "
    f"{m.text.mlp_dim}, vocab {m.text.vocab_size:,}, context {m.text.max_len}, "
    f"{m.pooler.caption_queries} pooler queries"
  )


def print_open_clip_rows(result: dict) -> None:
  """The open_clip section's table (coca_jax's side alone)."""
  copy = result["copy_gb_per_s"]
  header = (
    f"{'dtype':<9} {'method':<7} {'batch':>5} {'seconds':>8} {'tokens/s':>9} {'setup s':>8} "
    f"{'ms/step':>8} {'weight MB/step':>15} {'GB/s':>6} {'of copy':>8}"
  )
  print(header)
  print("-" * len(header))
  for r in result["rows"]:
    print(
      f"{r['dtype']:<9} {r['method']:<7} {r['batch']:>5} {r['seconds']:>8.2f} "
      f"{r['tokens_per_s']:>9.1f} {r['setup_seconds']:>8.2f} {r['step_ms']:>8.1f} "
      f"{r['weight_bytes_per_step'] / 1e6:>15.1f} {r['gb_per_s']:>6.1f} "
      f"{r['gb_per_s'] / copy:>7.0%}"
    )
  print(
    f"{result['tokens']} tokens per caption. seconds, tokens/s: the whole call, image "
    "encoding included (as open_clip's generate). setup s: the image encoding and decoder "
    "setup alone; ms/step and GB/s: the token loop (the call minus its setup). Copy "
    f"bandwidth of this machine (read + write, measured now): {copy:.1f} GB/s"
  )
  agreement = result.get("bf16_agreement")
  if agreement:
    print(
      f"bfloat16 vs float32 greedy tokens ({agreement['rows']} random images, random init): "
      f"{agreement['token_agreement']:.1%} equal, {agreement['identical']:.0%} of captions "
      f"identical, first divergence at token {agreement['first_divergence']:.1f} on average"
    )


def open_clip_section(args) -> dict:
  config = load_config_file(args.open_clip_config)
  print(f"\n[open_clip] {args.open_clip_config} (random init): {describe(config)}")
  result = open_clip_rows(
    config,
    tokens=args.tokens,
    greedy_batches=[int(b) for b in args.greedy_batches.split(",")],
    beam_size=args.beam_size,
    beam_batch=args.beam_batch,
    repeats=args.repeats,
    copy_megabytes=args.copy_megabytes,
  )
  print_open_clip_rows(result)
  return result


# ---------------------------------------------------------------------------------------
# Section "demo": a trained export through coca_jax.load(...).caption.


def demo_images(count: int, directory: str = DEMO_IMAGES) -> np.ndarray:
  """The first `count` images of the demo's emoji validation split: [N, 64, 64, 4] uint8."""
  import tensorflow_datasets as tfds

  builder = tfds.builder_from_directory(os.path.expanduser(directory))
  rows = builder.as_dataset(split="validation").take(count).as_numpy_iterator()
  return np.stack([row["image"] for row in rows])


def demo_section(export_dir: str, raw: np.ndarray, repeats: int, batch: int = 32) -> dict:
  """API vs benchmark loop and bfloat16 agreement on an export; raw: [N, h, w, C] uint8
  images as a user would pass them (N a multiple of `batch`, so both sides decode the
  same full batches)."""
  from coca_jax import inference

  api = inference.load(export_dir, batch_size=batch)
  count = len(raw)
  options = api.predictor.decode_options()
  graphdef, params = api.predictor.graphdef, api.predictor.params
  print(
    f"\n[demo] {export_dir}: {describe(api.config)}; {count} images "
    f"({'x'.join(map(str, raw.shape[1:]))} uint8), batch {batch}, {options.method} decoding, "
    f"max {options.max_length} tokens"
  )

  pixels, _ = api.read_images(list(raw))
  out_tokens, _ = api.predictor.caption_tokens(pixels, options)
  # The benchmark loop: the jitted decode on preprocessed device batches of `batch`.
  loop_fn = decode.jit_generate(graphdef, options)
  batches = [jnp.asarray(pixels[i : i + batch]) for i in range(0, count, batch)]
  candidates = dict(
    loop=lambda: jax.block_until_ready([loop_fn(params, b).tokens for b in batches]),
    api_pixels=lambda: api.caption(pixels, preprocessed=True),
    api_raw=lambda: api.caption(list(raw)),
    read=lambda: api.read_images(list(raw)),
    tokens=lambda: api.predictor.caption_tokens(pixels, options),
    detokenize=lambda: tokens_lib.detokenize(api.vocab, out_tokens, contract=options.contract),
  )
  seconds = interleaved_medians(candidates, repeats)
  captions = tokens_lib.detokenize(api.vocab, out_tokens[:1], contract=options.contract)
  loop_s = seconds["loop"]
  timings = [
    ("benchmark loop: jitted decode, preprocessed device batches", loop_s),
    ("API caption(preprocessed float32 pixels)", seconds["api_pixels"]),
    ("API caption(raw uint8 RGBA images)", seconds["api_raw"]),
    ("  of which read_images (decode, resize, normalise)", seconds["read"]),
    (
      "  of which predictor.caption_tokens (batching, padding, transfers, decode)",
      seconds["tokens"],
    ),
    ("  of which detokenize", seconds["detokenize"]),
  ]
  header = f"{'':<76} {'seconds':>8} {'captions/s':>11} {'vs loop':>8}"
  print(header)
  print("-" * len(header))
  for name, seconds in timings:
    print(f"{name:<76} {seconds:>8.3f} {count / seconds:>11.1f} {seconds / loop_s:>7.2f}x")

  bf16_graphdef, bf16_params = as_bfloat16(api.config, params)
  f32_tokens = np.asarray(out_tokens)
  bf16_fn = decode.jit_generate(bf16_graphdef, options)
  bf16_tokens = np.concatenate([np.asarray(bf16_fn(bf16_params, b).tokens) for b in batches])
  agreement = token_agreement(f32_tokens, bf16_tokens[:count], options.contract)
  print(
    f"bfloat16 vs float32 {options.method} captions ({count} demo images, trained weights): "
    f"{agreement['token_agreement']:.1%} of tokens equal, {agreement['identical']:.0%} of "
    f"captions identical, first divergence at token {agreement['first_divergence']:.1f} on "
    f"average (of {options.max_length}); e.g. {captions[0]!r}"
  )
  return dict(timings=dict(timings), images=count, batch=batch, bf16_agreement=agreement)


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog="python -m coca_jax.bench decode",
    description=__doc__.splitlines()[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--sections", default=",".join(SECTIONS), help=f"of {SECTIONS}")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch_sizes", default="1,32", help="small")
  parser.add_argument("--lengths", default="32,64", help="small")
  parser.add_argument("--open_clip_config", default=OPEN_CLIP_CONFIG)
  parser.add_argument("--tokens", type=int, default=32, help="open_clip: tokens per caption")
  parser.add_argument("--greedy_batches", default="1,16", help="open_clip")
  parser.add_argument("--beam_size", type=int, default=3, help="open_clip; 0: no beam rows")
  parser.add_argument("--beam_batch", type=int, default=16, help="open_clip")
  parser.add_argument("--copy_megabytes", type=int, default=512, help="open_clip: bandwidth probe")
  parser.add_argument("--demo_export", default=DEMO_EXPORT)
  parser.add_argument(
    "--demo_images", type=int, default=128, help="demo: validation images (a multiple of 32)"
  )
  parser.add_argument("--demo_images_dir", default=DEMO_IMAGES, help="demo: prepared TFDS data")
  args = parser.parse_args(argv)
  sections = [s.strip() for s in args.sections.split(",") if s.strip()]
  unknown = set(sections) - set(SECTIONS)
  if unknown:
    parser.error(f"--sections: unknown {sorted(unknown)}; known {SECTIONS}")
  print(
    f"device {jax.devices()[0].device_kind}, {jax.device_count()} device(s); median of "
    f"{args.repeats} timed calls after a compiling one"
  )
  results = {}
  if "small" in sections:
    results["small"] = small_section(
      [int(b) for b in args.batch_sizes.split(",")],
      [int(n) for n in args.lengths.split(",")],
      args.repeats,
    )
  if "open_clip" in sections:
    results["open_clip"] = open_clip_section(args)
  if "demo" in sections and not os.path.exists(os.path.join(args.demo_export, "params")):
    print(
      f"\n[demo] skipped: no export at {args.demo_export} "
      "(the demo run, `bash launch/local.sh`, writes it)"
    )
  elif "demo" in sections:
    raw = demo_images(args.demo_images, args.demo_images_dir)
    results["demo"] = demo_section(args.demo_export, raw, args.repeats)
  return results


if __name__ == "__main__":
  main()
