"""Frozen-feature classification (Section 4.2 of the paper, "frozen-feature evaluation").

Legend: N examples, M image-encoder tokens, D width, C classes, B batch.

The image encoder stays frozen: its output tokens are computed once, then a NEW
attentional pooler (one query) and a softmax classifier are trained on them with AdamW,
lr 5e-4 and a cosine schedule (the paper's protocol), and scored on held-out examples.
The suite (suite.py) trains it on the classification source's train split and scores it
on the eval split.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from coca_jax.models.heads import PooledClassifier


def train_and_score(
  train_tokens: np.ndarray,
  train_labels: np.ndarray,
  test_tokens: np.ndarray,
  test_labels: np.ndarray,
  *,
  num_classes: int,
  heads: int,
  eps: float,
  lr: float = 5e-4,
  steps: int = 300,
  batch_size: int = 64,
  weight_decay: float = 0.0,
  seed: int = 0,
) -> dict[str, float]:
  """Trains a probe (a fresh `PooledClassifier` in float32: `heads` heads, LayerNorm
  epsilon `eps`) on frozen tokens [N, M, D] with labels [N]; returns {"accuracy": test
  top-1, "train_accuracy": top-1 on the training tokens}."""
  width = train_tokens.shape[-1]
  with nnx.use_eager_sharding(False):
    probe = PooledClassifier(
      width, heads, num_classes, eps=eps, dtype=jnp.float32, rngs=nnx.Rngs(seed)
    )
  graphdef, params = nnx.split(probe)
  optimizer = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)
  opt_state = optimizer.init(params)

  def loss_fn(params, tokens, labels):
    logits = nnx.merge(graphdef, params)(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def train_step(params, opt_state, tokens, labels):
    grads = jax.grad(loss_fn)(params, tokens, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def predict(params, tokens):
    return jnp.argmax(nnx.merge(graphdef, params)(tokens), axis=-1)

  rng = np.random.default_rng(seed)
  batch_size = min(batch_size, len(train_tokens))
  for _ in range(steps):
    rows = rng.choice(len(train_tokens), batch_size, replace=False)
    params, opt_state = train_step(
      params, opt_state, train_tokens[rows], train_labels[rows].astype(np.int32)
    )

  def accuracy(tokens, labels):
    predictions = np.concatenate(
      [
        np.asarray(predict(params, tokens[i : i + batch_size]))
        for i in range(0, len(tokens), batch_size)
      ]
    )
    return float(np.mean(predictions == labels))

  return dict(
    accuracy=accuracy(test_tokens, test_labels), train_accuracy=accuracy(train_tokens, train_labels)
  )
