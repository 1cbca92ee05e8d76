"""Importers of other frameworks' checkpoints into coca_jax exports.

    python -m coca_jax.convert open_clip --model=coca_ViT-B-32 --checkpoint=FILE --output=DIR

open_clip (coca_jax/convert/open_clip.py): open_clip's CoCa checkpoints (coca_ViT-B-32,
coca_ViT-L-14) -> an export that `coca_jax.load`, the CLIs, `coca_jax.evaluate` and
`config.train.init_from` read. `--random_init` checks numerical parity against open_clip
itself instead (coca_jax/convert/open_clip_parity.py; needs the `[open_clip]` extra).
"""
