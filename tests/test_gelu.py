"""layers.gelu against float64 references of both forms."""

import math

import jax.numpy as jnp
import numpy as np

from coca_jax.models import layers


def test_gelu_exact_and_tanh_forms():
  x = np.linspace(-10, 10, 4001)
  exact = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in x])
  tanh = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
  got_exact = np.asarray(layers.gelu(jnp.asarray(x, jnp.float32), False), np.float64)
  got_tanh = np.asarray(layers.gelu(jnp.asarray(x, jnp.float32), True), np.float64)
  np.testing.assert_allclose(got_exact, exact, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(got_tanh, tanh, atol=1e-6, rtol=1e-6)
  assert np.abs(got_exact - got_tanh).max() > 1e-4  # the two forms do differ
  assert layers.gelu(jnp.ones(3, jnp.bfloat16), False).dtype == jnp.bfloat16
