"""Is an attention kernel's training step as accurate as the einsum kernel's? (GPU check)

    python benchmarks/attention_parity.py [--kernel=cudnn] [--width=128] [--heads=2]

(from the repository root). Builds a CoCa with configs/tiny.py's layers at `width` /
`heads` (default head dimension 64, which cuDNN's fused kernel takes), one random batch
(text rows of several lengths, so the padding masks matter), and computes the training
loss (losses.total_loss, the trainer's) and its gradient three ways, same parameters:

    reference   float32 compute, einsum kernel
    einsum      bfloat16 compute, einsum kernel (config.model.attention's default)
    KERNEL      bfloat16 compute, `--kernel` ("cudnn"; "xla" runs on any backend)

For the loss, the caption logits and each embedding it prints each bfloat16 run's error
against the reference: the L2 norm of the difference over the L2 norm of the reference,
the gradients taken as one vector. bfloat16 rounding sets einsum's error; KERNEL passes
when its error is at most `--tolerance` (default 2) times einsum's (plus 1e-5) on every
line. Exit status 1 if not. A per-leaf relative measure would not do: some leaves'
gradients are about 1e-7 at initialisation (the poolers' query and key kernels), so
rounding noise dominates them.
"""

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coca_jax import config as config_lib
from coca_jax import losses
from coca_jax.models import coca

config_lib.configs_importable()
from configs import tiny  # noqa: E402  (after the repository root is importable)


def model_config(width: int, heads: int, dtype: str, attention: str):
  config = tiny.get_config()
  m = config.model
  m.width, m.heads, m.dtype, m.attention = width, heads, dtype, attention
  m.vision.mlp_dim = m.text.mlp_dim = 2 * width
  return config


def batch(config, rows: int = 4, seed: int = 0) -> dict:
  """Random images; text rows of lengths T, 5, 2, 7 (T = the config's text length)."""
  rng = np.random.default_rng(seed)
  size, length = config.model.vision.image_size, config.model.text.max_len
  lengths = np.array([length, 5, 2, 7][:rows])
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask == 1, rng.integers(3, config.model.text.vocab_size, (rows, length)), 0)
  image = rng.normal(size=(rows, size, size, 3)).astype(np.float32)
  text = dict(ids=ids.astype(np.int32), labels=ids.astype(np.int32), mask=mask)
  return jax.tree.map(jnp.asarray, dict(image=image, text=text))


def loss_and_grads(config, params, data) -> dict:
  """{"loss", "logits", "image_embedding", "text_embedding", "grads"}, float32 NumPy."""
  graphdef = nnx.graphdef(coca.build(config.model, seed=0))

  @jax.jit
  def run(params):
    def loss_fn(params):
      outputs = nnx.merge(graphdef, params)(data)
      loss, _ = losses.total_loss(outputs, data, config.loss)
      return loss, outputs

    (loss, outputs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    keys = ("logits", "image_embedding", "text_embedding")
    return dict(loss=loss, grads=grads, **{k: outputs[k] for k in keys})

  return jax.tree.map(lambda x: np.asarray(x, np.float32), run(params))


def relative_error(x, reference) -> float:
  """||x - reference|| / ||reference|| over all leaves."""
  x, reference = jax.tree.leaves(x), jax.tree.leaves(reference)
  diff = sum(float(np.sum((a - b) ** 2)) for a, b in zip(x, reference))
  norm = sum(float(np.sum(b**2)) for b in reference)
  return (diff / norm) ** 0.5


def compare(kernel: str, width: int, heads: int) -> list[tuple[str, float, float]]:
  """Rows (quantity, einsum's error, kernel's error) against the float32 reference."""
  reference_config = model_config(width, heads, "float32", "einsum")
  params = nnx.state(coca.build(reference_config.model, seed=0), nnx.Param)
  data = batch(reference_config)
  runs = {
    name: loss_and_grads(model_config(width, heads, dtype, attention), params, data)
    for name, dtype, attention in [
      ("reference", "float32", "einsum"),
      ("einsum", "bfloat16", "einsum"),
      (kernel, "bfloat16", kernel),
    ]
  }
  rows = []
  for quantity in ("loss", "logits", "image_embedding", "text_embedding", "grads"):
    reference = runs["reference"][quantity]
    rows.append(
      (
        quantity,
        relative_error(runs["einsum"][quantity], reference),
        relative_error(runs[kernel][quantity], reference),
      )
    )
  return rows


def passes(row, tolerance: float) -> bool:
  """The kernel's error is at most `tolerance` times einsum's (plus 1e-5, for errors that
  are exactly zero)."""
  _, einsum, other = row
  return other <= tolerance * einsum + 1e-5


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kernel", default="cudnn", choices=["cudnn", "xla"])
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--heads", type=int, default=2)
  parser.add_argument("--tolerance", type=float, default=2.0)
  args = parser.parse_args(argv)
  if args.kernel == "cudnn" and jax.default_backend() != "gpu":
    print(f"--kernel=cudnn needs a GPU; this backend is {jax.default_backend()}", file=sys.stderr)
    return 2
  rows = compare(args.kernel, args.width, args.heads)
  ok = all(passes(row, args.tolerance) for row in rows)
  print(f"{'':16}  error vs float32 einsum (relative L2)")
  print(f"{'':16}  {'bf16 einsum':>12}  {'bf16 ' + args.kernel:>12}")
  for row in rows:
    quantity, einsum, other = row
    verdict = "ok" if passes(row, args.tolerance) else "FAIL"
    print(f"{quantity:16}  {einsum:12.3e}  {other:12.3e}  {verdict}")
  print(f"{args.kernel}: {'as accurate as einsum' if ok else 'LESS ACCURATE than einsum'}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
