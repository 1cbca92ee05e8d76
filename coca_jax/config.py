"""The one config tree of coca_jax, built from a variant's numbers.

Config files under `configs/` call `coca_config(...)` with the numbers of one row of
Table 1 of the CoCa paper (arXiv 2205.01917) and may change any leaf afterwards. Every
default a test or the demo relies on lives here or in those files.

Config-file argument (`--config=configs/base.py:ARG`): comma-separated switches
  bf16      compute in bfloat16 (params and optimizer state stay float32); the default
            of the paper's variants (base, large, coca)
  f32       compute in float32; the default of the demo and tiny configs
  parallel  poolers in "parallel" mode instead of the paper's "cascade"
  res576    the paper's final high-resolution epoch: 576px images, same patch size
"""

import os
import pathlib
import sys

import ml_collections

# Logical axis -> mesh axes. FSDP shards `embed` over "fsdp"; tensor parallelism shards
# `mlp`, `heads` and `vocab` over "tensor"; the batch is split over ("data", "fsdp").
# Unlisted logical names (and `None`) are replicated.
SHARDING_RULES = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  # Activations are split over the batch only; their width stays whole.
  ("activation_embed", None),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("vocab", "tensor"),
  # Task classes of the VQA, video and frozen-probe classifiers: replicated. Their counts
  # are the dataset's (VQA v2: 3,129 answers), which a tensor axis rarely divides, and a
  # [D, classes] kernel is small.
  ("classes", None),
  ("kv", None),
  ("length", None),
  ("layers", None),
  ("queries", None),
  ("joint", None),
  ("patch", None),
  ("norm", None),
)

SWITCHES = ("bf16", "f32", "parallel", "res576")
# Parameters only the contrastive loss reads (config.train.frozen patterns): a finetune
# with loss.contrastive_weight = 0 gives them zero gradient and freezes them, so that the
# decoupled weight decay does not shrink them either.
CONTRASTIVE_ONLY = (
  "^contrastive_pooler/",
  "^image_projection/",
  "^text_projection/",
  "^log_inv_temperature$",
  "^text/cls_",
)

# Substrings of parameter paths that get no weight decay (config.optim.no_decay): every
# vector, and the position tables (class_embedding: open_clip's layout's ViT class
# token). They cover every layout coca_jax builds, so one of them may match nothing in
# a given model; any other pattern must match (optim.check_no_decay).
NO_DECAY = ("bias", "scale", "temperature", "pos_embedding", "cls_embedding", "class_embedding")

# Templates of the JFT-style text (Section 4.1); the demo vocabulary is trained on them.
JFT_TEMPLATES = (
  "a photo of the {}.",
  "a photo of a {}.",
  "an image of the {}.",
  "a picture of a {}.",
)

# Prompt ensemble for zero-shot classification (Section 4.2 of the paper uses CLIP's
# ensemble; these are its most generic members, neutral to the image domain).
TEMPLATES = (
  "a photo of a {}.",
  "a photo of the {}.",
  "a picture of a {}.",
  "an image of a {}.",
  "a close-up photo of a {}.",
  "a {}.",
)


# Layout options of the model, the paper's CoCa by default. open_clip's CoCa (its public
# checkpoints: coca_jax/convert, configs/open_clip/) differs in each; `open_clip_layout`
# sets them. Models read them with `model_option`, so a config written before an option
# existed (an older export's config.json) gets the default.
MODEL_OPTIONS = dict(
  # Attention kernel (no parameters): "einsum" (coca_jax/models/layers.py), or
  # jax.nn.dot_product_attention's "xla" or "cudnn" (fused, GPU only); "auto": "cudnn"
  # on GPUs with bfloat16 / float16 compute, else "einsum" (models/coca.py).
  attention="auto",
  # MLP activation: GELU with the tanh approximation (True) or the exact erf form (False).
  gelu_approximate=True,
  # A bias on attention keys. Softmax over keys is invariant to it, so the paper's layout
  # has none (its gradient is rounding noise); open_clip's in_proj_bias holds one.
  attention_key_bias=False,
  vision=dict(
    width=0,  # 0: model.width (the paper's encoder and decoder share it)
    heads=0,  # 0: model.heads
    # A learned class token prepended to the patch tokens, with its own position embedding.
    class_token=False,
    pre_norm=False,  # LayerNorm over the embedded patches before the first block (ln_pre)
    final_norm=True,  # LayerNorm over the output tokens
    patch_bias=True,  # bias of the patch embedding
  ),
  # pooler.mode (set in coca_config, below) also takes "single": ONE attentional pooler
  # whose output 0 is the image embedding (after image_projection) and outputs 1.. the
  # caption tokens.
  pooler=dict(
    heads=0,  # 0: model.heads
  ),
  text=dict(
    # The text position embedding has max_len + 1 rows; row T is added to [CLS] (at T).
    cls_position=False,
    # "paper": text tokens attend causally to real tokens, [CLS] to every real token and
    # itself. "open_clip_legacy": open_clip's CoCa mask: every query (causally) attends
    # key 0 and key j >= 1 iff token j - 1 is not pad, [CLS] included; the multimodal
    # decoder is causal only.
    mask_mode="paper",
    # "fused": a multimodal layer is self-attention, cross-attention, one MLP (the paper).
    # "split": self-attention + MLP, then cross-attention (with a LayerNorm on the image
    # tokens) + a second MLP (open_clip).
    multimodal_block="fused",
    vocab_bias=True,  # bias of the vocabulary projection
    # The token contract (coca_jax/tokens.py): decoder BOS, EOS and padding ids;
    # eos_input: the text rows hold EOS as an input (BOS t1..tn EOS pad ...; labels are
    # the rows shifted by one) instead of EOS being a label only; stop_at_pad: decoding
    # also stops at the pad id (open_clip's generate does: its pad 0 is a real token).
    bos_id=0,
    eos_id=1,
    pad_id=0,
    eos_input=False,
    stop_at_pad=False,
  ),
)


def coca_config(
  *,
  width: int,
  heads: int,
  vision_layers: int,
  vision_mlp: int,
  unimodal_layers: int,
  multimodal_layers: int,
  text_mlp: int,
  embed_dim: int,
  image_size: int = 288,
  patch_size: int = 18,
  vocab_size: int = 64_000,
  max_text_len: int = 64,
  caption_queries: int = 256,
  dtype: str = "float32",
  arg: str | None = None,
) -> ml_collections.ConfigDict:
  """Returns the full config for one CoCa variant; `arg` holds the switches above."""
  c = ml_collections.ConfigDict()

  # ---- model (Table 1; hidden width and heads are shared by encoder and decoder) ----
  c.model = m = ml_collections.ConfigDict()
  m.width = width  # the text decoder's and the poolers' width (and the ViT's, by default)
  m.heads = heads
  m.embed_dim = embed_dim  # width of the joint image-text embedding space
  m.dtype = dtype  # compute dtype; params and optimizer state are always float32
  m.remat_policy = "nothing_saveable"  # see coca_jax/models/layers.py REMAT_POLICIES
  m.scan_layers = True  # False unrolls the layer loop over the same parameters (README)
  m.layer_norm_eps = 1e-6
  m.vision = ml_collections.ConfigDict(
    dict(
      image_size=image_size,
      patch_size=patch_size,
      layers=vision_layers,
      mlp_dim=vision_mlp,
      pos_embedding="learned",  # "learned" or "sincos"
    )
  )
  m.pooler = ml_collections.ConfigDict(
    dict(contrastive_queries=1, caption_queries=caption_queries, mode="cascade")
  )
  m.text = ml_collections.ConfigDict(
    dict(
      vocab_size=vocab_size,
      max_len=max_text_len,
      unimodal_layers=unimodal_layers,
      multimodal_layers=multimodal_layers,
      mlp_dim=text_mlp,
    )
  )
  # Layout options (MODEL_OPTIONS above): the paper's CoCa by default; open_clip's CoCa
  # (configs/open_clip/) sets them with `open_clip_layout`.
  _set_options(m, MODEL_OPTIONS)
  # Learnable temperature tau, stored as log(1/tau); the optimizer clamps it after each
  # update so tau stays in [1/100, 1] (CLIP clamps its logit scale at 100).
  m.temperature = ml_collections.ConfigDict(dict(init=0.07, min=0.01, max=1.0))
  # VQA head (Section 4.3; coca_jax/models/heads.py): a new 1-query attentional pooler over
  # the multimodal decoder's outputs + a linear classifier over the top-`num_answers`
  # training answers. 0 = no head (pretraining).
  m.vqa = ml_collections.ConfigDict(dict(num_answers=0))
  # Video head (Section 4.2; coca_jax/models/heads.py): a new 1-query attentional pooler
  # over all frames' image tokens (space x time) + a linear classifier over
  # `num_classes` classes. 0 = no head (pretraining); zero-shot video needs none.
  m.video = ml_collections.ConfigDict(dict(num_classes=0))

  # ---- loss (Section 3.3: L = lambda_con * L_con + lambda_cap * L_cap) ----
  # L_con is Eq. 1, the sum of both directions' cross-entropies (losses.contrastive_loss);
  # contrastive_weight=0.5 gives open_clip's CoCaLoss, which averages them.
  # vqa_weight: the answer-classification loss (losses.vqa_loss), used only when the model
  # has a VQA head; the captioning loss then runs on the question (an auxiliary term).
  # video_weight: softmax cross-entropy of the video head on video batches (source "video").
  c.loss = ml_collections.ConfigDict(
    dict(contrastive_weight=1.0, caption_weight=2.0, vqa_weight=1.0, video_weight=1.0)
  )

  # ---- optimizer (Section 4.1: Adafactor, beta1 0.9, beta2 0.999, wd 0.01) ----
  c.optim = ml_collections.ConfigDict(
    dict(
      lr=8e-4,
      warmup_fraction=0.02,
      decay="linear",  # "linear" or "cosine", to end_lr_fraction * lr
      end_lr_fraction=0.0,
      beta1=0.9,
      beta2=0.999,
      weight_decay=0.01,
      no_decay=NO_DECAY,  # substrings of parameter paths (above)
      update_clip=1.0,  # Adafactor's update clipping threshold; 0 disables
      grad_clip_norm=0.0,  # global-norm gradient clipping; 0 disables
      factored_min_dim=128,
    )
  )

  # ---- training loop ----
  c.train = ml_collections.ConfigDict(
    dict(
      steps=500_000,
      seed=0,
      grad_accum_steps=1,
      log_every=100,
      eval_every=5_000,
      eval_steps=10,  # batches of held-out losses per evaluation; 0: none
      checkpoint_every=1_000,
      keep_checkpoints=3,
      export_dtype="bfloat16",
      # Device peak FLOP/s for MFU when the device kind is not in the table of
      # coca_jax/flops.py; 0 means "look it up".
      peak_flops=0.0,
      # Start from a pretrained model (coca_jax/init_from.py): an export directory or a
      # training workdir (its newest readable checkpoint, parameters only). "" = fresh
      # init. Ignored when the workdir has a checkpoint of its own (the run resumes).
      init_from="",
      # Parameters of this model that init_from does not read: initialised fresh, as
      # parameters the source lacks are, whatever the source holds for them (e.g. a task
      # head of another size: ("^vqa_head/classifier/",)). Patterns as for `frozen`; a
      # pattern matching nothing is an error, and so is any without init_from.
      init_exclude=(),
      # Parameters that never move: regexes (re.search) or substrings of '/'-joined
      # parameter paths, e.g. ("^vision/",) for the image encoder. They get zero
      # updates and no optimizer state; a pattern matching nothing is an error.
      frozen=(),
    )
  )

  # ---- data: sources, mixture rates, preprocessing, vocabulary ----
  # Defaults describe the offline demo mixture that `python -m coca_jax.data.prepare`
  # builds (Fashion-MNIST as the JFT-style half, emoji alt-text as the other half). For
  # your own data point the task entries at your TFDS datasets (`tfds_name`,
  # `tfds_data_dir`) or set `alt_text.files` to TFRecords of tf.train.Examples with
  # `image` (encoded bytes) and `caption` (string), and set `vocab_path`.
  c.data = ml_collections.ConfigDict(
    dict(
      # "mixture": the seqio mixture of coca_jax/data; "synthetic": random batches of
      # the right shapes (benchmarks, AOT, trainer tests).
      source="mixture",
      global_batch_size=65_536,
      # One source of truth: the pipeline reads the model's image size and text length
      # (tokens incl. BOS for inputs / EOS for labels).
      image_size=m.vision.get_ref("image_size"),
      max_text_len=m.text.get_ref("max_len"),
      # SentencePiece model (pad 0, EOS 1, unk 2); "" = the demo vocabulary built by
      # prepare under data_dir.
      vocab_path="",
      # "" = $COCA_JAX_DATA or ~/.cache/coca_jax: prepare's output and the demo TFDS data dir.
      data_dir="",
      # Build the demo data on first use when it is missing (demo sources only).
      prepare_demo=True,
      seed=0,
      shuffle_buffer=10_000,
      # Mixture rates by task name (Section 4.1: half JFT-style, half alt-text).
      rates=dict(jft_style=0.5, alt_text=0.5),
      jft_style=dict(
        task_name="jft_style",
        tfds_name="coca_fashion_mnist:1.0.0",
        tfds_data_dir="",  # "" = <data_dir>/tfds
        train_split="train",
        eval_split="test",
        # The example's label names, shuffled and joined, fill `{}` of a template
        # drawn at random (Section 4.1: "a photo of the cat, animal").
        templates=JFT_TEMPLATES,
        # Class names (of the source's `label` ClassLabel) whose rows training never reads:
        # the zero-shot eval scores them apart (zero_shot/held_out/*), a truly zero-shot
        # number (the other classes' names are in the training text).
        held_out_classes=(),
      ),
      alt_text=dict(
        task_name="alt_text",
        tfds_name="coca_emoji:1.1.0",
        tfds_data_dir="",
        train_split="train",
        eval_split="validation",
        # A TFRecord pattern (gs:// works) of tf.train.Examples with `image` (encoded
        # bytes) and `caption` (string); replaces the TFDS source when set.
        files="",
        eval_files="",
      ),
      image=dict(
        mean=(0.5, 0.5, 0.5),  # per channel, images in [0, 1] before normalising
        std=(0.5, 0.5, 0.5),
        crop_area=(0.5, 1.0),  # random resized crop: fraction of the image area
        crop_aspect=(3 / 4, 4 / 3),
        # Horizontal flips in training (configs/demo.py turns them off: emoji names say
        # "left" and "right").
        flip=True,
        # The resize filter of the training crop and of the eval / serving resize of the
        # shorter side before the center crop: "bilinear" (coca_jax's own models) or
        # "bicubic" (open_clip's preprocessing).
        resize="bilinear",
      ),
      # VQA (source "vqa", coca_jax/data/vqa.py): TFRecords of tf.train.Examples with
      # `image` (encoded bytes), `question` (string) and `answers` (strings, one per
      # human annotator; repeats count). "" = the offline demo VQA set built from the
      # demo sources' labels.
      vqa=dict(
        task_name="vqa",
        files="",
        eval_files="",
        # The answer vocabulary, the head's classes in order: () = the top
        # model.vqa.num_answers answers of the training files, filled in when a run
        # starts (loader.resolve), so config.json and exports carry it. An export is
        # evaluated with its own; a finetune from it must have the same (init_from).
        answers=(),
        # Demo set size: Fashion-MNIST train images used (of 60,000); every emoji image
        # is used. Eval: the held-out images of both (Fashion-MNIST test, emoji validation).
        demo_fashion_train=6_000,
        demo_fashion_eval=1_000,
      ),
      # Video (source "video", coca_jax/data/video.py): TFRecords of tf.train.Examples with
      # `frames` (a bytes_list of F encoded frames, in time order) and `label` (int64);
      # `class_names`: a text file, line i = the name of label i (zero-shot prompts and
      # reports). "" = the offline demo clips: Fashion-MNIST images under camera motion
      # (pan / zoom / rotation), train clips from train images, eval clips from test images.
      video=dict(
        task_name="video",
        files="",
        eval_files="",
        class_names="",
        # A TFDS video dataset instead of files (e.g. "ucf101/ucf101_1_256:2.0.0"): its
        # `video` feature (a sequence of encoded frames) and `label` ClassLabel, whose
        # names are the class names unless class_names is set.
        tfds_name="",
        tfds_data_dir="",  # "" = TFDS's default data dir
        train_split="train",
        eval_split="test",
        frames=8,  # F: clips are cut or padded (last frame repeated) to F frames
        demo_fashion_train=3_000,
        demo_fashion_eval=500,
      ),
      # Parallel calls of the per-example decode/augment map, the costly one (AUTOTUNE =
      # -1); the record parsing and tokenizing maps before it take AUTOTUNE.
      num_parallel_calls=-1,
      # Keep tf.data from taking every core of a small host away from JAX.
      max_intra_op_parallelism=1,
    )
  )

  # ---- mesh and sharding ----
  c.mesh = default_mesh()
  c.sharding_rules = SHARDING_RULES

  # ---- evaluation: what runs every train.eval_every steps and on exports ----
  c.eval = eval_config()

  _apply_switches(c, arg)
  return c


def eval_config() -> ml_collections.ConfigDict:
  """The `eval` section: what runs every train.eval_every steps and on exports (also the
  base of the benchmark recipes, configs/eval/)."""
  return ml_collections.ConfigDict(
    dict(
      # Comma-separated subset of coca_jax/evaluate/suite.py EVALS: zero_shot,
      # retrieval, captioning, frozen, vqa, video, and the public benchmark recipes
      # imagenet2012, imagenet_v2, cifar10, cifar100, coco, flickr30k (`benchmarks`).
      evals="zero_shot,retrieval,captioning",
      # Evaluate once before the first step too (fresh runs; the reference for a
      # finetune): those metrics are logged as "eval_at_start/<name>".
      at_start=False,
      # Extra keys of the trainer's final JSON line: {name: metric}, metric being a key of
      # that line (e.g. "eval/captioning/cider", "eval_at_start/captioning/cider").
      headline={},
      batch_size=64,  # jitted eval batch; the last batch is padded to it
      num_examples=1_000,  # examples per eval split (0: the whole split)
      zero_shot=dict(templates=TEMPLATES, top_k=(1, 5)),
      retrieval=dict(recall_at=(1, 5, 10)),
      captioning=dict(
        gallery_size=32,  # images in <workdir>/eval/captions_<step>.html
      ),
      decode=dict(
        # greedy | beam | sample. Beam: on the demo's emoji validation (500-step export)
        # CIDEr-D 0.224 vs greedy's 0.180 (BLEU-4 0.085 vs 0.081), 13 s vs 11 s for the
        # 362 images; on the 800-step exports within noise of greedy on CIDEr-D (0.215 vs
        # 0.220; 0.208 vs 0.223 without flips) and ahead on BLEU-4 (0.116 vs 0.092; 0.072
        # vs 0.059) (README).
        method="beam",
        max_length=0,  # 0: config.model.text.max_len
        min_length=0,  # no stop id before this many tokens (open_clip's generate: 5)
        beam_size=4,
        length_penalty=0.6,  # GNMT alpha
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        seed=0,
      ),
      # Frozen-feature evaluation (Section 4.2): a fresh attentional pooler and a
      # softmax classifier trained on frozen image-encoder tokens.
      frozen=dict(
        lr=5e-4,  # the paper's value, cosine schedule
        steps=300,
        batch_size=64,
        weight_decay=0.0,
        train_fraction=0.5,  # of the classification split, when it has no train part
        seed=0,
      ),
      # Public benchmarks (coca_jax/evaluate/benchmarks.py, configs/eval/): datasets users
      # prepare with TFDS (imagenet2012 validation, imagenet_v2 test, cifar10 / cifar100
      # test, coco_captions' Karpathy test split) or own TFRecords (Flickr30k). Zero-shot
      # uses CLIP's class names and prompt templates (coca_jax/data/benchmark_names/).
      benchmarks=dict(
        tfds_data_dir="",  # "" = TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
        # Prompt templates: "" = the dataset's CLIP set (clip80 for ImageNet, clip_cifar
        # for CIFAR), or "clip80", "clip7" (CLIP's 7-template subset), "clip_cifar".
        templates="",
        captioning=True,  # coco / flickr30k: also caption every image (CIDEr-D, BLEU-4)
        # Flickr30k test split: TFRecords of tf.train.Examples with `image` (encoded
        # bytes) and `caption` (a bytes_list, one value per caption).
        flickr30k_files="",
      ),
    )
  )


def default_mesh() -> ml_collections.ConfigDict:
  """The automatic mesh (coca_jax/sharding.py `mesh_shape`): every config's default and
  export's. data = fsdp = -1: fsdp as wide as every fsdp-sharded parameter dimension
  allows, data over the remaining devices. Explicit sizes (one may be -1 = the rest)
  replace it: --config.mesh.data=16 --config.mesh.fsdp=128."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=-1, tensor=1))


def _apply_switches(c: ml_collections.ConfigDict, arg: str | None) -> None:
  for switch in filter(None, (arg or "").split(",")):
    if switch == "bf16":
      c.model.dtype = "bfloat16"
    elif switch == "f32":
      c.model.dtype = "float32"
    elif switch == "parallel":
      c.model.pooler.mode = "parallel"
    elif switch == "res576":
      c.model.vision.image_size = 576
    else:
      raise ValueError(f"unknown config switch {switch!r}; known: {', '.join(SWITCHES)}")


def _set_options(section: ml_collections.ConfigDict, options: dict) -> None:
  """Adds `options` (nested dicts of defaults) to a config section, keeping its keys."""
  for key, value in options.items():
    if isinstance(value, dict):
      if key not in section:
        section[key] = ml_collections.ConfigDict()
      _set_options(section[key], value)
    else:
      section[key] = value


def with_current_rules(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with SHARDING_RULES entries for the logical names its sharding_rules lack:
  a config.json written before a logical axis existed (an older export's) names none of
  it, and the models name it now."""
  names = {name for name, _ in config.sharding_rules}
  missing = tuple(rule for rule in SHARDING_RULES if rule[0] not in names)
  if missing:
    config.sharding_rules = tuple(config.sharding_rules) + missing
  return config


def check_number(value, path: str, in_range, words: str) -> None:
  """ValueError unless `value` (config.<path>) is a number (not a bool) for which
  `in_range` holds; `words` says the range in the message ("must be <words>")."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not in_range(value):
    raise ValueError(f"config.{path}={value!r} must be {words}")


def check_positive(value, path: str, why: str = "") -> None:
  """ValueError unless `value` (config.<path>) is an integer >= 1; `why` follows the
  message."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"config.{path}={value!r} must be an integer >= 1{why}")


def model_option(model_config, name: str):
  """The layout option `name` ("vision.class_token", "gelu_approximate", ...) of a model
  config, or its MODEL_OPTIONS default when the config predates it."""
  *parents, leaf = name.split(".")
  section, defaults = model_config, MODEL_OPTIONS
  for parent in parents:
    section = section.get(parent) if section is not None else None
    defaults = defaults[parent]
  if leaf not in defaults:
    raise KeyError(f"{name!r} is not a model layout option (coca_jax/config.py MODEL_OPTIONS)")
  if section is None or leaf not in section:
    return defaults[leaf]
  return section[leaf]


def open_clip_layout(
  model_config: ml_collections.ConfigDict,
  *,
  vision_width: int,
  vision_heads: int,
  pooler_heads: int,
) -> None:
  """Sets the options that make the model open_clip's CoCa (open_clip 3.3.0,
  coca_model.py / transformer.py), whose checkpoints coca_jax.convert loads:

  * ViT: its own width and heads, a class token, ln_pre, no norm on its output tokens, no
    patch-embedding bias;
  * ONE attentional pooler (mode "single", model.width wide, keys and values from the
    ViT's width, a LayerNorm on its queries); LayerNorm over all its outputs; output 0 ->
    image_projection = the image embedding, outputs 1.. = the decoder's image tokens;
  * text: [CLS] appended with a position of its own, open_clip's legacy padding mask;
    multimodal layers of self-attention + MLP then cross-attention + MLP, causal only;
    no vocabulary bias;
  * exact GELU, LayerNorm eps 1e-5, biases on attention keys;
  * tokens: SOT 49406 (BOS), EOT 49407 (EOS, an input too), pad 0; decoding stops at
    EOT or pad as open_clip's generate does.
  """
  m = model_config
  m.layer_norm_eps = 1e-5
  m.gelu_approximate = False
  m.attention_key_bias = True
  m.vision.update(
    dict(
      width=vision_width,
      heads=vision_heads,
      class_token=True,
      pre_norm=True,
      final_norm=False,
      patch_bias=False,
    )
  )
  m.pooler.mode = "single"
  m.pooler.heads = pooler_heads
  m.pooler.contrastive_queries = 0  # no contrastive pooler: query 0 of the single pooler
  m.text.update(
    dict(
      cls_position=True,
      mask_mode="open_clip_legacy",
      multimodal_block="split",
      vocab_bias=False,
      bos_id=49406,
      eos_id=49407,
      pad_id=0,
      eos_input=True,
      stop_at_pad=True,
    )
  )


# The repository checkout (an editable install, as the README's): its configs/ folder.
REPOSITORY = pathlib.Path(__file__).resolve().parents[1]


def configs_importable() -> None:
  """Puts the repository root on sys.path. Config files import their siblings as
  `configs.<...>` (configs/ is not an installed package), which otherwise works only
  with the repository root as the working directory."""
  root = os.fspath(REPOSITORY)
  if (REPOSITORY / "configs").is_dir() and root not in sys.path:
    sys.path.append(root)


def parse_flags(argv: list[str]) -> list[str]:
  """`app.run(main, flags_parser=parse_flags)` for entry points with a --config file:
  absl's parsing, and a --config.KEY override naming no key of the config fails like any
  other flag error, one line with ml_collections' suggestion ("FATAL Flags parsing
  error: --config override: no key 'stepz'; Did you mean "steps" ..."), where
  ml_collections' AttributeError ended the program in a 50-line traceback."""
  from absl import app

  try:
    return app.parse_flags_with_usage(argv)
  # A missing section is a KeyError, a missing field an AttributeError wrapping one.
  except (AttributeError, KeyError) as e:
    missing = e if isinstance(e, KeyError) else (e.args[0] if e.args else None)
    if not isinstance(missing, KeyError) or not missing.args:
      raise
    detail = "; ".join(str(missing.args[0]).splitlines())
    sys.stderr.write(f"FATAL Flags parsing error: --config override: no key {detail}\n")
    sys.exit(1)
