"""flops.forward_macs / video_forward_macs against the multiply-adds of the model's own
traced forward pass; train_flops_per_example picks between them by the data source."""

import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jaxpr_dots import dot_generals

from coca_jax import config as config_lib
from coca_jax import flops
from coca_jax.models import coca
from configs import tiny


def traced_macs(fn, *args) -> int:
  """Multiply-adds of every dot_general in fn's jaxpr (the patch embedding is one too),
  a scan body's once per iteration."""
  total = 0
  for eqn, times in dot_generals(jax.make_jaxpr(fn)(*args).jaxpr):
    (contracting, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    total += times * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
  return total


def open_clip_tiny():
  """tiny's sizes in open_clip's layout, with a ViT wider than the text side."""
  c = tiny.get_config()
  config_lib.open_clip_layout(c.model, vision_width=48, vision_heads=2, pooler_heads=2)
  return c


def with_vqa_head():
  c = tiny.get_config()
  c.model.vqa.num_answers = 7
  return c


def parallel_wide_vit():
  """The paper's layout with parallel poolers (both read the ViT) and a wider ViT."""
  c = tiny.get_config()
  c.model.pooler.update(mode="parallel", contrastive_queries=2)
  c.model.vision.width = 48
  return c


@pytest.mark.parametrize(
  "make",
  [
    tiny.get_config,
    pytest.param(parallel_wide_vit, marks=pytest.mark.slow),
    open_clip_tiny,
    with_vqa_head,
  ],
  ids=["paper", "parallel", "open_clip", "vqa"],
)
def test_forward_macs_match_the_traced_model(make):
  config = make()
  m = config.model
  model = coca.build(m)
  graphdef, state = nnx.split(model)
  size, length = m.vision.image_size, m.text.max_len
  batch = dict(
    image=jnp.zeros((1, size, size, 3)),
    text=dict(ids=jnp.ones((1, length), jnp.int32), mask=jnp.ones((1, length), jnp.int32)),
  )
  traced = traced_macs(lambda s, b: nnx.merge(graphdef, s)(b), state, batch)
  assert flops.forward_macs(m) == traced


def test_forward_macs_of_the_tiny_model_by_hand():
  """configs/tiny.py counted from the paper's architecture, independently of the model
  code: width 32, ViT of 2 layers on 16 patches (16px / 4px, no class token), MLPs 64
  wide, a cascade of poolers (8 queries over the ViT, then 1 over those 8), 1 unimodal
  layer on 8 tokens + [CLS], 1 multimodal layer on 8 tokens, vocabulary 64, embeddings
  16 wide. Attention over q queries and k keys: 2qd^2 (query, output) + 2kd^2 (key,
  value) + 2qkd (scores, weighted values)."""

  def attention(q, k, d=32):
    return 2 * q * d * d + 2 * k * d * d + 2 * q * k * d

  def mlp(n):
    return 2 * n * 32 * 64

  patch_embedding = 16 * (4 * 4 * 3) * 32  # 24,576
  vit = patch_embedding + 2 * (attention(16, 16) + mlp(16))  # 319,488
  poolers = attention(8, 16) + attention(1, 8)  # 57,344 + 18,944
  unimodal = attention(9, 9) + mlp(9)  # 78,912
  multimodal = attention(8, 8) + attention(8, 8) + mlp(8)  # self, cross (8 queries): 106,496
  logits = 8 * 32 * 64
  embeddings = 32 * 16 + 32 * 16  # image and text projections
  total = vit + poolers + unimodal + multimodal + logits + embeddings
  assert total == 598_592
  assert flops.forward_macs(tiny.get_config().model) == total


@pytest.mark.parametrize("layout", ["paper", "open_clip"])
def test_video_forward_macs_match_the_traced_model(layout):
  config = tiny.get_config() if layout == "paper" else open_clip_tiny()
  config.model.video.num_classes = 5
  config.data.source = "video"
  config.data.video.frames = 3
  model = coca.build(config.model)
  graphdef, state = nnx.split(model)
  size = config.model.vision.image_size
  batch = dict(video=jnp.zeros((1, 3, size, size, 3)), label=jnp.zeros((1,), jnp.int32))
  traced = traced_macs(lambda s, b: nnx.merge(graphdef, s)(b), state, batch)
  assert flops.video_forward_macs(config.model, 3) == traced
  assert flops.train_flops_per_example(config) == 6.0 * traced
  config.data.source = "synthetic"  # image-text batches: the image-text count
  assert flops.train_flops_per_example(config) == 6.0 * flops.forward_macs(config.model)


def test_a_frozen_image_encoder_counts_its_forward_only():
  config = tiny.get_config()
  vision = flops.vision_macs(config.model)
  trained = flops.train_flops_per_example(config)
  assert not flops.vision_frozen(config)
  config.train.frozen = ("^vision/blocks/",)  # part of the ViT: its backward still runs
  assert not flops.vision_frozen(config)
  assert flops.train_flops_per_example(config) == trained
  config.train.frozen = ("^vision/", "caption_pooler")
  assert flops.vision_frozen(config)
  assert flops.train_flops_per_example(config) == trained - 2.0 * 2.0 * vision
  config.model.video.num_classes = 5
  config.data.update(source="video")
  config.data.video.frames = 3
  clip = flops.video_forward_macs(config.model, 3)
  assert flops.train_flops_per_example(config) == 2.0 * (3.0 * (clip - 3 * vision) + 3 * vision)


@pytest.mark.parametrize(
  "kind,peak",
  [
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L40", 181e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),  # matched "H200" (the SXM part's 989e12) before
    ("TPU v3", 61.5e12),  # one of a chip's two TensorCores: 123e12 / 2
    ("TPU v4", 275e12),
    ("cpu", None),
  ],
)
def test_peak_flops_per_jax_device(kind, peak):
  """Data-sheet dense bfloat16 peaks; "L4" matched L40S and L40 as a substring, and v3's
  per-chip peak counted once per TensorCore device halved its MFU."""
  device = type("Device", (), {"device_kind": kind})()
  assert flops.peak_flops_per_device(device) == peak
  assert flops.peak_flops_per_device(device, override=1e9) == 1e9
  # float32: TF32 on a GPU, half the bfloat16 peak (H100 SXM 494.7 TFLOP/s on its data
  # sheet); one bfloat16 pass on a TPU. It had been rated against the bfloat16 peak.
  float32 = flops.peak_flops_per_device(device, "float32")
  if peak is not None:
    assert float32 == (peak if kind.startswith("TPU") else peak / 2)
