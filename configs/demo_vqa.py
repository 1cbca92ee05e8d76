"""VQA finetuning of the demo model (Section 4.3 of the paper), on this CPU in minutes.

    python -m coca_jax.train --config=configs/demo_vqa.py --workdir=/tmp/coca_demo_vqa

Starts from the demo's export (`configs/demo.py`, /tmp/coca_demo/export): every
pretrained parameter is loaded, the VQA head (a new 1-query attentional pooler over the
multimodal decoder's output tokens + a linear classifier over the top-K training answers)
starts fresh; the image encoder is frozen (the rest, the decoder included, trains).
Data: the demo VQA set (coca_jax/data/vqa.py): questions about
Fashion-MNIST items and emoji whose answers are the sources' real labels, scored on
held-out images. For real VQA data set `data.vqa.files` / `eval_files` (TFRecords of
image, question, answers) and `model.vqa.num_answers` (3,129 for VQA v2, the usual
answer vocabulary).
"""

from coca_jax import config as config_lib
from configs import demo

STEPS = 250  # of batch 64, encoder frozen: under 5 minutes on the shared 2-core CPU (README)


def get_config(arg=None):
  c = demo.get_config(arg)
  c.model.vqa.num_answers = 128  # K: the demo set has 121 distinct training answers
  # Classification only; the contrastive term is off and the captioning loss on the
  # question text is a small auxiliary (config.loss.caption_weight).
  c.loss.vqa_weight = 1.0
  c.loss.contrastive_weight = 0.0
  c.loss.caption_weight = 0.1
  c.data.source = "vqa"
  c.train.init_from = "/tmp/coca_demo/export"
  # The image encoder stays the export's (frozen features: no backward pass through the
  # ViT, so 250 steps fit the CPU budget); the paper finetunes it too:
  # `--config.train.frozen="()"`. What only the contrastive loss reads (weight 0 here) is
  # frozen too, so that weight decay leaves the export's contrastive side as it was.
  c.train.frozen = ("vision", *config_lib.CONTRASTIVE_ONLY)
  c.train.steps = STEPS
  c.train.log_every = 40
  c.train.eval_every = STEPS
  c.train.eval_steps = 4
  c.train.checkpoint_every = STEPS
  c.optim.lr = 5e-4  # half the demo's peak; its 5% warmup and cosine decay stay
  c.eval.evals = "vqa"
  c.eval.num_examples = 0  # every held-out question (2,000 Fashion-MNIST + 1,640 emoji)
  c.eval.headline = {
    "vqa/accuracy": "eval/vqa/accuracy",
    "vqa/majority_baseline": "eval/vqa/majority_baseline",
    "vqa/question_prior_baseline": "eval/vqa/question_prior_baseline",
  }
  return c
