"""open_clip's coca_ViT-B-32 (open_clip 3.3.0 model_configs/coca_ViT-B-32.json) in coca_jax:
the layout of its public checkpoints (laion2b_s13b_b90k, mscoco_finetuned_laion2b_s13b_b90k),
which `python -m coca_jax.convert open_clip --model=coca_ViT-B-32` loads. 253,560,065
parameters, as open_clip counts them. `open_clip_config` also builds coca_vit_l14.py.

Argument: comma-separated switches, see coca_jax/config.py (e.g. `:bf16`).
"""

from coca_jax import config as config_lib


def open_clip_config(arg, *, width, heads, vision, patch_size):
  """An open_clip CoCa: text tower, pooler and multimodal decoder `width` wide with
  `heads` heads (12 + 12 layers, MLP 4 x width); the ViT (`vision`: width, heads, layers;
  MLP 4 x its width) at 224 px; CLIP's BPE vocabulary and open_clip's preprocessing."""
  vision_width, vision_heads, vision_layers = vision
  c = config_lib.coca_config(
    width=width,
    heads=heads,
    vision_layers=vision_layers,
    vision_mlp=4 * vision_width,
    unimodal_layers=12,
    multimodal_layers=12,
    text_mlp=4 * width,
    embed_dim=width,
    image_size=224,
    patch_size=patch_size,
    vocab_size=49_408,  # CLIP's byte-level BPE
    max_text_len=76,  # open_clip's CoCa context length ([CLS] is position 77)
    caption_queries=256,  # ONE pooler: query 0 -> image embedding, 1..255 -> decoder
    dtype="float32",
    arg=arg,
  )
  config_lib.open_clip_layout(
    c.model, vision_width=vision_width, vision_heads=vision_heads, pooler_heads=8
  )
  # open_clip's preprocessing (OPENAI_DATASET_MEAN / STD, bicubic resize, center crop),
  # and its training transform (open_clip/transform.py: RandomResizedCrop with
  # AugmentationCfg's default scale (0.9, 1.0), bicubic, no flip) for finetunes.
  c.data.image.mean = (0.48145466, 0.4578275, 0.40821073)
  c.data.image.std = (0.26862954, 0.26130258, 0.27577711)
  c.data.image.resize = "bicubic"
  c.data.image.crop_area = (0.9, 1.0)
  c.data.image.flip = False
  return c


def get_config(arg=None):
  # Text side 512 wide, 8 heads; ViT-B/32: width 768, 12 heads, 12 layers.
  return open_clip_config(arg, width=512, heads=8, vision=(768, 12, 12), patch_size=32)
