"""A tiny CoCa for tests: same code as the paper's variants, small numbers."""

from coca_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.coca_config(
    width=32,
    heads=2,
    vision_layers=2,
    vision_mlp=64,
    unimodal_layers=1,
    multimodal_layers=1,
    text_mlp=64,
    image_size=16,
    patch_size=4,
    vocab_size=64,
    max_text_len=8,
    caption_queries=8,
    embed_dim=16,
    arg=arg,
  )
  c.optim.factored_min_dim = 16
  c.data.global_batch_size = 8
  c.train.steps = 20
  c.train.log_every = 5
  c.train.checkpoint_every = 5
  c.train.eval_every = 0  # tests that need evaluation turn it on
  c.train.eval_steps = 2
  c.eval.evals = ""
  c.eval.batch_size = 8
  c.eval.num_examples = 16
  return c
