"""Numerical parity of a converted open_clip CoCa with open_clip itself (random weights).

    python -m coca_jax.convert open_clip --model=coca_ViT-B-32 --random_init --seed=0 --layers=2

Needs torch, open_clip and transformers (the `[open_clip]` extra); the converter itself
does not. Steps:

1. open_clip's model (its JSON config; `layers` replaces the ViT, text tower and decoder
   depth) with every parameter redrawn from `seed`: non-zero biases, LayerNorm scales
   around 1, so a mapping that drops a bias or swaps q/k/v shows.
2. Its state dict -> `open_clip.convert` -> coca_jax params (and an export when `output`
   is given; the coca_jax side then runs from the export loaded back).
3. Both models in float32 on the same inputs: B random images and B real captions
   tokenized by open_clip's tokenizer (one longer than the context, so token 75 is not
   pad and the legacy [CLS] mask's last column is exercised; one with "!", the real token
   that equals pad 0). Compared:
   - image / text embeddings as open_clip returns them (L2-normalised);
   - caption logits at ALL 75 positions open_clip computes (logits[:, :-1], padding
     positions included: both models apply the same masks there);
   - greedy captions of 20 tokens: coca_jax's cached greedy decoding vs open_clip's
     `generate(generation_type="top_k", top_k=1, min_seq_len=0, seq_len=22)` (top-1
     sampling is argmax; seq_len 22 leaves the forced end-of-text at token 21, past the
     20 compared; min_seq_len 0 leaves end-of-text unsuppressed, as min_length 0 does).
"""

import math
import time

import numpy as np

from coca_jax.convert import open_clip as convert_lib

CAPTIONS = (
  "a photo of an ankle boot.",
  "wow! a smiling face with heart-eyes!",
  "a pullover, a shirt and a coat lying on a wooden table next to a pair of sneakers",
  # Longer than open_clip's context of 76 tokens: cut, its last token forced to EOT.
  " ".join(["a grey t-shirt, a blue dress, a black bag and white trousers on a clothes rail"] * 6),
)
BATCH = len(CAPTIONS)
DECODE_TOKENS = 20


def randomize(model, seed: int) -> None:
  """Redraws every parameter of an open_clip model from `seed` (in place)."""
  import torch

  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      parts = name.split(".")
      leaf = parts[-1]
      shape = tuple(param.shape)

      def normal(std, shape=shape):
        return torch.randn(shape, generator=generator) * std

      if name == "logit_scale":
        value = torch.full(shape, math.log(1 / 0.07)) + normal(0.1)
      elif any(p.startswith("ln_") for p in parts[-2:-1]) and leaf == "weight":
        value = 1.0 + normal(0.1)  # LayerNorm scale
      elif leaf.endswith("bias"):
        value = normal(0.05)
      elif leaf in ("proj", "text_projection"):  # used as x @ P: [in, out]
        value = normal(shape[0] ** -0.5)
      elif param.ndim == 1 or "embedding" in leaf or leaf in ("query", "cls_emb"):
        value = normal(0.1 if "positional" in leaf else 0.5)
      else:  # torch Linear / conv weights: [out, in, ...]
        value = normal(math.prod(shape[1:]) ** -0.5)
      param.copy_(value)


def build_open_clip(model_name: str, seed: int, layers: int | None):
  """open_clip's CoCa `model_name` with random weights (eval mode, float32)."""
  import open_clip
  import torch

  torch.manual_seed(seed)
  cfg = open_clip.get_model_config(model_name)
  if cfg is None:
    raise ValueError(f"open_clip has no model config {model_name!r}")
  cfg.pop("custom_text", None)
  if layers:
    for tower in ("vision_cfg", "text_cfg", "multimodal_cfg"):
      cfg[tower]["layers"] = layers
  model = open_clip.CoCa(**cfg)
  randomize(model, seed)
  return model.eval()


def run(
  model_name: str,
  *,
  seed: int = 0,
  layers: int | None = None,
  output: str | None = None,
  config_file: str | None = None,
) -> dict:
  """Builds, converts and compares; returns the summary (the CLI's final JSON line)."""
  import jax
  import jax.numpy as jnp
  import open_clip
  import torch
  from flax import nnx

  from coca_jax import decode, export, tokens
  from coca_jax.bench import threads
  from coca_jax.data import vocab as vocab_lib
  from coca_jax.models import coca

  start = time.perf_counter()
  torch.set_num_threads(threads.usable_cpus())  # the affinity mask, as XLA's thread pool
  config = convert_lib.load_config(model_name, config_file, layers)
  reference = build_open_clip(model_name, seed, layers)
  state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
  params = convert_lib.convert(state, config.model)
  if output:
    convert_lib.write_export(params, config, output, "float32", convert_lib.find_vocab(None, None))
    model, config = export.load_model(output)
  else:
    abstract = nnx.eval_shape(lambda: coca.build(config.model))
    graphdef, _ = nnx.split(abstract)
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))

  # Inputs: random images, real captions through open_clip's tokenizer.
  size = config.model.vision.image_size
  images = np.random.default_rng(seed).standard_normal((BATCH, 3, size, size)).astype(np.float32)
  tokenizer = open_clip.get_tokenizer(model_name)
  text = tokenizer(list(CAPTIONS)).numpy().astype(np.int32)  # [B, 76]
  contract = tokens.Contract.from_config(config)
  # coca_jax's own rows (tokens.py over CLIP's BPE, coca_jax/data/clip_bpe.py): the same.
  bpe = vocab_lib.load(convert_lib.find_vocab(None, None))
  ours = tokens.tokenize(bpe, CAPTIONS, config.model.text.max_len, contract)
  rows_equal = bool(np.array_equal(ours["ids"], text))

  with torch.no_grad():
    out = reference(torch.from_numpy(images), torch.from_numpy(text).long())
  ref = {k: v.numpy() for k, v in out.items() if k in ("image_features", "text_features", "logits")}

  batch = dict(image=images.transpose(0, 2, 3, 1), text=dict(ids=ours["ids"], mask=ours["mask"]))
  got = nnx.jit(lambda m, b: m(b))(model, batch)
  positions = ref["logits"].shape[1]  # 75: open_clip drops the last position
  diffs = dict(
    max_abs_diff_image_embedding=_max_diff(got["image_embedding"], ref["image_features"]),
    max_abs_diff_text_embedding=_max_diff(got["text_embedding"], ref["text_features"]),
    max_abs_diff_logits=_max_diff(got["logits"][:, :positions], ref["logits"]),
  )

  # Greedy captions.
  with torch.no_grad():
    generated = reference.generate(
      torch.from_numpy(images),
      generation_type="top_k",
      top_k=1,
      seq_len=DECODE_TOKENS + 2,
      min_seq_len=0,
    ).numpy()
  reference_tokens = np.full((BATCH, DECODE_TOKENS), contract.pad_id, np.int64)
  body = generated[:, 1 : DECODE_TOKENS + 1]
  reference_tokens[:, : body.shape[1]] = body
  options = decode.DecodeOptions.from_config(
    config, method="greedy", max_length=DECODE_TOKENS, min_length=0
  )
  fn = decode.jit_generate(nnx.graphdef(model), options, cached=True)
  our_tokens = np.asarray(fn(nnx.state(model), jnp.asarray(batch["image"])).tokens)
  tokens_equal = bool(np.array_equal(our_tokens, reference_tokens))

  tolerance = 1e-4
  return dict(
    model=model_name,
    layers=dict(
      vision=config.model.vision.layers,
      text=config.model.text.unimodal_layers,
      decoder=config.model.text.multimodal_layers,
    ),
    seed=seed,
    **diffs,
    logits_positions=f"all {positions} (open_clip's logits[:, :-1], padding included)",
    text_rows_equal=rows_equal,
    greedy_tokens_equal=tokens_equal,
    greedy=(
      f"coca_jax cached greedy ({DECODE_TOKENS} tokens, batch {BATCH}) vs open_clip "
      "generate(generation_type='top_k', top_k=1, min_seq_len=0)"
    ),
    greedy_tokens=our_tokens.tolist(),
    parity=bool(all(d < tolerance for d in diffs.values()) and tokens_equal and rows_equal),
    tolerance=tolerance,
    exported=bool(output),
    seconds=round(time.perf_counter() - start, 1),
  )


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
