"""The PyTorch side of `python benchmarks/open_clip_decode.py`: open_clip's CoCa `generate`.

Runs in a Python with torch, open-clip-torch and transformers (< 4.50), imports nothing
from coca_jax. Reads a JSON spec, builds open_clip's `spec["model"]` from its own JSON
config with open_clip's random init (torch seed 0, float32, eval mode), times
`generate` on random [B, 3, S, S] images, prints one JSON line: {"rows": [{"method",
"batch", "seconds", "tokens", "tokens_per_s"}], "torch", "open_clip", "transformers",
"threads", "params"}.

    python -P benchmarks/open_clip_decode_worker.py SPEC_JSON

Every row decodes exactly `tokens` tokens (`tokens` forward passes of the decoder over
the prefix so far: open_clip keeps no KV cache):
- greedy: generate(generation_type="top_k", top_k=1, seq_len=tokens + 1,
  min_seq_len=tokens, pad_token_id=-1). Top-1 sampling is argmax. min_seq_len suppresses
  end-of-text until the last step, where generate forces it; pad_token_id=-1 (an id no
  step emits) keeps the real token 0 ("!", open_clip's pad) from ending a row early.
- beam: generate(generation_type="beam_search", num_beams=K, num_beam_groups=1,
  seq_len=tokens + 1, min_seq_len=tokens): plain beam search through transformers'
  BeamSearchScorer; open_clip encodes each image once per beam.
(-P keeps this folder off sys.path: benchmarks/open_clip.py would shadow the package.)
"""

import json
import sys
import time

import numpy as np
import open_clip
import torch
import transformers


def generate(model, images, method: str, tokens: int, beam_size: int):
  if method == "beam":
    return model.generate(
      images,
      generation_type="beam_search",
      num_beams=beam_size,
      num_beam_groups=1,
      seq_len=tokens + 1,
      min_seq_len=tokens,
    )
  return model.generate(
    images,
    generation_type="top_k",
    top_k=1,
    seq_len=tokens + 1,
    min_seq_len=tokens,
    pad_token_id=-1,
  )


def main(argv) -> None:
  spec = json.loads(argv[1])
  torch.set_num_threads(spec["threads"])
  torch.manual_seed(0)
  cfg = open_clip.get_model_config(spec["model"])
  cfg.pop("custom_text", None)
  model = open_clip.CoCa(**cfg).eval()
  size = cfg["vision_cfg"]["image_size"]
  runs = [("greedy", b) for b in spec["greedy_batches"]]
  if spec["beam_size"]:
    runs.append(("beam", spec["beam_batch"]))
  rows = []
  for method, batch in runs:
    images = torch.from_numpy(
      np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    )
    # Warm-up: a short generation (allocator, thread pool), not timed.
    generate(model, images, method, 2, spec["beam_size"])
    times, generated = [], 0
    for _ in range(spec["repeats"]):
      start = time.perf_counter()
      out = generate(model, images, method, spec["tokens"], spec["beam_size"])
      times.append(time.perf_counter() - start)
      generated = out.shape[1] - 1  # minus the start-of-text token
    seconds = float(np.median(times))
    rows.append(
      dict(
        method=method,
        batch=batch,
        seconds=seconds,
        tokens=generated,
        tokens_per_s=batch * generated / seconds,
      )
    )
    print(f"open_clip {method} batch {batch}: {seconds:.2f} s", file=sys.stderr, flush=True)
  print(
    json.dumps(
      dict(
        rows=rows,
        params=sum(p.numel() for p in model.parameters()),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        open_clip=open_clip.__version__,
        transformers=transformers.__version__,
      )
    )
  )


if __name__ == "__main__":
  main(sys.argv)
