"""open_clip's coca_ViT-L-14 (open_clip 3.3.0 model_configs/coca_ViT-L-14.json) in coca_jax:
the layout of its public checkpoints (laion2b_s13b_b90k, mscoco_finetuned_laion2b_s13b_b90k),
which `python -m coca_jax.convert open_clip --model=coca_ViT-L-14` loads. 638,450,177
parameters, as open_clip counts them.

Argument: comma-separated switches, see coca_jax/config.py (e.g. `:bf16`).
"""

from coca_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.coca_config(
    width=768,  # text tower, attentional pooler and multimodal decoder
    heads=12,
    vision_layers=24,  # ViT-L/14: 24 layers, width 1024, 16 heads, MLP 4 x 1024
    vision_mlp=4096,
    unimodal_layers=12,  # text tower: 12 layers; multimodal decoder: 12 layers; MLP 4 x 768
    multimodal_layers=12,
    text_mlp=3072,
    embed_dim=768,
    image_size=224,
    patch_size=14,
    vocab_size=49_408,  # CLIP's byte-level BPE
    max_text_len=76,  # open_clip's CoCa context length ([CLS] is position 77)
    caption_queries=256,  # ONE pooler: query 0 -> image embedding, 1..255 -> decoder
    dtype="float32",
    arg=arg,
  )
  config_lib.open_clip_layout(c.model, vision_width=1024, vision_heads=16, pooler_heads=8)
  # open_clip's preprocessing (OPENAI_DATASET_MEAN / STD, bicubic resize, center crop).
  c.data.image.mean = (0.48145466, 0.4578275, 0.40821073)
  c.data.image.std = (0.26862954, 0.26130258, 0.27577711)
  c.data.image.resize = "bicubic"
  # open_clip excludes its class embedding from weight decay too.
  c.optim.no_decay = (*c.optim.no_decay, "class_embedding")
  return c
