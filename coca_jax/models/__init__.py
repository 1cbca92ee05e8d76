"""Flax NNX modules of CoCa; math lives in pure functions (layers, losses, decode)."""
