"""The evaluation suite the trainer runs every `config.train.eval_every` steps.

    metrics = evaluate.run(predictor, config, step=step, workdir=workdir, writer=writer)

Metric names (all in [0, 1] except CIDEr-D, on pycocoevalcap's x10 scale, and the counts):
  zero_shot/top1, zero_shot/top5            Fashion-MNIST test, prompt ensemble, all
                                            classes (held-out ones included)
  zero_shot/seen/top1, .../top5             with config.data.jft_style.held_out_classes:
                                            the classes training read, among themselves
  zero_shot/held_out/top1                   the held-out classes (no row of theirs is
                                            trained on), among themselves: truly zero-shot
  retrieval/image_to_text_r{1,5,10}         emoji validation images vs captions
  retrieval/text_to_image_r{1,5,10}
  captioning/cider, captioning/bleu4        emoji validation, decoded per config.eval.decode
  frozen/accuracy, frozen/train_accuracy    fresh pooler + classifier on frozen tokens,
                                            trained on Fashion-MNIST train, scored on test
  frozen/train_examples, frozen/test_examples  the probe's example counts
  frozen/from_train_split                   1: trained on the source's train split; 0: on a
                                            config.eval.frozen.train_fraction share of the
                                            eval examples (a source without a train split)
  vqa/accuracy                              the standard VQA accuracy
                                            (data/answers.vqa_score) of the VQA head on
                                            the VQA task's eval files
  vqa/majority_baseline                     always the most frequent training answer
  vqa/question_prior_baseline               each question's most frequent training answer
  vqa/examples                              questions scored
  vqa/unscored_examples                     questions without answers, left out
  video/zero_shot/top1, video/zero_shot/top5  clips of the video task's eval files: the mean
                                            of the frame embeddings vs the class prompts
                                            (the k of config.eval.zero_shot.top_k)
  video/top1                                the video head (a model with one)
  video/chance                              1 / classes
  video/examples                            clips scored
  <benchmark>/...                           the public benchmark recipes
                                            (evaluate/benchmarks.py, configs/eval/):
                                            imagenet2012, imagenet_v2, cifar10, cifar100:
                                            zero_shot/top1, zero_shot/top5, examples;
                                            coco, flickr30k: retrieval/image_to_text_r{1,5,10},
                                            retrieval/text_to_image_r{1,5,10} over all
                                            captions, captioning/cider, captioning/bleu4,
                                            images, texts
"""

import dataclasses
import os
import re
import time

import numpy as np
from absl import logging

from coca_jax import config as config_lib
from coca_jax import predict
from coca_jax.data import eval_sets
from coca_jax.evaluate import benchmarks, captioning, frozen, retrieval, zero_shot
from coca_jax.evaluate import video as video_eval
from coca_jax.evaluate import vqa as vqa_eval

# The demo's and a run's own evals, then the public benchmark recipes (evaluate/benchmarks.py).
EVALS = ("zero_shot", "retrieval", "captioning", "frozen", "vqa", "video", *benchmarks.NAMES)
OWN_DATA = ("vqa", "video", *benchmarks.NAMES)  # evals that read no EvalSets
SAMPLE_CAPTIONS = 4  # logged at each captioning eval


def enabled_evals(eval_config) -> list[str]:
  """The evals config.eval.evals names (a ValueError for an unknown one, or for a
  config.eval.num_examples below 0: numpy's [:-1] dropped the last example)."""
  names = [n.strip() for n in str(eval_config.evals).split(",") if n.strip()]
  unknown = sorted(set(names) - set(EVALS))
  if unknown:
    raise ValueError(f"config.eval.evals names unknown evals {unknown}; known: {', '.join(EVALS)}")
  n = eval_config.num_examples
  if isinstance(n, bool) or not isinstance(n, int) or n < 0:
    raise ValueError(f"config.eval.num_examples={n!r} must be an integer >= 0 (0: all)")
  return names


def check(config, *, data: bool = True) -> None:
  """ValueError (FileNotFoundError for missing benchmark data) naming the config key for
  eval settings that would otherwise stop a training run at its first evaluation, after
  its compile, its steps and a checkpoint, and again at every resume. data=False leaves
  the benchmark data to the caller (the evaluate CLI reads it at once, and names what is
  missing there)."""
  from coca_jax.data import benchmarks as benchmark_data
  from coca_jax.data import tasks

  names = enabled_evals(config.eval)
  config_lib.check_positive(config.eval.batch_size, "eval.batch_size")
  for key in ("zero_shot.top_k", "retrieval.recall_at"):
    section, leaf = key.split(".")
    ks = config.eval[section][leaf]
    if isinstance(ks, (str, int)) or not ks:
      raise ValueError(f"config.eval.{key}={ks!r}: need a tuple of integers >= 1")
    for k in ks:
      config_lib.check_positive(k, f"eval.{key} entry")
  if "zero_shot" in names or "video" in names:
    tasks.check_templates(config.eval.zero_shot.templates, "eval.zero_shot.templates")
  if "vqa" in names and not config.model.vqa.num_answers > 0:
    raise ValueError(
      "config.eval.evals names vqa, but the model has no VQA head "
      f"(config.model.vqa.num_answers={config.model.vqa.num_answers})"
    )
  for name in names if data else ():
    if name in benchmarks.NAMES:
      benchmark_data.check_available(benchmark_data.BENCHMARKS[name], config.eval.benchmarks)


def run(
  predictor: predict.Predictor,
  config,
  *,
  step: int,
  workdir: str | None = None,
  writer=None,
  datasets: eval_sets.EvalSets | None = None,
) -> dict[str, float]:
  """Runs the evals named in config.eval.evals; returns {name: value}.

  predictor: the model's prediction functions (coca_jax.predict). writer: a clu metric
  writer, or None; scalars go to it as "eval/<name>" at `step`. workdir: where the
  caption gallery goes (<workdir>/eval/captions_<step>.html); None skips it. datasets:
  an `EvalSets` (default: the config's, read once by coca_jax.data.eval_sets.load).
  """
  names = enabled_evals(config.eval)
  if not names:
    return {}
  eval_config = config.eval
  # The VQA, video and benchmark evals read their own data; the others share the EvalSets.
  if datasets is None and set(names) - set(OWN_DATA):
    datasets = eval_sets.load(config)
  n = eval_config.num_examples

  metrics, timings = {}, {}
  for name in names:
    start = time.time()
    if name == "zero_shot":
      result = _zero_shot_eval(predictor, _require(datasets.classification, name).take(n), config)
    elif name == "retrieval":
      data = _require(datasets.alt_text, name).take(n)
      texts, owner = data.flat_texts()
      similarity = predictor.embed_images(data.images) @ predictor.embed_texts(texts).T
      result = retrieval.recall_at_k(similarity, owner, eval_config.retrieval.recall_at)
    elif name == "captioning":
      data = _require(datasets.alt_text, name).take(n)
      predictions = predictor.caption(data.images, seed=eval_config.decode.seed)
      result = captioning.score(predictions, data.captions)
      for prediction, references in list(zip(predictions, data.captions))[:SAMPLE_CAPTIONS]:
        logging.info(
          "sample caption at step %d: %r (reference: %r)", step, prediction, references[0]
        )
      if workdir:
        shown = eval_config.captioning.gallery_size
        captioning.write_gallery(
          os.path.join(workdir, "eval", f"captions_{step}.html"),
          data.images[:shown],
          predictions[:shown],
          data.captions[:shown],
          title=f"{data.name} captions at step {step} (CIDEr-D {result['cider']:.3f})",
        )
    elif name == "vqa":
      result = _vqa_eval(predictor, config)
    elif name == "video":
      result = _video_eval(predictor, config)
    elif name in benchmarks.NAMES:
      result = benchmarks.run(predictor, config, name)
    else:  # frozen
      result = _frozen_eval(predictor, datasets, config)
    metrics.update({f"{name}/{k}": v for k, v in result.items()})
    timings[f"{name}/seconds"] = time.time() - start
  if writer is not None:
    writer.write_scalars(step, {f"eval/{k}": v for k, v in {**metrics, **timings}.items()})
    writer.flush()
  return metrics


def _require(dataset, eval_name):
  if dataset is None:
    raise ValueError(f"eval {eval_name!r} is enabled but its dataset was not provided")
  return dataset


def class_groups(config, class_names) -> dict[str, list[int]]:
  """{"seen": [...], "held_out": [...]} class indices when config.data.jft_style names
  held-out classes (training never reads their rows); {} otherwise."""
  held_out = set(config.data.jft_style.get("held_out_classes", ()))
  if not held_out:
    return {}
  unknown = sorted(held_out - set(class_names))
  if unknown:
    raise ValueError(
      f"config.data.jft_style.held_out_classes names {unknown}, not among the classes {class_names}"
    )
  return {
    "seen": [i for i, c in enumerate(class_names) if c not in held_out],
    "held_out": [i for i, c in enumerate(class_names) if c in held_out],
  }


def _zero_shot_eval(predictor: predict.Predictor, data: eval_sets.ClassificationSet, config):
  """Prompt-ensemble zero-shot over all classes ("top1", ...); with held-out classes also
  "seen/top1" (the classes training read, among themselves) and "held_out/top1" (the
  classes it never read, among themselves: the truly zero-shot number)."""
  cfg = config.eval.zero_shot
  classifier = zero_shot.class_embeddings(predictor.embed_texts, data.class_names, cfg.templates)
  embeddings = predictor.embed_images(data.images)
  result = zero_shot.evaluate(embeddings, data.labels, classifier, cfg.top_k)
  for group, classes in class_groups(config, data.class_names).items():
    scores = zero_shot.evaluate_among(embeddings, data.labels, classifier, classes, cfg.top_k)
    result.update({f"{group}/{k}": v for k, v in scores.items()})
    if len(scores) < len(cfg.top_k):
      logging.warning(
        "zero_shot: %s/top-k for k >= %d is not reported: among the group's %d classes "
        "it is always 1",
        group,
        len(classes),
        len(classes),
      )
  return result


def _frozen_eval(predictor: predict.Predictor, datasets: eval_sets.EvalSets, config) -> dict:
  """Trains the probe on the first config.eval.num_examples examples of the classification
  source's train split and scores it on as many of its eval split (the paper's protocol:
  train on the task's training set, report on its held-out set). A source without a train
  split (datasets.classification_train None) falls back to splitting the eval examples:
  a config.eval.frozen.train_fraction share trains, the rest is scored."""
  cfg = config.eval.frozen
  n = config.eval.num_examples
  test = _require(datasets.classification, "frozen").take(n)
  if datasets.classification_train is not None:
    train = datasets.classification_train.take(n)
  else:
    train, test = _split(test, cfg.train_fraction, cfg.seed)
  result = frozen.train_and_score(
    predictor.image_tokens(train.images),
    train.labels,
    predictor.image_tokens(test.images),
    test.labels,
    num_classes=len(test.class_names),
    # The probe pools the image encoder's tokens: the vision tower's head count.
    heads=config_lib.model_option(config.model, "vision.heads") or config.model.heads,
    eps=config.model.layer_norm_eps,
    lr=cfg.lr,
    steps=cfg.steps,
    batch_size=cfg.batch_size,
    weight_decay=cfg.weight_decay,
    seed=cfg.seed,
  )
  logging.info(
    "frozen probe: trained on %d examples of %s, scored on %d of %s",
    len(train.labels),
    train.name,
    len(test.labels),
    test.name,
  )
  return dict(
    result,
    train_examples=float(len(train.labels)),
    test_examples=float(len(test.labels)),
    from_train_split=float(datasets.classification_train is not None),
  )


def _vqa_eval(predictor: predict.Predictor, config) -> dict:
  """The VQA head on the first config.eval.num_examples questions of the VQA eval files."""
  from coca_jax.data import loader, vqa  # TensorFlow: only when this eval runs

  config = loader.resolve(config)
  return vqa_eval.evaluate(
    predictor,
    vqa.eval_sets(config),
    vqa.answer_vocabulary(config.data, config.model.vqa.num_answers),
    vqa.train_questions_and_answers(config.data),
  )


def _video_eval(predictor: predict.Predictor, config) -> dict:
  """Zero-shot and (with a head) the video head on the first config.eval.num_examples
  clips of the video eval files."""
  from coca_jax.data import loader, video  # TensorFlow: only when this eval runs

  config = loader.resolve(config)
  head = config.model.get("video")  # absent from configs of exports made before it existed
  return video_eval.evaluate(
    predictor,
    video.eval_sets(config),
    config.eval.zero_shot.templates,
    has_head=head is not None and head.num_classes > 0,
    top_k=config.eval.zero_shot.top_k,
  )


def _split(
  data: eval_sets.ClassificationSet, train_fraction: float, seed: int
) -> tuple[eval_sets.ClassificationSet, eval_sets.ClassificationSet]:
  """A seeded random split of `data` into (train_fraction of it, the rest)."""
  order = np.random.default_rng(seed).permutation(len(data.labels))
  cut = int(len(order) * train_fraction)
  if not 0 < cut < len(order):
    raise ValueError(
      f"config.eval.frozen.train_fraction={train_fraction} leaves an empty split of "
      f"{len(order)} examples"
    )
  return tuple(
    dataclasses.replace(data, images=data.images[rows], labels=data.labels[rows], name=name)
    for rows, name in (
      (order[:cut], f"{data.name} (train share)"),
      (order[cut:], f"{data.name} (held-out share)"),
    )
  )


def chance_levels(config, datasets: eval_sets.EvalSets) -> dict[str, float]:
  """What a random model scores on the same metrics and splits."""
  n = config.eval.num_examples
  chance = {}
  for name in set(enabled_evals(config.eval)) & set(benchmarks.NAMES):
    chance.update({f"{name}/{k}": v for k, v in benchmarks.chance(config, name).items()})
  if datasets.classification is not None:
    classes = len(datasets.classification.class_names)
    for k, v in zero_shot.chance(classes, config.eval.zero_shot.top_k).items():
      chance[f"zero_shot/{k}"] = v
    groups = class_groups(config, datasets.classification.class_names)
    for group, members in groups.items():
      ks = [k for k in config.eval.zero_shot.top_k if k < len(members)]
      for k, v in zero_shot.chance(len(members), ks).items():
        chance[f"zero_shot/{group}/{k}"] = v
    chance["frozen/accuracy"] = chance["frozen/train_accuracy"] = 1.0 / classes
  if datasets.alt_text is not None:
    data = datasets.alt_text.take(n)
    _, owner = data.flat_texts()
    for k, v in retrieval.chance(
      owner, len(data.captions), config.eval.retrieval.recall_at
    ).items():
      chance[f"retrieval/{k}"] = v
  return chance


def report(metrics: dict[str, float], chance: dict[str, float] | None = None) -> str:
  """A table of metrics with chance levels beside them ("-" where none is defined:
  CIDEr-D and BLEU-4 have no meaningful chance level). An eval that reports its own
  "<eval>/chance" (top-1 of a random guess among its C classes: the video eval) gives its
  top-k metrics k / C."""
  chance = dict(chance or {})
  for key, level in metrics.items():
    if key.endswith("/chance"):
      prefix = key.removesuffix("chance")
      for other in metrics:
        top = re.search(r"top(\d+)$", other)
        if other.startswith(prefix) and top:
          chance.setdefault(other, min(1.0, int(top.group(1)) * level))
  width = max([len(k) for k in metrics] + [6])
  lines = [f"{'metric':<{width}}  {'value':>8}  {'chance':>8}"]
  for key in sorted(metrics):
    level = chance.get(key)
    lines.append(
      f"{key:<{width}}  {metrics[key]:>8.4f}  {'-' if level is None else f'{level:.4f}':>8}"
    )
  return "\n".join(lines)
