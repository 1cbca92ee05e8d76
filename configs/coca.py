"""CoCa (the 2.1B model), Table 1 of arXiv 2205.01917: 1B image encoder + 1.1B text decoder.

Argument: comma-separated switches, see coca_jax/config.py (e.g. `configs/coca.py:f32`).
"""

from coca_jax import config as config_lib


def get_config(arg=None):
  return config_lib.coca_config(
    width=1408,  # "Hidden", shared by image encoder and text decoder
    heads=16,
    vision_layers=40,  # image encoder: 40 layers, MLP 6144
    vision_mlp=6144,
    unimodal_layers=18,  # text decoder: 18 unimodal + 18 multimodal layers, MLP 5632
    multimodal_layers=18,
    text_mlp=5632,
    # Joint embedding width: not in the paper; 1024 follows CLIP ViT-B/L's widths
    # scaled up (Radford et al. 2021).
    embed_dim=1024,
    # bfloat16 compute, float32 params and optimizer state: the usual TPU recipe (the
    # paper trains on TPU v4 and does not state its precision); `:f32` for float32.
    dtype="bfloat16",
    arg=arg,
  )
