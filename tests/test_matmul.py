"""layers.matmul: values and gradients against float64 NumPy, in float32 and bfloat16,
with the GEMM outputs of CPUs and TPUs (float32) and of GPUs (low precision).

matmul runs its own backward in both (bfloat16: bf16 x bf16 -> f32 matmuls, a float32
bias sum); the reference is float64 on the same dtype-rounded inputs and cotangents.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coca_jax.models import layers

# (spec, x shape, kernel shape, bias shape): the model's matmuls (Dense, the attention
# projections in and out, attention weights x values). Where the output is smaller than x
# (the first and the fourth), float32 on CPU takes the transposed kernel gradient.
CASES = [
  ("...i,io->...o", (2, 3, 8), (8, 6), (6,)),
  ("bsd,dhk->bshk", (2, 5, 8), (8, 2, 4), (2, 4)),
  ("bthk,hkd->btd", (2, 5, 2, 4), (2, 4, 8), (8,)),
  ("bthk,hkd->btd", (2, 5, 2, 4), (2, 4, 3), (3,)),  # output narrower than x
  ("bhts,bshk->bthk", (2, 2, 3, 5), (2, 5, 2, 4), None),
]


def rounded(a, dtype):
  return np.asarray(jnp.asarray(a, jnp.float32).astype(dtype).astype(jnp.float32), np.float64)


def np_spec(spec, ndim):
  return spec.replace("...", "ABCDEFGH"[: ndim - 1]) if "..." in spec else spec


@pytest.mark.parametrize("gemm_output", ["float32", "low precision (GPUs)"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("out", ["same", "float32"])
@pytest.mark.parametrize("spec,x_shape,k_shape,b_shape", CASES)
def test_matmul_value_and_gradients(
  spec, x_shape, k_shape, b_shape, dtype, out, gemm_output, monkeypatch
):
  gpu = gemm_output != "float32"
  monkeypatch.setattr(layers, "gemm_outputs_low_precision", lambda: gpu)
  rng = np.random.default_rng(0)
  x = rng.normal(size=x_shape).astype(np.float32)
  kernel = rng.normal(size=k_shape).astype(np.float32)
  bias = None if b_shape is None else rng.normal(size=b_shape).astype(np.float32)
  dtype = jnp.dtype(dtype)
  out_dtype = dtype if out == "same" else jnp.dtype(jnp.float32)

  def f(x, kernel, bias):
    return layers.matmul(spec, x, kernel, dtype, out_dtype, bias)

  y, vjp = jax.vjp(f, x, kernel, bias)
  cotangent = rng.normal(size=y.shape).astype(np.float32)
  dx, dk, db = vjp(jnp.asarray(cotangent).astype(y.dtype))
  assert y.dtype == out_dtype
  assert dx.dtype == np.float32 and dk.dtype == np.float32

  # float64 reference on the rounded inputs; the output's cotangent is rounded to its dtype.
  s = np_spec(spec, len(x_shape))
  xr, kr = rounded(x, dtype), rounded(kernel, dtype)
  ref = np.einsum(s, xr, kr) + (0.0 if bias is None else bias.astype(np.float64))
  g = rounded(cotangent, out_dtype)
  (ins, o) = s.split("->")
  xs, ks = ins.split(",")
  ref_dx = np.einsum(f"{o},{ks}->{xs}", rounded(g, dtype), kr)
  ref_dk = np.einsum(f"{xs},{o}->{ks}", xr, rounded(g, dtype))
  # The backward dots take the cotangent rounded to `dtype`, a float32 output's too.
  # bfloat16 results carry 8 bits of mantissa; float32 ones about 24.
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  scale = lambda a: np.abs(a).max() + 1e-6  # noqa: E731
  np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=tol * scale(ref), rtol=0)
  np.testing.assert_allclose(np.asarray(dx), ref_dx, atol=tol * scale(ref_dx), rtol=0)
  np.testing.assert_allclose(np.asarray(dk), ref_dk, atol=tol * scale(ref_dk), rtol=0)
  if bias is None:
    assert not np.any(np.asarray(db))
  else:
    axes = tuple(range(len(y.shape) - len(b_shape)))
    np.testing.assert_allclose(np.asarray(db), g.sum(axes), atol=1e-5 * scale(g.sum(axes)))


@pytest.mark.parametrize("out_dtype", ["bfloat16", "float32"])
def test_bfloat16_backward_matmuls_accumulate_in_float32(out_dtype):
  """The backward dots of a bfloat16 matmul take bfloat16 operands and give float32,
  also under a float32 output (the vocabulary logits)."""
  x = jnp.ones((4, 8), jnp.float32)
  kernel = jnp.ones((8, 16), jnp.float32)

  def loss(x, kernel):
    y = layers.matmul("...i,io->...o", x, kernel, jnp.bfloat16, jnp.dtype(out_dtype))
    return (y.astype(jnp.float32) ** 2).sum()

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).as_text()
  dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
  assert len(dots) == 3  # forward, d(x), d(kernel)
  for line in dots:
    assert "(tensor<" in line and "bf16>, tensor<" in line and "-> tensor<" in line, line
    assert line.rstrip().endswith("xf32>"), line


def test_on_gpus_bfloat16_gemms_output_bfloat16(monkeypatch):
  """On GPUs (forced here) the forward and d(x) dots of a bfloat16 matmul give bfloat16,
  the kernel gradient float32; a float32 output (the vocabulary logits) stays float32."""
  monkeypatch.setattr(layers, "gemm_outputs_low_precision", lambda: True)
  x, kernel, bias = jnp.ones((4, 8)), jnp.ones((8, 16)), jnp.ones((16,))

  def result_types(out_dtype):
    def loss(x, kernel):
      y = layers.matmul("...i,io->...o", x, kernel, jnp.bfloat16, jnp.dtype(out_dtype), bias)
      return (y.astype(jnp.float32) ** 2).sum()

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).as_text()
    dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
    return sorted(line.rstrip().rsplit("x", 1)[-1] for line in dots)

  assert result_types("bfloat16") == ["bf16>", "bf16>", "f32>"]  # y, d(x); d(kernel)
  assert result_types("float32") == ["bf16>", "f32>", "f32>"]  # d(x); y, d(kernel)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_precision_runs_the_written_out_backward(dtype):
  """Autodiff's own transposes of these einsums ran on XLA CPU's generic dot (float32)
  or upcast to float32 x float32 (bfloat16); see layers.matmul."""
  x, kernel = jnp.ones((2, 3, 8)), jnp.ones((8, 6))
  jaxpr = jax.make_jaxpr(lambda x, k: layers.matmul("...i,io->...o", x, k, jnp.dtype(dtype)))
  assert "custom_vjp_call" in str(jaxpr(x, kernel))


@pytest.mark.parametrize(
  "dtype,width,transposed",
  [
    ("float32", 6, True),
    ("float32", 8, False),
    ("bfloat16", 6, False),
  ],
)
def test_kernel_gradient_form_on_cpu(dtype, width, transposed):
  """The float32 kernel gradient is computed transposed (grad^T x, behind a barrier)
  exactly where the output is narrower than x; see layers._kernel_grad."""
  x, kernel = jnp.ones((2, 3, 8)), jnp.ones((8, width))

  def loss(x, kernel):
    return layers.matmul("...i,io->...o", x, kernel, jnp.dtype(dtype)).astype(jnp.float32).sum()

  lowered = jax.jit(jax.grad(loss, argnums=1)).lower(x, kernel)
  assert ("optimization_barrier" in lowered.as_text()) == transposed
  # The CPU executable (the platform's branch) computes the [width, 8] gradient, then
  # transposes it; the einsum form's dot gives [8, width] directly.
  dots = [
    line.split("=")[1].split("{")[0].strip()
    for line in lowered.compile().as_text().splitlines()
    if " dot(" in line or line.strip().removeprefix("ROOT ").startswith("%ynn_fusion")
  ]
  assert dots and all(d == (f"f32[{width},8]" if transposed else f"f32[8,{width}]") for d in dots)


def test_a_multi_device_mesh_takes_the_einsum_form():
  """The transposed form's partitioned program deadlocked in an all-reduce on 8 devices."""
  x, kernel = jnp.ones((8, 3, 8)), jnp.ones((8, 6))

  def loss(x, kernel):
    return layers.matmul("...i,io->...o", x, kernel, jnp.float32).sum()

  with jax.set_mesh(jax.make_mesh((8,), ("data",))):
    hlo = jax.jit(jax.grad(loss, argnums=1)).lower(x, kernel).as_text()
  assert "optimization_barrier" not in hlo


def test_residual_cotangent_is_not_recomputed_inside_transposing_copies():
  """XLA CPU duplicates cheap elementwise producers into every consumer and expands
  optimization barriers before fusing, so the transposed copy of a residual stream's
  cotangent (the narrow operand of the down-projection's kernel gradient) recomputed the
  cotangent's whole chain, every later layer's LayerNorm backward: copies with 59, 43, 27
  and 9 operands in a 4-layer ViT. `_kernel_grad` materialises that cotangent first, so
  no copy's operand count grows with depth."""
  layers_, width, rows = 6, 16, 24

  def norm(x):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)

  def loss(kernels, x):
    for up, down in kernels:
      h = jax.nn.gelu(layers.matmul("...i,io->...o", norm(x), up, jnp.float32))
      x = x + layers.matmul("...i,io->...o", h, down, jnp.float32)
    return (x**2).sum()

  keys = jax.random.split(jax.random.key(0), 2 * layers_)
  kernels = [
    (
      jax.random.normal(keys[2 * i], (width, 4 * width)) * 0.1,
      jax.random.normal(keys[2 * i + 1], (4 * width, width)) * 0.1,
    )
    for i in range(layers_)
  ]
  x = jax.random.normal(jax.random.key(1), (2, rows // 2, width))
  hlo = jax.jit(jax.grad(loss)).lower(kernels, x).compile().as_text()
  operands = [
    line.split(" fusion(", 1)[1].split("), kind=")[0].count("%")
    for line in hlo.splitlines()
    if line.strip().startswith(("%copy", "%transpose")) and " fusion(" in line
  ]
  assert operands and max(operands) <= 10, sorted(operands)[-6:]
