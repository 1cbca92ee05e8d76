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
  ("kv", None),
  ("length", None),
  ("layers", None),
  ("queries", None),
  ("joint", None),
  ("patch", None),
  ("norm", None),
)

SWITCHES = ("bf16", "f32", "parallel", "res576")

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
  m.width = width
  m.heads = heads
  m.embed_dim = embed_dim  # width of the joint image-text embedding space
  m.dtype = dtype  # compute dtype; params and optimizer state are always float32
  m.remat_policy = "nothing_saveable"  # see coca_jax/models/layers.py REMAT_POLICIES
  m.scan_layers = True
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
  # Learnable temperature tau, stored as log(1/tau); the optimizer clamps it after each
  # update so tau stays in [1/100, 1] (CLIP clamps its logit scale at 100).
  m.temperature = ml_collections.ConfigDict(dict(init=0.07, min=0.01, max=1.0))
  # VQA head (Section 4.3; coca_jax/models/vqa.py): a new 1-query attentional pooler over
  # the multimodal decoder's outputs + a linear classifier over the top-`num_answers`
  # training answers. 0 = no head (pretraining).
  m.vqa = ml_collections.ConfigDict(dict(num_answers=0))
  # Video head (Section 4.2; coca_jax/models/video.py): a new 1-query attentional pooler
  # over all frames' image tokens (space x time) + a linear classifier over
  # `num_classes` classes. 0 = no head (pretraining); zero-shot video needs none.
  m.video = ml_collections.ConfigDict(dict(num_classes=0))

  # ---- loss (Section 3.3: L = lambda_con * L_con + lambda_cap * L_cap) ----
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
      # Substrings of parameter paths that get no weight decay.
      no_decay=("bias", "scale", "temperature", "pos_embedding", "cls_embedding"),
      update_clip=1.0,  # Adafactor's update clipping threshold
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
      eval_steps=10,
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
        tfds_name="coca_emoji:1.0.0",
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
        # Horizontal flips in training; off for the demo (emoji names say "left").
        flip=True,
        # Eval / serving resize of the shorter side before the center crop: "bilinear"
        # (coca_jax's own models) or "bicubic" (open_clip's preprocessing).
        resize="bilinear",
      ),
      # VQA (source "vqa", coca_jax/data/vqa.py): TFRecords of tf.train.Examples with
      # `image` (encoded bytes), `question` (string) and `answers` (strings, one per
      # human annotator; repeats count). "" = the offline demo VQA set built from the
      # demo sources' labels. Answer vocabulary: the top model.vqa.num_answers answers
      # of the training files.
      vqa=dict(
        task_name="vqa",
        files="",
        eval_files="",
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
      # Decode/augment parallelism of tf.data (AUTOTUNE = -1).
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
        method="greedy",  # greedy | beam | sample
        max_length=0,  # 0: config.model.text.max_len
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
