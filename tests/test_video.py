"""Video (Section 4.2): clip embeddings, the video head, its loss, the demo clips and the
demo config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_runs import tiny_config

from coca_jax import losses
from coca_jax import params as params_lib
from coca_jax import step as step_lib
from coca_jax.models import coca
from coca_jax.models.pooler import AttentionalPooler


def _clips(config, batch=2, frames=3, seed=0):
  size = config.model.vision.image_size
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(batch, frames, size, size, 3)), jnp.float32)


def _param_names(model) -> list[str]:
  state = nnx.state(model, nnx.Param)
  return [
    "/".join(params_lib.path_names(p)) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]
  ]


def _count(config) -> int:
  return params_lib.total(jax.eval_shape(lambda: nnx.state(coca.build(config.model), nnx.Param)))


# ---- model ----


def test_clip_embedding_is_the_normalised_mean_of_frame_embeddings():
  config = tiny_config(1)
  model = coca.build(config.model)
  clips = _clips(config, batch=2, frames=3)
  got = np.asarray(model.encode_video(clips))
  # Independently: each frame alone through encode_image, mean in float64, normalise.
  for b in range(clips.shape[0]):
    frames = np.stack(
      [np.asarray(model.encode_image(clips[b, f][None])[0][0], np.float64) for f in range(3)]
    )
    mean = frames.mean(axis=0)
    np.testing.assert_allclose(got[b], mean / np.linalg.norm(mean), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)


def test_head_absent_by_default_and_sized_when_asked():
  config = tiny_config(1)
  assert config.model.video.num_classes == 0
  assert not [n for n in _param_names(coca.build(config.model)) if "video" in n]
  base = _count(config)
  config.model.video.num_classes = 5
  width = config.model.width
  with nnx.use_eager_sharding(False):
    pooler = AttentionalPooler(
      1, width, config.model.heads, eps=1e-6, dtype=jnp.float32, rngs=nnx.Rngs(0)
    )
  pooler_params = params_lib.total(nnx.state(pooler, nnx.Param))
  assert _count(config) == base + pooler_params + width * 5 + 5


def test_paper_param_counts_unchanged():
  # The same count `python -m coca_jax.params --config=configs/base.py` prints.
  from configs import base

  config = base.get_config()
  assert config.model.video.num_classes == 0
  assert _count(config) == 388_572_929  # `coca_jax.params` before the video head existed


def test_video_logits_see_every_frame_and_train_with_cross_entropy():
  config = tiny_config(1)
  config.model.video.num_classes = 4
  model = coca.build(config.model)
  clips = _clips(config, batch=2, frames=3)
  logits = model.video_logits(clips)
  assert logits.shape == (2, 4) and logits.dtype == jnp.float32
  changed = clips.at[:, 2].set(0.0)  # the last frame only
  assert not np.allclose(model.video_logits(changed), logits)
  outputs = model(dict(video=clips, label=jnp.asarray([1, 3])))
  np.testing.assert_allclose(outputs["video_logits"], logits, rtol=1e-5, atol=1e-6)
  loss, terms = losses.total_loss(outputs, dict(label=jnp.asarray([1, 3])), config.loss)
  z = np.asarray(logits, np.float64)
  log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
  np.testing.assert_allclose(loss, -(log_p[0, 1] + log_p[1, 3]) / 2, rtol=1e-5)
  assert set(terms) == {"loss", "video_loss", "video_accuracy"}


def test_no_head_is_a_clear_error_and_so_is_grad_accumulation():
  config = tiny_config(1, train=dict(grad_accum_steps=2))
  with pytest.raises(ValueError, match="no video head"):
    coca.build(config.model).video_logits(_clips(config))
  config.model.video.num_classes = 3
  with pytest.raises(ValueError, match="grad_accum_steps=2 with a video head"):
    step_lib.make_gradients(config, None)
