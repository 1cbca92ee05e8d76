"""Decoding throughput: KV-cached greedy decoding vs full recompute.

    python -m coca_jax.bench decode [--batch_sizes=1,32] [--lengths=32,64] [--repeats=3]

Model: a small-but-real decoder built with `coca_jax.config.coca_config` (width 256,
4 heads, 2 + 2 decoder layers, MLP 1024, vocabulary 1024, 32 caption queries; max text
length 64; ViT 2 layers on 32px images in 4px patches; float32, no rematerialisation).
Both variants run the same greedy `lax.while_loop` of `coca_jax.decode`; only the step
function differs (cache + precomputed cross-attention keys/values, or the whole prefix
through both stacks each step). EOS is suppressed so every run decodes exactly
`length` tokens. Compilation is excluded (one warm-up call); the median of `repeats`
timed calls is reported. Prints a table; asserts nothing about time.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coca_jax import config as config_lib
from coca_jax import decode
from coca_jax.models import coca


def bench_config():
  """The benchmark model, built from the package's own config builder (float32)."""
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


def _no_eos(step_model: decode.StepModel) -> decode.StepModel:
  def step(ids, cache, context):
    logits, cache = step_model.step(ids, cache, context)
    return logits.at[:, decode.EOS_ID].set(decode.NEG), cache

  return step_model._replace(step=step)


def make_decoder(graphdef, length: int, cached: bool):
  make_step_model = decode.cached_step_model if cached else decode.recompute_step_model

  @jax.jit
  def run(params, images):
    model = nnx.merge(graphdef, params)
    _, caption_tokens = model.encode_image(images)
    step_model = _no_eos(make_step_model(model, caption_tokens, length))
    return decode.sample_loop(step_model, batch=images.shape[0], max_length=length).tokens

  return run


def time_call(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog="python -m coca_jax.bench decode", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--batch_sizes", default="1,32")
  parser.add_argument("--lengths", default="32,64")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  lengths = [int(n) for n in args.lengths.split(",")]

  config = bench_config()
  model = coca.build(config.model, seed=0)
  graphdef, params = nnx.split(model)
  size = config.model.vision.image_size
  m = config.model
  print(
    f"decoder: width {m.width}, heads {m.heads}, "
    f"{m.text.unimodal_layers}+{m.text.multimodal_layers} layers, "
    f"MLP {m.text.mlp_dim}, vocab {m.text.vocab_size}, "
    f"{m.pooler.caption_queries} caption queries; "
    f"device {jax.devices()[0].device_kind}, {jax.device_count()} device(s)"
  )
  header = (
    f"{'batch':>5} {'tokens':>6} {'cached tok/s':>13} {'recompute tok/s':>16} {'speed-up':>9}"
  )
  print(header)
  print("-" * len(header))
  rows = []
  for batch in batch_sizes:
    images = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)), jnp.float32)
    for length in lengths:
      cached = make_decoder(graphdef, length, cached=True)
      recompute = make_decoder(graphdef, length, cached=False)
      # The two must agree token for token before their speeds are compared.
      same = np.array_equal(
        np.asarray(cached(params, images)), np.asarray(recompute(params, images))
      )
      cached_s = time_call(cached, params, images, repeats=args.repeats)
      recompute_s = time_call(recompute, params, images, repeats=args.repeats)
      tokens = batch * length
      row = (batch, length, tokens / cached_s, tokens / recompute_s, recompute_s / cached_s, same)
      rows.append(row)
      print(
        f"{batch:>5} {length:>6} {row[2]:>13.0f} {row[3]:>16.0f} {row[4]:>8.1f}x"
        + ("" if same else "  (tokens differ!)")
      )
  return rows


if __name__ == "__main__":
  main()
