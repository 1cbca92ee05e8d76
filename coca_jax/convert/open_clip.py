"""open_clip's CoCa checkpoints -> coca_jax exports.

    python -m coca_jax.convert open_clip --model=coca_ViT-B-32 \
        --checkpoint=open_clip_model.safetensors --output=DIR [--vocab=FILE] [--dtype=float32]
    python -m coca_jax.convert open_clip --model=coca_ViT-B-32 --random_init --seed=0 \
        [--layers=2] [--output=DIR]

The first form reads `open_clip_model.safetensors` with safetensors' NumPy reader (torch
is not imported) or `open_clip_pytorch_model.bin` (torch imported for that only), maps
every key to the coca_jax parameter tree of configs/open_clip/<model>.py and writes a
normal export (`coca_jax.export.write`) with open_clip's BPE vocabulary
(`bpe_simple_vocab_16e6.txt.gz`: --vocab, else next to the checkpoint, else inside the
installed open_clip package). A missing key, an unexpected key or a shape mismatch is an
error naming the key (and both shapes); nothing is written then.

The second form builds open_clip's model with random weights, converts its state dict
and prints the differences of the two models' outputs (coca_jax/convert/open_clip_parity.py;
needs torch and open_clip, the `[open_clip]` extra).

Legend: D width, D_v ViT width, H heads, K head width (D = H * K), F MLP width, P patch
size, V vocabulary, E joint embedding width, i layer.

    open_clip key (torch Linear weights are [out, in])      coca_jax parameter
    visual.conv1.weight [D_v, 3, P, P]                      vision/patch_embedding/kernel
                                                              [P*P*3, D_v]
    visual.class_embedding [D_v]                            vision/class_embedding
    visual.positional_embedding [1 + G*G, D_v]              row 0: vision/class_pos_embedding,
                                                            rows 1..: vision/pos_embedding
    visual.ln_pre                                           vision/pre_norm
    visual.transformer.resblocks.i.{ln_1, attn, ln_2, mlp}  vision/blocks/layers/{self_norm,
                                                            self_attention, mlp_norm, mlp}[i]
    visual.attn_pool.{query, ln_q, ln_k, attn}              caption_pooler/{queries, query_norm,
                                                            input_norm, attention}
    visual.ln_post                                          caption_pooler/norm
    visual.proj [D, E] (x @ proj)                           image_projection/kernel
    text.token_embedding.weight, positional_embedding,      text/token_embedding, pos_embedding,
      cls_emb                                                 cls_embedding
    text.transformer.resblocks.i.*                          text/unimodal/layers/*[i]
    text.ln_final                                           text/cls_norm
    text.text_projection [D, E]                             text_projection/kernel
    text_decoder.resblocks.i.{ln_1, attn, ln_2, mlp}        text/multimodal/layers/{self_norm,
                                                            self_attention, self_mlp_norm,
                                                            self_mlp}[i]
    text_decoder.cross_attn.i.{ln_1, ln_1_kv, attn, ln_2,   text/multimodal/layers/{cross_norm,
      mlp}                                                  cross_kv_norm, cross_attention,
                                                            mlp_norm, mlp}[i]
    text_decoder.ln_final                                   text/final_norm
    text_decoder.text_projection [D, V]                     text/vocab_projection/kernel
    logit_scale []                                          log_inv_temperature

An attention's `in_proj_weight` [3D, D] (or `q/k/v_proj_weight`) splits into query, key,
value [D_in, H, K]; `in_proj_bias` into query_bias, key_bias, value_bias [H, K];
`out_proj.weight` [D, D] -> out [H, K, D]. LayerNorm weight/bias -> scale/bias; MLP
c_fc / c_proj -> up / down.
"""

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import sys
import time
from typing import Callable, Mapping

import numpy as np
from absl import flags

from coca_jax import config as config_lib
from coca_jax.data import clip_bpe
from coca_jax.data import vocab as vocab_lib

# open_clip model name -> config file under <repo>/configs/open_clip/.
MODELS = {"coca_ViT-B-32": "coca_vit_b32.py", "coca_ViT-L-14": "coca_vit_l14.py"}
CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs" / "open_clip"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# Checkpoint files as the hub repositories name them; --checkpoint may also be a directory.
CHECKPOINT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class ConversionError(ValueError):
  """The checkpoint does not fit the model: names the keys (and shapes) at fault."""


# ---------------------------------------------------------------------------------------
# Configs.


def load_config(model: str, config_file: str | None = None, layers: int | None = None):
  """The coca_jax config of an open_clip model (configs/open_clip/<model>.py, or
  `config_file`, which takes the config files' switches after a colon, FILE:bf16);
  `layers` replaces the depth of the ViT, text tower and decoder (tests)."""
  arg = None
  if config_file is None:
    if model not in MODELS:
      raise ValueError(f"unknown open_clip model {model!r}; known: {sorted(MODELS)}")
    config_file = CONFIG_DIR / MODELS[model]
  elif ":" in os.fspath(config_file):
    config_file, arg = os.fspath(config_file).split(":", 1)
  path = pathlib.Path(config_file)
  if not path.exists():
    raise FileNotFoundError(
      f"config file {path} not found (the repository's configs/open_clip/; or pass --config)"
    )
  config_lib.configs_importable()
  spec = importlib.util.spec_from_file_location(f"open_clip_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  if layers:
    config.model.vision.layers = layers
    config.model.text.unimodal_layers = layers
    config.model.text.multimodal_layers = layers
  check_layout(config.model)
  return config


# The layout options a model must have for open_clip's checkpoints (config.open_clip_layout).
LAYOUT = {
  "gelu_approximate": False,
  "attention_key_bias": True,
  "vision.class_token": True,
  "vision.pre_norm": True,
  "vision.final_norm": False,
  "vision.patch_bias": False,
  "text.cls_position": True,
  "text.mask_mode": "open_clip_legacy",
  "text.multimodal_block": "split",
  "text.vocab_bias": False,
}


def check_layout(model_config) -> None:
  """Raises unless the model config has open_clip's layout (`config.open_clip_layout`)."""
  wrong = {
    name: config_lib.model_option(model_config, name)
    for name, value in LAYOUT.items()
    if config_lib.model_option(model_config, name) != value
  }
  if model_config.pooler.mode != "single":
    wrong["pooler.mode"] = model_config.pooler.mode
  if model_config.vision.pos_embedding != "learned":
    wrong["vision.pos_embedding"] = model_config.vision.pos_embedding
  if wrong:
    raise ConversionError(
      f"config.model is not open_clip's layout: {wrong}; build it with "
      "coca_jax.config.open_clip_layout (configs/open_clip/)"
    )


# ---------------------------------------------------------------------------------------
# The key map. Transforms use only methods and slicing, so they run on NumPy arrays
# (conversion) and on abstract values (shape checks without weights) alike.


@dataclasses.dataclass(frozen=True)
class Target:
  """Where (part of) an open_clip tensor goes: a coca_jax parameter path, the layer
  index within a scanned stack (None for an unstacked parameter), and the transform."""

  path: tuple[str, ...]
  layer: int | None
  transform: Callable


@dataclasses.dataclass(frozen=True)
class Source:
  """One open_clip state-dict entry: its shape and where it goes."""

  shape: tuple[int, ...]
  targets: tuple[Target, ...]


def _same(x):
  return x


def _transpose(x):
  return x.T


def _rows(start, stop, then=_same):
  return lambda x: then(x[start:stop])


def _heads_in(heads):
  """torch [H*K, D_in] -> [D_in, H, K]."""
  return lambda w: w.T.reshape(w.shape[1], heads, w.shape[0] // heads)


def _heads_out(heads):
  """torch out_proj [D, H*K] -> [H, K, D]."""
  return lambda w: w.T.reshape(heads, w.shape[1] // heads, w.shape[0])


def _heads_bias(heads):
  """[H*K] -> [H, K]."""
  return lambda b: b.reshape(heads, b.shape[0] // heads)


def _patch_kernel(w):
  """conv1 OIHW [D, 3, P, P] -> [P*P*3, D] in vit.patchify's (row, column, channel) order."""
  return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


class _KeyMap:
  """Builds {open_clip key: Source}."""

  def __init__(self):
    self.sources: dict[str, Source] = {}

  def add(self, key, shape, *targets):
    self.sources[key] = Source(tuple(shape), tuple(targets))

  def norm(self, key, path, width, layer=None):
    self.add(f"{key}.weight", (width,), Target((*path, "scale"), layer, _same))
    self.add(f"{key}.bias", (width,), Target((*path, "bias"), layer, _same))

  def linear(self, key, path, in_dim, out_dim, layer=None):
    self.add(f"{key}.weight", (out_dim, in_dim), Target((*path, "kernel"), layer, _transpose))
    self.add(f"{key}.bias", (out_dim,), Target((*path, "bias"), layer, _same))

  def mlp(self, key, path, width, mlp_dim, layer):
    self.linear(f"{key}.c_fc", (*path, "up"), width, mlp_dim, layer)
    self.linear(f"{key}.c_proj", (*path, "down"), mlp_dim, width, layer)

  def attention(self, key, path, width, heads, layer=None, kv_width=None):
    """nn.MultiheadAttention: packed in_proj_weight, or q/k/v_proj_weight when the keys
    and values are `kv_width` wide."""
    kernel, bias = _heads_in(heads), _heads_bias(heads)
    if kv_width is None:
      w = width
      self.add(
        f"{key}.in_proj_weight",
        (3 * w, w),
        Target((*path, "query"), layer, _rows(0, w, kernel)),
        Target((*path, "key"), layer, _rows(w, 2 * w, kernel)),
        Target((*path, "value"), layer, _rows(2 * w, 3 * w, kernel)),
      )
    else:
      self.add(f"{key}.q_proj_weight", (width, width), Target((*path, "query"), layer, kernel))
      self.add(f"{key}.k_proj_weight", (width, kv_width), Target((*path, "key"), layer, kernel))
      self.add(f"{key}.v_proj_weight", (width, kv_width), Target((*path, "value"), layer, kernel))
    w = width
    self.add(
      f"{key}.in_proj_bias",
      (3 * w,),
      Target((*path, "query_bias"), layer, _rows(0, w, bias)),
      Target((*path, "key_bias"), layer, _rows(w, 2 * w, bias)),
      Target((*path, "value_bias"), layer, _rows(2 * w, 3 * w, bias)),
    )
    self.add(f"{key}.out_proj.weight", (w, w), Target((*path, "out"), layer, _heads_out(heads)))
    self.add(f"{key}.out_proj.bias", (w,), Target((*path, "out_bias"), layer, _same))

  def residual_block(self, key, path, width, heads, mlp_dim, layer, names):
    """open_clip's ResidualAttentionBlock: ln_1, attn, ln_2, mlp -> `names` (4 names)."""
    norm1, attn, norm2, mlp = names
    self.norm(f"{key}.ln_1", (*path, norm1), width, layer)
    self.attention(f"{key}.attn", (*path, attn), width, heads, layer)
    self.norm(f"{key}.ln_2", (*path, norm2), width, layer)
    self.mlp(f"{key}.mlp", (*path, mlp), width, mlp_dim, layer)


SELF_BLOCK = ("self_norm", "self_attention", "mlp_norm", "mlp")
DECODER_SELF_BLOCK = ("self_norm", "self_attention", "self_mlp_norm", "self_mlp")
DECODER_CROSS_BLOCK = ("cross_norm", "cross_attention", "mlp_norm", "mlp")


def key_map(model_config) -> dict[str, Source]:
  """{open_clip state-dict key: Source} for a model config of open_clip's layout."""
  check_layout(model_config)
  m = model_config
  width, heads = m.width, m.heads
  vision_width = config_lib.model_option(m, "vision.width") or width
  vision_heads = config_lib.model_option(m, "vision.heads") or heads
  pooler_heads = config_lib.model_option(m, "pooler.heads") or heads
  v, t = m.vision, m.text
  grid = v.image_size // v.patch_size
  km = _KeyMap()

  # Image tower.
  km.add(
    "visual.conv1.weight",
    (vision_width, 3, v.patch_size, v.patch_size),
    Target(("vision", "patch_embedding", "kernel"), None, _patch_kernel),
  )
  km.add(
    "visual.class_embedding", (vision_width,), Target(("vision", "class_embedding"), None, _same)
  )
  km.add(
    "visual.positional_embedding",
    (grid * grid + 1, vision_width),
    Target(("vision", "class_pos_embedding"), None, lambda x: x[0]),
    Target(("vision", "pos_embedding"), None, lambda x: x[1:]),
  )
  km.norm("visual.ln_pre", ("vision", "pre_norm"), vision_width)
  for i in range(v.layers):
    km.residual_block(
      f"visual.transformer.resblocks.{i}",
      ("vision", "blocks", "layers"),
      vision_width,
      vision_heads,
      v.mlp_dim,
      i,
      SELF_BLOCK,
    )
  pooler = ("caption_pooler",)
  km.add(
    "visual.attn_pool.query",
    (m.pooler.caption_queries, width),
    Target((*pooler, "queries"), None, _same),
  )
  km.attention(
    "visual.attn_pool.attn", (*pooler, "attention"), width, pooler_heads, kv_width=vision_width
  )
  km.norm("visual.attn_pool.ln_q", (*pooler, "query_norm"), width)
  km.norm("visual.attn_pool.ln_k", (*pooler, "input_norm"), vision_width)
  km.norm("visual.ln_post", (*pooler, "norm"), width)
  km.add("visual.proj", (width, m.embed_dim), Target(("image_projection", "kernel"), None, _same))

  # Text tower.
  km.add(
    "text.token_embedding.weight",
    (t.vocab_size, width),
    Target(("text", "token_embedding"), None, _same),
  )
  km.add(
    "text.positional_embedding",
    (t.max_len + 1, width),
    Target(("text", "pos_embedding"), None, _same),
  )
  km.add("text.cls_emb", (width,), Target(("text", "cls_embedding"), None, _same))
  for i in range(t.unimodal_layers):
    km.residual_block(
      f"text.transformer.resblocks.{i}",
      ("text", "unimodal", "layers"),
      width,
      heads,
      t.mlp_dim,
      i,
      SELF_BLOCK,
    )
  km.norm("text.ln_final", ("text", "cls_norm"), width)
  km.add(
    "text.text_projection", (width, m.embed_dim), Target(("text_projection", "kernel"), None, _same)
  )

  # Multimodal decoder.
  decoder = ("text", "multimodal", "layers")
  for i in range(t.multimodal_layers):
    km.residual_block(
      f"text_decoder.resblocks.{i}", decoder, width, heads, t.mlp_dim, i, DECODER_SELF_BLOCK
    )
    km.residual_block(
      f"text_decoder.cross_attn.{i}", decoder, width, heads, t.mlp_dim, i, DECODER_CROSS_BLOCK
    )
    km.norm(f"text_decoder.cross_attn.{i}.ln_1_kv", (*decoder, "cross_kv_norm"), width, i)
  km.norm("text_decoder.ln_final", ("text", "final_norm"), width)
  km.add(
    "text_decoder.text_projection",
    (width, t.vocab_size),
    Target(("text", "vocab_projection", "kernel"), None, _same),
  )
  km.add("logit_scale", (), Target(("log_inv_temperature",), None, _same))
  return km.sources


# ---------------------------------------------------------------------------------------
# Checks and conversion.


def _listing(keys, limit=8) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def check_keys(shapes: Mapping[str, tuple[int, ...]], model_config) -> dict[str, Source]:
  """Checks an open_clip state dict's keys and shapes ({key: shape}, no weights needed)
  against the model config; returns the key map. Raises ConversionError naming every
  missing key, unexpected key and mismatched shape."""
  sources = key_map(model_config)
  missing = set(sources) - set(shapes)
  unexpected = set(shapes) - set(sources)
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
  mismatched = [
    f"{key}: checkpoint {tuple(shapes[key])} vs model {sources[key].shape}"
    for key in sorted(set(sources) & set(shapes))
    if tuple(shapes[key]) != sources[key].shape
  ]
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched[:8]))
  if problems:
    raise ConversionError(
      "the open_clip checkpoint does not fit config.model "
      f"(layers: vision {model_config.vision.layers}, text "
      f"{model_config.text.unimodal_layers}, decoder {model_config.text.multimodal_layers}): "
      + "; ".join(problems)
    )
  return sources


def abstract_params(model_config) -> dict:
  """{path tuple: ShapeDtypeStruct} of the coca_jax parameters of a model config."""
  import jax

  from coca_jax import params as params_lib

  tree = params_lib.abstract(model_config)
  return {
    params_lib.path_names(path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def check_targets(sources: Mapping[str, Source], model_config) -> None:
  """Every coca_jax parameter is written exactly once (every layer of a stack) with the
  shape it has; raises ConversionError naming the key and parameter otherwise. Shapes
  only (jax.eval_shape of the transforms)."""
  import jax

  targets = abstract_params(model_config)
  written: dict[tuple, set] = {path: set() for path in targets}
  problems = []
  for key, source in sources.items():
    value = jax.ShapeDtypeStruct(source.shape, np.float32)
    for target in source.targets:
      if target.path not in targets:
        problems.append(f"{key} -> {'/'.join(target.path)}: no such coca_jax parameter")
        continue
      want = targets[target.path].shape
      if target.layer is not None:
        want = want[1:]
      got = jax.eval_shape(target.transform, value).shape
      if tuple(got) != tuple(want):
        problems.append(
          f"{key} -> {'/'.join(target.path)}: converted {tuple(got)} vs parameter {tuple(want)}"
        )
      slot = target.layer if target.layer is not None else -1
      if slot in written[target.path]:
        problems.append(f"{key} -> {'/'.join(target.path)}[{slot}] written twice")
      written[target.path].add(slot)
  for path, slots in written.items():
    expect = set(range(targets[path].shape[0])) if _is_stacked(path) else {-1}
    if slots != expect:
      problems.append(f"{'/'.join(path)}: layers {sorted(expect - slots)} not written")
  if problems:
    raise ConversionError("key map does not cover the model: " + "; ".join(problems[:8]))


def _is_stacked(path: tuple[str, ...]) -> bool:
  """Parameters of a scanned layer stack (models.layers.LayerStack) have a layer axis."""
  return "layers" in path


def convert(state_dict: Mapping[str, np.ndarray], model_config) -> dict:
  """An open_clip CoCa state dict ({key: array}, float) -> coca_jax params, a nested
  dict of float32 NumPy arrays in the tree of `coca.build(model_config)`."""
  sources = check_keys({k: np.shape(v) for k, v in state_dict.items()}, model_config)
  check_targets(sources, model_config)
  params = {
    path: np.zeros(leaf.shape, np.float32) for path, leaf in abstract_params(model_config).items()
  }
  for key, source in sources.items():
    value = np.asarray(state_dict[key], np.float32)
    for target in source.targets:
      converted = np.asarray(target.transform(value), np.float32)
      if target.layer is None:
        params[target.path][...] = converted
      else:
        params[target.path][target.layer] = converted
  nested: dict = {}
  for path, value in params.items():
    node = nested
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return nested


# ---------------------------------------------------------------------------------------
# Files.


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  """open_clip's state dict as {key: float32 NumPy array}: `.safetensors` through
  safetensors' NumPy reader (no torch), anything else through torch.load (weights only).
  A directory means the hub's file in it (CHECKPOINT_FILES, safetensors first)."""
  path = pathlib.Path(path)
  if path.is_dir():
    found = [path / name for name in CHECKPOINT_FILES if (path / name).exists()]
    if not found:
      raise FileNotFoundError(f"no {' or '.join(CHECKPOINT_FILES)} in {path}")
    path = found[0]
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} not found")
  try:
    state = _read_state(path)
  except Exception as e:  # safetensors', torch's and pickle's errors name neither file nor cause
    raise ConversionError(
      f"{path} is not a readable open_clip checkpoint ({type(e).__name__}: {e}); a truncated "
      "download or another kind of file"
    ) from e
  # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module.") :]: v for k, v in state.items()}
  return {k: np.asarray(v, np.float32) for k, v in state.items()}


def _read_state(path: pathlib.Path) -> dict:
  """The state dict of a `.safetensors` file or a torch pickle, as NumPy arrays."""
  if path.suffix == ".safetensors":
    import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy: bf16 files read too)
    from safetensors.numpy import load_file

    return load_file(os.fspath(path))
  import torch  # only for torch pickles

  state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
  if isinstance(state, dict) and "state_dict" in state:
    state = state["state_dict"]
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def find_vocab(checkpoint: str | None, vocab: str | None = None) -> str:
  """open_clip's BPE file: `vocab`, else one next to the checkpoint, else the installed
  open_clip package's (found without importing open_clip, hence torch)."""
  if vocab:
    if not os.path.exists(vocab):
      raise FileNotFoundError(f"--vocab={vocab} not found")
    return vocab
  candidates = []
  if checkpoint:
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
    candidates.append(os.path.join(folder or ".", BPE_FILE))
  spec = importlib.util.find_spec("open_clip")
  if spec is not None and spec.submodule_search_locations:
    candidates += [os.path.join(p, BPE_FILE) for p in spec.submodule_search_locations]
  for candidate in candidates:
    if os.path.exists(candidate):
      return candidate
  raise FileNotFoundError(
    f"open_clip's vocabulary {BPE_FILE} not found (looked at {candidates}); pass --vocab=FILE "
    "(it ships inside the open_clip package: pip install open-clip-torch)"
  )


def write_export(params: dict, config, output: str, dtype: str, vocab_file: str) -> None:
  """A normal coca_jax export (export.write stages it and replaces `output` only when
  complete)."""
  from coca_jax import export

  export.write(params, config, output, dtype, vocab_file)


def convert_checkpoint(
  model: str,
  checkpoint: str,
  output: str,
  *,
  vocab: str | None = None,
  dtype: str = "float32",
  config_file: str | None = None,
  layers: int | None = None,
) -> dict:
  """Reads, converts and exports one checkpoint; returns a summary (the CLI's JSON line).
  `layers`: a reduced-depth model (tests)."""
  from coca_jax import export

  start = time.perf_counter()
  export.check_dtype(dtype)
  config = load_config(model, config_file, layers)
  vocab_file = find_vocab(checkpoint, vocab)
  # open_clip's CoCa reads CLIP's BPE; any other file had been copied into the export,
  # which then loaded with the wrong tokenizer (a SentencePiece model: captions of noise)
  # or failed only when loaded (a truncated merges file).
  if not vocab_lib.is_clip_bpe(vocab_file):
    raise ConversionError(
      f"vocabulary {vocab_file}: open_clip's models read CLIP's BPE merges ({BPE_FILE}, "
      "a .txt.gz file, in the open_clip package), not this file"
    )
  clip_bpe.read_merges(vocab_file)
  export.check_destination(output, vocab_file, config)  # before reading the checkpoint
  state = read_checkpoint(checkpoint)
  params = convert(state, config.model)
  del state
  write_export(params, config, output, dtype, vocab_file)
  return dict(
    model=model,
    output=os.fspath(output),
    dtype=dtype,
    params=int(sum(math.prod(np.shape(x)) for x in _leaves(params))),
    vocab=vocab_file,
    seconds=round(time.perf_counter() - start, 1),
  )


def _leaves(tree):
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _leaves(value)
  else:
    yield tree


# ---------------------------------------------------------------------------------------
# CLI.


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  from coca_jax import export

  flags.DEFINE_enum("model", None, sorted(MODELS), "open_clip model name.", flag_values=flag_values)
  flags.DEFINE_string(
    "checkpoint",
    None,
    "open_clip_model.safetensors or open_clip_pytorch_model.bin (or their directory).",
    flag_values=flag_values,
  )
  flags.DEFINE_string("output", None, "Export directory to write.", flag_values=flag_values)
  flags.DEFINE_string(
    "vocab",
    None,
    f"{BPE_FILE} (default: next to the checkpoint, else the installed open_clip's).",
    flag_values=flag_values,
  )
  flags.DEFINE_enum(
    "dtype", "float32", export.DTYPES, "Dtype of the exported params.", flag_values=flag_values
  )
  flags.DEFINE_string(
    "config", None, "Config file (default: configs/open_clip/<model>.py).", flag_values=flag_values
  )
  flags.DEFINE_bool(
    "random_init",
    False,
    "Build open_clip's model with random weights and check parity (needs torch + open_clip).",
    flag_values=flag_values,
  )
  flags.DEFINE_integer("seed", 0, "Seed of --random_init.", flag_values=flag_values)
  flags.DEFINE_integer(
    "layers",
    0,
    "Depth of the ViT, text tower and decoder (0: the model's); for tests.",
    flag_values=flag_values,
  )


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  from absl import app

  from coca_jax import console

  if flag_values.random_init:
    # torch's vision ops crash (SIGSEGV) when imported after TensorFlow, which
    # console.quiet imports: torch first.
    import open_clip  # noqa: F401
  console.quiet()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flag_values
  if not f.model:
    raise app.UsageError("--model is required")
  # Flags of the other mode were silently ignored.
  unused = ("checkpoint", "vocab", "dtype") if f.random_init else ("seed",)
  unused = [f"--{name}" for name in unused if f[name].present]
  if unused:
    mode = "with --random_init" if f.random_init else "without --random_init"
    raise app.UsageError(f"{', '.join(unused)}: not used {mode}")
  if f.random_init:
    from coca_jax.convert import open_clip_parity

    summary = open_clip_parity.run(
      f.model, seed=f.seed, layers=f.layers or None, output=f.output, config_file=f.config
    )
    print(json.dumps(summary))
    return 0 if summary["parity"] else 1  # scripts see a failed parity check
  if not f.checkpoint or not f.output:
    raise app.UsageError("--checkpoint and --output are required (or --random_init)")
  try:
    summary = convert_checkpoint(
      f.model,
      f.checkpoint,
      f.output,
      vocab=f.vocab,
      dtype=f.dtype,
      config_file=f.config,
      layers=f.layers or None,
    )
  except (FileNotFoundError, FileExistsError, ValueError) as e:  # ConversionError included
    sys.exit(f"error: {e}")
  print(json.dumps(summary))
  return 0
