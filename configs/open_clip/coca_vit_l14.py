"""open_clip's coca_ViT-L-14 (open_clip 3.3.0 model_configs/coca_ViT-L-14.json) in coca_jax:
the layout of its public checkpoints (laion2b_s13b_b90k, mscoco_finetuned_laion2b_s13b_b90k),
which `python -m coca_jax.convert open_clip --model=coca_ViT-L-14` loads. 638,450,177
parameters, as open_clip counts them.

Argument: comma-separated switches, see coca_jax/config.py (e.g. `:bf16`).
"""

from configs.open_clip.coca_vit_b32 import open_clip_config


def get_config(arg=None):
  # Text side 768 wide, 12 heads; ViT-L/14: width 1024, 16 heads, 24 layers.
  return open_clip_config(arg, width=768, heads=12, vision=(1024, 16, 24), patch_size=14)
