"""layers.layer_norm: values and gradients against float64 NumPy (the forward formula,
and central finite differences of it for the gradient), with the written-out gradient
of GPUs and with autodiff (elsewhere)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coca_jax import losses
from coca_jax.models import coca, layers
from configs import tiny

EPS = 1e-6


@pytest.fixture(params=["written out (GPUs)", "autodiff"])
def gradient(request, monkeypatch):
  written_out = request.param == "written out (GPUs)"
  monkeypatch.setattr(layers, "written_out_layer_norm_gradient", lambda: written_out)


def np_layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + EPS) * scale + bias


def finite_difference_grads(x, scale, bias, cotangent, h=1e-6):
  """d sum(cotangent * layer_norm) / d (x, scale, bias), central differences in float64."""

  def objective(x, scale, bias):
    return float((cotangent * np_layer_norm(x, scale, bias)).sum())

  grads = []
  args = [x, scale, bias]
  for i, a in enumerate(args):
    g = np.zeros_like(a)
    for index in np.ndindex(a.shape):
      plus, minus = [b.copy() for b in args], [b.copy() for b in args]
      plus[i][index] += h
      minus[i][index] -= h
      g[index] = (objective(*plus) - objective(*minus)) / (2 * h)
    grads.append(g)
  return grads


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 6)])
def test_float32_values_and_gradients(shape, gradient):
  rng = np.random.default_rng(0)
  x = rng.normal(1.0, 2.0, shape)
  scale, bias = rng.normal(1.0, 0.5, shape[-1]), rng.normal(0.0, 0.5, shape[-1])
  cotangent = rng.normal(size=shape)
  f32 = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias)]
  y, vjp = jax.vjp(lambda x, s, b: layers.layer_norm(x, s, b, EPS, jnp.float32), *f32)
  assert y.shape == shape and y.dtype == jnp.float32
  np.testing.assert_allclose(y, np_layer_norm(x, scale, bias), atol=2e-6, rtol=0)
  grads = vjp(jnp.asarray(cotangent, jnp.float32))
  for got, want in zip(grads, finite_difference_grads(x, scale, bias, cotangent)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_bfloat16_input_gives_bfloat16_output_and_input_gradient(gradient):
  """The model's case: bfloat16 activations, float32 parameters and statistics. The
  reference is float64 on the bfloat16-rounded input and cotangent."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(0.5, 3.0, (3, 5, 16)), jnp.bfloat16)
  scale = jnp.asarray(rng.normal(1.0, 0.5, 16), jnp.float32)
  bias = jnp.asarray(rng.normal(0.0, 0.5, 16), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.bfloat16)
  y, vjp = jax.vjp(lambda x, s, b: layers.layer_norm(x, s, b, EPS, jnp.bfloat16), x, scale, bias)
  dx, dscale, dbias = vjp(cotangent)
  assert (y.dtype, dx.dtype, dscale.dtype, dbias.dtype) == (
    jnp.bfloat16,
    jnp.bfloat16,
    jnp.float32,
    jnp.float32,
  )
  x64, ct64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x, cotangent))
  s64, b64 = np.asarray(scale, np.float64), np.asarray(bias, np.float64)
  np.testing.assert_allclose(
    np.asarray(y.astype(jnp.float32)), np_layer_norm(x64, s64, b64), atol=3e-2, rtol=1e-2
  )
  want = finite_difference_grads(x64, s64, b64, ct64)
  np.testing.assert_allclose(np.asarray(dx.astype(jnp.float32)), want[0], atol=3e-2, rtol=1e-2)
  np.testing.assert_allclose(dscale, want[1], atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(dbias, want[2], atol=1e-4, rtol=1e-5)


def test_gradient_flows_through_the_module_under_jit(gradient):
  """LayerNorm's parameters get the custom gradient inside jit (the train step's path)."""
  with nnx.use_eager_sharding(False):
    norm = layers.LayerNorm(6, eps=EPS, dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(norm)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 6)), jnp.float32)

  @jax.jit
  def loss(params):
    return (nnx.merge(graphdef, params)(x) * jnp.arange(6.0)).sum()

  grads = jax.grad(loss)(params)
  xhat = np_layer_norm(np.asarray(x, np.float64), 1.0, 0.0)
  np.testing.assert_allclose(grads["scale"][...], (xhat * np.arange(6.0)).sum(0), atol=1e-5)
  np.testing.assert_allclose(grads["bias"][...], np.full(6, 4.0) * np.arange(6.0), atol=1e-5)


@pytest.mark.slow  # compiles the tiny model's gradient twice (12 s)
def test_the_model_gradient_is_the_same_either_way(monkeypatch):
  """The tiny CoCa's training loss and gradient (scanned, rematerialised layers) with the
  written-out LayerNorm gradient equal autodiff's to float32 rounding."""
  config = tiny.get_config()
  model = coca.build(config.model, seed=0)
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(3)
  ids = rng.integers(3, 64, (3, 8)).astype(np.int32)
  mask = (np.arange(8)[None] < np.array([[8], [5], [2]])).astype(np.int32)
  data = dict(
    image=jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32),
    text=dict(ids=jnp.asarray(ids * mask), labels=jnp.asarray(ids * mask), mask=jnp.asarray(mask)),
  )

  def loss_fn(params):
    return losses.total_loss(nnx.merge(graphdef, params)(data), data, config.loss)[0]

  results = []
  for written_out in (True, False):
    monkeypatch.setattr(layers, "written_out_layer_norm_gradient", lambda w=written_out: w)
    results.append(jax.jit(jax.value_and_grad(loss_fn))(params))
  (loss, grads), (reference_loss, reference_grads) = results
  np.testing.assert_allclose(loss, reference_loss, rtol=1e-6)
  leaves, reference = jax.tree.leaves(grads), jax.tree.leaves(reference_grads)
  diff = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(leaves, reference))
  assert diff**0.5 <= 1e-5 * sum(float(jnp.sum(b**2)) for b in reference) ** 0.5
