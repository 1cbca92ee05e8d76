"""Video classification from the demo model (Section 4.2 of the paper), on this CPU in minutes.

    python -m coca_jax.train --config=configs/demo_video.py --workdir=/tmp/coca_demo_video

Starts from the demo's export (`configs/demo.py`, /tmp/coca_demo/export): every
pretrained parameter is loaded, the video head (a new 1-query attentional pooler over all
frames' image tokens, space x time, + a linear classifier) starts fresh and is the only
part trained (everything else is frozen). Data: the demo clips (coca_jax/data/video.py):
Fashion-MNIST images filmed by a moving camera (pan / zoom / rotation over F frames),
labelled by class, eval clips from held-out test images.
The 'video' eval reports zero-shot top-1 (mean of frame embeddings vs the class prompts,
no training), the trained head's top-1 and chance (1/10). For real clips set
`data.video.files` / `eval_files` / `class_names`, `data.video.frames` and
`model.video.num_classes` (e.g. 400 for Kinetics-400).
"""

from configs import demo


def get_config(arg=None):
  c = demo.get_config(arg)
  c.model.video.num_classes = 10  # the Fashion-MNIST classes
  c.data.source = "video"
  c.data.video.frames = 4
  c.data.global_batch_size = 32  # clips: 128 frames through the encoder per step
  c.loss.video_weight = 1.0
  c.train.init_from = "/tmp/coca_demo/export"
  # Frozen-feature setting (Section 4.2): everything but the new head stays the export's
  # (the video loss reads the image encoder and the head only; the rest, frozen, is not
  # shrunk by weight decay either), so video/zero_shot/* is the pretrained model's;
  # `--config.train.frozen='("^(?!video_head/|vision/)",)'` finetunes the encoder too,
  # `--config.train.frozen="()"` everything (see README: Video).
  c.train.frozen = ("^(?!video_head/)",)
  c.train.steps = 120
  c.train.log_every = 20
  c.train.eval_every = 120
  c.train.eval_steps = 4
  c.train.checkpoint_every = 120
  c.optim.lr = 5e-4  # half the demo's peak; its 5% warmup and cosine decay stay
  c.eval.evals = "video"
  c.eval.num_examples = 0  # every held-out clip (data.video.demo_fashion_eval)
  c.eval.headline = {
    "video/zero_shot/top1": "eval/video/zero_shot/top1",
    "video/top1": "eval/video/top1",
    "video/chance": "eval/video/chance",
  }
  return c
