"""coca_jax: CoCa (Contrastive Captioners, arXiv 2205.01917) in JAX/Flax."""
