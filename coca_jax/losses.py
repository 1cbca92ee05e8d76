"""CoCa's losses (Section 3.3): pure functions of arrays.

Legend: B global batch, E joint embedding width, T text length, V vocabulary,
A answer vocabulary (VQA), C video classes.
"""

import jax
import jax.numpy as jnp
import optax

from coca_jax import sharding


def contrastive_logits(
  image_embedding: jax.Array, text_embedding: jax.Array, temperature
) -> jax.Array:
  """[B, E] x [B, E] -> [B, B] float32 logits image_i . text_j / tau.

  Under a mesh both embeddings are sharded over the batch; the text side is
  constrained to be replicated so GSPMD all-gathers the (small) text embeddings and
  every image is scored against every text of the GLOBAL batch. Images are never
  gathered.

  The product runs at full float32 precision: at a TPU's default precision the float32
  operands are rounded to bfloat16 (8 significant bits), which, for 512-wide unit
  embeddings and a temperature learned down to 0.01, puts errors of up to 0.05 (rms
  0.01) on the logits (bfloat16 operands emulated in NumPy). The cost is nothing next to
  the model's (2 B^2 E FLOPs).
  """
  text_embedding = sharding.constrain(text_embedding, (None, None))
  logits = jnp.einsum(
    "ie,je->ij",
    image_embedding,
    text_embedding,
    precision=jax.lax.Precision.HIGHEST,
    preferred_element_type=jnp.float32,
  )
  return sharding.constrain(logits / temperature, ("batch", None))


def contrastive_loss(image_embedding, text_embedding, temperature) -> tuple[jax.Array, jax.Array]:
  """Symmetric InfoNCE, the paper's Eq. 1: the SUM of the image->text and text->image
  softmax cross-entropies, each a mean over the batch (-1/N (sum_i log p_i2t + sum_i log
  p_t2i)). open_clip's ClipLoss takes their mean, half of this: `loss.contrastive_weight
  = 0.5` reproduces its objective.

  Pair i is (image i, text i); every other example of the batch is a negative.
  Returns (loss scalar, image->text top-1 accuracy scalar).
  """
  logits = contrastive_logits(image_embedding, text_embedding, temperature)
  labels = jnp.arange(logits.shape[0])
  image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  accuracy = jnp.mean(jnp.argmax(logits, axis=1) == labels)
  return image_to_text + text_to_image, accuracy


def captioning_loss_sum(
  logits: jax.Array, labels: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token cross-entropies over real tokens, number of real tokens).

  logits [B, T, V]; labels, mask [B, T]. Gradient accumulation adds these up over
  micro-batches so the loss stays the mean over every real token of the global batch.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  mask = mask.astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(mask)


def captioning_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Next-token cross-entropy, averaged over real tokens of the whole batch.

  logits [B, T, V] float32; labels, mask [B, T]. The sum over all unmasked tokens is
  divided by their count (token-level mean, as in T5X), so long captions weigh more
  than short ones and padding counts for nothing.
  """
  total, count = captioning_loss_sum(logits, labels, mask)
  return total / jnp.maximum(count, 1.0)


def vqa_loss(logits: jax.Array, scores: jax.Array) -> jax.Array:
  """VQA as multi-label classification: sigmoid binary cross-entropy against soft scores.

  logits [B, A] float32; scores [B, A] the VQA score of each answer of the vocabulary
  (`data/answers.vqa_score`, the metric's credit; 0 for answers nobody gave). Summed over answers,
  averaged over questions: the loss of Teney et al. 2018 ("Tips and Tricks for Visual
  Question Answering", arXiv 1708.02711, Section 3: soft scores as targets of a sigmoid
  output, better than softmax) and of the bottom-up top-down VQA code, which scales the
  element mean by A. The sigmoid lets several answers be right at once (a class and its
  partial-credit parent), where a softmax over normalised scores would make them compete.
  """
  bce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), scores.astype(jnp.float32))
  return jnp.mean(jnp.sum(bce, axis=-1))


def vqa_accuracy(logits: jax.Array, scores: jax.Array) -> jax.Array:
  """logits, scores [B, A] -> the mean VQA score of each row's arg-max answer (a scalar):
  the soft accuracy within the vocabulary."""
  best = jnp.argmax(logits, axis=-1)
  return jnp.mean(jnp.take_along_axis(scores, best[:, None], axis=-1))


def video_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy of the video head (Section 4.2): logits [B, C], labels [B] int
  -> mean over clips."""
  return jnp.mean(
    optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  )


def classification_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """logits [B, C], labels [B] -> the fraction of rows whose arg-max is the label."""
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def total_loss(outputs: dict, batch: dict, loss_config) -> tuple[jax.Array, dict]:
  """L = contrastive_weight * L_con + caption_weight * L_cap (1.0 and 2.0 in the paper).

  With a VQA head (outputs hold "vqa_logits") the batch holds the question as its text
  and "answer_scores" [B, A]; L gains vqa_weight * `vqa_loss`, and the captioning loss
  (on the question tokens) is an auxiliary term by its weight.

  Args:
    outputs: `CoCa.__call__` outputs.
    batch: {"text": {"labels", "mask": [B, T]}, ...}.
    loss_config: `config.loss`.
  Returns:
    (loss, {"loss", "contrastive_loss", "captioning_loss", "contrastive_accuracy"} and
    with VQA "vqa_loss", "vqa_accuracy"; for a video batch (outputs hold "video_logits",
    the batch "label" [B]) {"loss", "video_loss", "video_accuracy"} with the pretraining
    terms 0: L = video_weight * `video_loss`).
  """
  if "video_logits" in outputs:  # a video batch: the video head's loss alone
    video = video_loss(outputs["video_logits"], batch["label"])
    loss = loss_config.video_weight * video
    accuracy = classification_accuracy(outputs["video_logits"], batch["label"])
    # The pretraining terms are not computed; zeros keep the trainer's console line whole.
    zero = jnp.zeros([], jnp.float32)
    return loss, dict(
      loss=loss,
      video_loss=video,
      video_accuracy=accuracy,
      contrastive_loss=zero,
      captioning_loss=zero,
      contrastive_accuracy=zero,
    )
  con, accuracy = contrastive_loss(
    outputs["image_embedding"], outputs["text_embedding"], outputs["temperature"]
  )
  cap = captioning_loss(outputs["logits"], batch["text"]["labels"], batch["text"]["mask"])
  terms = dict(contrastive_loss=con, captioning_loss=cap, contrastive_accuracy=accuracy)
  if "vqa_logits" in outputs:
    terms.update(
      vqa_loss=vqa_loss(outputs["vqa_logits"], batch["answer_scores"]),
      vqa_accuracy=vqa_accuracy(outputs["vqa_logits"], batch["answer_scores"]),
    )
  loss = weighted_total(terms, loss_config)
  return loss, dict(loss=loss, **terms)


def weighted_total(terms: dict, loss_config) -> jax.Array:
  """L = contrastive_weight * contrastive_loss + caption_weight * captioning_loss, plus
  vqa_weight * vqa_loss where `terms` has one (scalars; `config.loss`'s weights)."""
  loss = (
    loss_config.contrastive_weight * terms["contrastive_loss"]
    + loss_config.caption_weight * terms["captioning_loss"]
  )
  if "vqa_loss" in terms:
    loss = loss + loss_config.vqa_weight * terms["vqa_loss"]
  return loss
