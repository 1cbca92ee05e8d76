"""CoCa-Base, Table 1 of arXiv 2205.01917: 86M image encoder + 297M text decoder = 383M.

Argument: comma-separated switches, see coca_jax/config.py (e.g. `configs/base.py:f32`).
"""

from coca_jax import config as config_lib


def get_config(arg=None):
  return config_lib.coca_config(
    width=768,  # "Hidden", shared by image encoder and text decoder
    heads=12,
    vision_layers=12,  # image encoder: 12 layers, MLP 3072
    vision_mlp=3072,
    unimodal_layers=12,  # text decoder: 12 unimodal + 12 multimodal layers, MLP 3072
    multimodal_layers=12,
    text_mlp=3072,
    # Joint embedding width: not in the paper; 512 follows CLIP ViT-B (Radford et al. 2021).
    embed_dim=512,
    # bfloat16 compute, float32 params and optimizer state: the usual TPU recipe (the
    # paper trains on TPU v4 and does not state its precision); `:f32` for float32.
    dtype="bfloat16",
    arg=arg,
  )
