"""Model FLOPs of one CoCa training example and device peak FLOP/s, for MFU.

MFU = (model FLOPs per step x steps/s) / (peak FLOP/s x devices). Model FLOPs count the
matrix multiplications of one forward pass (2 FLOPs per multiply-add, attention score
and value products at full, not causal, length as PaLM's appendix B does) times 3 for
forward + backward; rematerialisation is not counted, so MFU does not reward it.
"""

import jax

from coca_jax.config import model_option

# Dense bfloat16 peak FLOP/s per JAX device, from the vendors' data sheets: a chip from
# TPU v4 on (one device each; v4 and v5p fuse their two TensorCores), a TensorCore on
# v2 and v3 (two devices per chip: half the chip's 45 / 123 TFLOP/s), a GPU. Matched as
# substrings of `device.device_kind`, most specific first ("L40S" before "L4").
PEAK_FLOPS = (
  ("TPU v6 lite", 918e12),  # Trillium (v6e)
  ("TPU v5 lite", 197e12),  # v5e
  ("TPU v5p", 459e12),
  ("TPU v5", 459e12),  # v5p reports "TPU v5"
  ("TPU v4", 275e12),
  ("TPU v3", 61.5e12),
  ("TPU v2", 22.5e12),
  ("H200 NVL", 835e12),
  ("H200", 989e12),  # SXM
  ("H100 PCIe", 756e12),
  ("H100 NVL", 835e12),
  ("H100", 989e12),  # SXM
  ("A100", 312e12),
  ("L40S", 362e12),
  ("L40", 181e12),
  ("L4", 121e12),
)


def peak_flops_per_device(device, dtype: str = "bfloat16", override: float = 0.0) -> float | None:
  """Peak FLOP/s of `device` for matmuls in `dtype` (config.model.dtype) from the table,
  `override` when > 0, None when unknown (CPU).

  float32 at JAX's default precision runs as one bfloat16 pass on a TPU (the bfloat16
  peak) and as TF32 on these GPUs, whose dense TF32 peak is half the bfloat16 one (A100
  156, H100 SXM 495 TFLOP/s): against the bfloat16 peak, a float32 run's MFU read half
  what it is."""
  if override > 0:
    return override
  kind = getattr(device, "device_kind", "")
  for name, peak in PEAK_FLOPS:
    if name in kind:
      return peak / 2 if peak_precision(device, dtype) == "TF32" else peak
  return None


def peak_precision(device, dtype: str) -> str:
  """The precision `peak_flops_per_device` rates `dtype` matmuls on `device` against."""
  gpu = "TPU" not in getattr(device, "device_kind", "")
  return "TF32" if dtype == "float32" and gpu else "bfloat16"


def _attention_macs(queries: int, keys: int, width: int, kv_width: int | None = None) -> int:
  """Multiply-adds of one attention layer `width` wide: query, key, value and output
  projections (keys and values from `kv_width`-wide tokens, default `width`) plus the
  scores and weighted values."""
  kv_width = kv_width or width
  projections = 2 * queries * width * width + 2 * keys * kv_width * width
  return projections + 2 * queries * keys * width


def vision_macs(m) -> int:
  """Multiply-adds of the ViT on one image: patch embedding and encoder layers."""
  v = m.vision
  dv = model_option(m, "vision.width") or m.width
  patches = (v.image_size // v.patch_size) ** 2
  tokens = _vision_tokens(m)
  embedding = patches * v.patch_size**2 * 3 * dv
  return embedding + v.layers * (_attention_macs(tokens, tokens, dv) + 2 * tokens * dv * v.mlp_dim)


def _vision_tokens(m) -> int:
  """Tokens the ViT outputs per image: its patches, plus the class token if it has one."""
  patches = (m.vision.image_size // m.vision.patch_size) ** 2
  return patches + int(model_option(m, "vision.class_token"))


def forward_macs(model_config) -> int:
  """Multiply-adds of one image-text example's forward pass through the model, in
  either layout (the paper's, or open_clip's: config.open_clip_layout), with the VQA
  head when the model has one (its batches are image-question examples through the
  whole model: the captioning loss stays on as an auxiliary term)."""
  m = model_config
  d = m.width
  dv = model_option(m, "vision.width") or d
  tokens = _vision_tokens(m)
  t = m.text.max_len
  q = m.pooler.caption_queries

  poolers = _attention_macs(q, tokens, d, dv)
  if m.pooler.mode == "single":  # output 0 is the image embedding, 1.. the decoder's
    image_tokens = q - 1
  else:
    image_tokens = q
    # The contrastive pooler reads the caption pooler's outputs (cascade) or the ViT's.
    keys, kv_width = (q, d) if m.pooler.mode == "cascade" else (tokens, dv)
    poolers += _attention_macs(m.pooler.contrastive_queries, keys, d, kv_width)

  def mlp(n):  # the decoder MLP over n tokens
    return 2 * n * d * m.text.mlp_dim

  unimodal = m.text.unimodal_layers * (_attention_macs(t + 1, t + 1, d) + mlp(t + 1))
  mlps = 2 if model_option(m, "text.multimodal_block") == "split" else 1
  multimodal = m.text.multimodal_layers * (
    _attention_macs(t, t, d) + _attention_macs(t, image_tokens, d) + mlps * mlp(t)
  )
  logits = t * d * m.text.vocab_size
  projections = 2 * d * m.embed_dim
  # models/heads.py: a 1-query pooler over the multimodal decoder's T outputs + classifier
  # (configs written before the head existed have no `vqa` block).
  answers = int(m.vqa.num_answers) if m.get("vqa") is not None else 0
  vqa_head = _attention_macs(1, t, d) + d * answers if answers else 0
  return vision_macs(m) + poolers + unimodal + multimodal + logits + projections + vqa_head


def video_forward_macs(model_config, frames: int) -> int:
  """Multiply-adds of one video clip's forward pass (models/heads.py): the ViT on each
  of `frames` frames, the head's 1-query pooler over all their tokens, its classifier.
  No poolers, no text: a video batch runs the video head alone."""
  m = model_config
  dv = model_option(m, "vision.width") or m.width
  head = _attention_macs(1, frames * _vision_tokens(m), dv) + dv * m.video.num_classes
  return frames * vision_macs(m) + head


def vision_frozen(config) -> bool:
  """Whether config.train.frozen covers every image-encoder parameter: the train step
  then runs no backward pass through the ViT (coca_jax.step stops frozen gradients)."""
  from coca_jax import optim
  from coca_jax import params as params_lib

  patterns = tuple(config.train.get("frozen", ()))
  if not patterns:
    return False
  mask = optim.frozen_mask(params_lib.abstract(config.model), patterns)
  flags = jax.tree_util.tree_flatten_with_path(mask)[0]
  return all(f for path, f in flags if params_lib.path_names(path)[0] == "vision")


def train_flops_per_example(config) -> float:
  """Model FLOPs of one training example of `config`'s batches: 3 x forward (backward
  costs twice forward); a clip of `config.data.video.frames` frames when
  config.data.source is "video", an image-text (or image-question) example otherwise.
  A frozen image encoder (`vision_frozen`) counts its forward only."""
  frames = config.data.video.frames if config.data.source == "video" else 1
  if config.data.source == "video":
    macs = video_forward_macs(config.model, frames)
  else:
    macs = forward_macs(config.model)
  vision = frames * vision_macs(config.model)
  if vision_frozen(config):
    return 2.0 * (3.0 * (macs - vision) + vision)
  return 3.0 * 2.0 * macs
