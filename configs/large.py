"""CoCa-Large, Table 1 of arXiv 2205.01917: 303M image encoder + 484M text decoder = 787M.

Argument: comma-separated switches, see coca_jax/config.py (e.g. `configs/large.py:f32`).
"""

from coca_jax import config as config_lib


def get_config(arg=None):
  return config_lib.coca_config(
    width=1024,  # "Hidden", shared by image encoder and text decoder
    heads=16,
    vision_layers=24,  # image encoder: 24 layers, MLP 4096
    vision_mlp=4096,
    unimodal_layers=12,  # text decoder: 12 unimodal + 12 multimodal layers, MLP 4096
    multimodal_layers=12,
    text_mlp=4096,
    # Joint embedding width: not in the paper; 768 follows CLIP ViT-L (Radford et al. 2021).
    embed_dim=768,
    # bfloat16 compute, float32 params and optimizer state: the usual TPU recipe (the
    # paper trains on TPU v4 and does not state its precision); `:f32` for float32.
    dtype="bfloat16",
    arg=arg,
  )
