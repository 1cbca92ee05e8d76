"""The PyTorch side of `python benchmarks/open_clip.py`: open_clip's CoCa training steps.

Runs inside the benchmark virtualenv (.bench-venv: torch + open-clip-torch), never in the
project's, and imports nothing from coca_jax. Reads a JSON spec and a .npz batch in the
coca_jax batch format, times forward + backward + AdamW step on the CPU (float32, or
with spec "precision" = "amp_bf16" under torch.autocast(bfloat16) as open_clip's
`--precision amp_bf16` trains), prints one JSON
line: {"params", "examples_per_s", "step_s", "best_step_s", "steps", "threads",
"first_loss", "last_loss", "torch", "open_clip"}.

    .bench-venv/bin/python -P benchmarks/open_clip_worker.py SPEC_JSON BATCH_NPZ

(-P keeps this folder off sys.path: its open_clip.py would shadow the open_clip package.)
"""

import json
import sys
import time

import numpy as np
import open_clip
import torch
from open_clip.coca_model import CoCa
from open_clip.loss import CoCaLoss


def build(spec: dict) -> CoCa:
  """open_clip's standard CoCa (one attentional pooler, token 0 to the contrastive loss)."""
  width, heads = spec["width"], spec["heads"]
  vision_cfg = dict(
    image_size=spec["image_size"],
    patch_size=spec["patch_size"],
    layers=spec["vision_layers"],
    width=width,
    head_width=width // heads,
    mlp_ratio=spec["vision_mlp"] / width,
    attentional_pool=True,
    attn_pooler_queries=spec["caption_queries"],
    attn_pooler_heads=heads,
    output_tokens=True,
  )
  # Text input is [BOS, l1..lT] (T + 1 ids): open_clip feeds text[:, :-1] to the decoder
  # and scores text[:, 1:], so its caption loss covers the same T tokens as coca_jax's.
  context_length = spec["max_text_len"] + 1
  text_cfg = dict(
    context_length=context_length,
    vocab_size=spec["vocab_size"],
    width=width,
    heads=heads,
    layers=spec["unimodal_layers"],
    mlp_ratio=spec["text_mlp"] / width,
    embed_cls=True,
    output_tokens=True,
    pad_id=0,
  )
  # open_clip's decoder tower ignores mlp_ratio (always 4): the benchmark picks
  # text_mlp = 4 x width.
  multimodal_cfg = dict(
    context_length=context_length,
    vocab_size=spec["vocab_size"],
    width=width,
    heads=heads,
    layers=spec["multimodal_layers"],
    attn_pooler_heads=heads,
  )
  return CoCa(spec["embed_dim"], multimodal_cfg, text_cfg, vision_cfg)


def main(argv) -> None:
  spec = json.loads(argv[1])
  torch.set_num_threads(spec["threads"])
  torch.manual_seed(0)
  data = np.load(argv[2])
  image = torch.from_numpy(
    np.ascontiguousarray(data["image"].transpose(0, 3, 1, 2))
  )  # NHWC -> NCHW
  # [BOS, labels]: ids' first column is BOS; labels are t1 .. tn, EOS, PAD ... Under
  # either token contract this is open_clip's [BOS, ids[1:]..] layout: under the paper's
  # EOS is never one of coca_jax's inputs, so ids shifted are not the labels.
  text = torch.from_numpy(
    np.concatenate([data["ids"][:, :1], data["labels"]], axis=1).astype(np.int64)
  )

  model = build(spec)
  model.train()
  params = sum(p.numel() for p in model.parameters())
  loss_fn = CoCaLoss(
    caption_loss_weight=spec["caption_weight"],
    clip_loss_weight=spec["contrastive_weight"],
    pad_id=0,
  )
  optimizer = torch.optim.AdamW(
    model.parameters(), lr=spec["lr"], betas=(0.9, 0.999), weight_decay=0.01
  )

  amp = spec.get("precision", "fp32") == "amp_bf16"

  def train_step() -> float:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
      outputs = model(image, text)
      outputs.pop("logit_bias", None)
      clip_loss, caption_loss = loss_fn(**outputs)
      loss = clip_loss + caption_loss
    loss.backward()
    optimizer.step()
    return loss.item()

  for _ in range(spec["warmup_steps"]):
    first_loss = train_step()
  times = []
  for _ in range(spec["steps"]):
    start = time.perf_counter()
    last_loss = train_step()
    times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  best_step_s = float(np.min(times))
  print(
    json.dumps(
      dict(
        params=params,
        step_s=step_s,
        best_step_s=best_step_s,
        examples_per_s=image.shape[0] / step_s,
        steps=spec["steps"],
        threads=torch.get_num_threads(),
        first_loss=first_loss,
        last_loss=last_loss,
        torch=torch.__version__,
        open_clip=open_clip.__version__,
      )
    )
  )


if __name__ == "__main__":
  main(sys.argv)
