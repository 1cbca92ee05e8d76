"""A tiny model of open_clip's CoCa layout for tests: coca_vit_b32's options and token
contract, small numbers (the ViT wider than the text, as in open_clip)."""

from configs.open_clip import coca_vit_b32


def get_config(arg=None):
  c = coca_vit_b32.get_config(arg)
  m = c.model
  m.width, m.heads, m.embed_dim = 32, 2, 16
  m.vision.update(dict(image_size=16, patch_size=4, layers=2, mlp_dim=96, width=48, heads=3))
  m.pooler.update(dict(caption_queries=8, heads=2))
  m.text.update(dict(vocab_size=64, max_len=8, unimodal_layers=1, multimodal_layers=2, mlp_dim=64))
  # BOS / EOS inside the tiny vocabulary (pad stays 0, a real token as in open_clip).
  m.text.update(dict(bos_id=62, eos_id=63))
  c.optim.factored_min_dim = 16
  c.data.global_batch_size = 8
  c.train.steps = 20
  c.train.log_every = 5
  c.train.checkpoint_every = 5
  c.train.eval_every = 0
  c.train.eval_steps = 2
  c.eval.evals = ""
  c.eval.batch_size = 8
  c.eval.num_examples = 16
  return c
