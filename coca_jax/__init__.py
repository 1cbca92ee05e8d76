"""coca_jax: CoCa (Contrastive Captioners, arXiv 2205.01917) in JAX/Flax.

`coca_jax.load(export_dir)` returns the inference object (embed_images, embed_texts,
classify, caption) of an export; it is imported lazily so that `import coca_jax` stays
cheap for configs and launch scripts.
"""


def __getattr__(name):
  if name == "load":
    from coca_jax.inference import load

    return load
  raise AttributeError(f"module 'coca_jax' has no attribute {name!r}")
