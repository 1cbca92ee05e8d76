"""Start a run from a pretrained model: an export or another run's checkpoint.

    python -m coca_jax.train --config=configs/TASK.py --workdir=DIR2 \\
        --config.train.init_from=/tmp/coca_demo/export [--config.train.frozen='("^vision/",)'] \\
        [--config.train.init_exclude='("^vqa_head/classifier/",)']

`config.train.init_from` names an export (`DIR/params`, written by coca_jax.export) or a
training workdir (`DIR/checkpoints`: its newest readable step, parameters only). The
parameters of this run's model are matched with the source's by path:
  loaded     in both at the same shape: read straight into this run's shardings (float32)
  resampled  `vision/pos_embedding` stored for another image size: read, then resampled
             with `vit.resize_pos_embedding` (as a resume at 576px does)
  new        only in this model (a task head): initialised fresh, as without init_from
  excluded   matched by config.train.init_exclude (patterns as config.train.frozen's):
             initialised fresh whatever the source holds (same shape, another, none)
  unused     only in the source: not read
A new or excluded parameter that config.train.frozen matches is an error (it would stay
random). Any other difference of shape (vocabulary, width, layer count, text length, a
task head's number of answers or classes) is an error naming the parameters and both
shapes; for a task head, also the config key and value that would load it, and the
init_exclude pattern that trains a new classifier instead. The optimizer state starts
fresh from the loaded parameters, at step 0. The trainer calls `create` only when its
workdir has no checkpoint: a resumed finetune run restores its own state.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from coca_jax import checkpoint, export, optim
from coca_jax import config as config_lib
from coca_jax import params as params_lib
from coca_jax import state as state_lib
from coca_jax.models import coca, vit


@dataclasses.dataclass(frozen=True)
class Report:
  """What `create` took from the source; parameter names are '/'-joined paths."""

  source: str  # "export DIR" or "checkpoint step N of DIR"
  loaded: tuple[str, ...]  # same path, same shape (includes the resampled ones)
  resampled: tuple[str, ...]  # loaded at another shape: the position embedding
  new: tuple[str, ...]  # in this model only (and not excluded): initialised fresh
  excluded: tuple[str, ...]  # matched by config.train.init_exclude: initialised fresh
  unused: tuple[str, ...]  # in the source only

  def log_lines(self) -> list[str]:
    """One line per class; the excluded line only when config.train.init_exclude is set."""
    excluded = f"init_from: excluded (initialised fresh) {len(self.excluded)}: "
    return [
      f"init_from {self.source}: loaded {len(self.loaded)} parameters: {compact(self.loaded)}",
      *[f"init_from: resampled {name} to this image size" for name in self.resampled],
      f"init_from: new (initialised fresh) {len(self.new)}: {compact(self.new)}",
      *([excluded + compact(self.excluded)] if self.excluded else []),
      f"init_from: unused (in the source only) {len(self.unused)}: {compact(self.unused)}",
    ]


def compact(names) -> str:
  """Parameter names grouped by their first component: a group of one is named in full,
  a larger one as `first/* (count)`. "vision/* (17), text_projection/kernel"."""
  groups: dict[str, list[str]] = {}
  for name in sorted(names):
    groups.setdefault(name.split("/")[0], []).append(name)
  return (
    ", ".join(g[0] if len(g) == 1 else f"{top}/* ({len(g)})" for top, g in groups.items()) or "none"
  )


EXCLUDE_KEY = "config.train.init_exclude"

# Task heads whose classifier's output width is a config number, not the pretrained
# model's: (parameter prefix, what it is, config key, what it classifies, what must agree
# for the source's head to mean the same here).
TASK_HEADS = (
  (
    "vqa_head",
    "VQA head",
    "config.model.vqa.num_answers",
    "answers",
    "the same answer vocabulary, i.e. the top answers of the same training files",
  ),
  (
    "video_head",
    "video head",
    "config.model.video.num_classes",
    "classes",
    "the same classes in the same order",
  ),
)


def _head_hints(stored: dict, target: dict) -> tuple[list[str], set]:
  """(hints: one per task head whose classifier has another output width in the source;
  the paths they explain)."""
  hints, explained = [], set()
  for head, title, key, unit, same in TASK_HEADS:
    kernel = (head, "classifier", "kernel")
    if kernel not in stored or kernel not in target:
      continue
    there, here = stored[kernel][-1], target[kernel][-1]
    if there == here:
      continue
    explained |= {kernel, (head, "classifier", "bias")}
    hints.append(
      f"The source's {title} ({head}/*) classifies {there} {unit}, {key}={here} here: to "
      f"load it set {key}={there} (right only with {same}); to train a new classifier of "
      f'{here} {unit}, set {EXCLUDE_KEY}=("^{head}/classifier/",), which initialises it '
      f'fresh and still loads the source\'s pooler (or ("^{head}/",) for a whole new {title}).'
    )
  return hints, explained


def plan(
  stored: dict, target: dict, source: str, frozen=frozenset(), excluded=frozenset()
) -> Report:
  """Classifies parameters by path; raises ValueError on a shape that cannot be adapted,
  and on a frozen parameter that starts fresh (the source lacks it, or config.train.
  init_exclude matches it): it would keep its random init all run.

  stored, target: {path names (tuple): shape} of the source and of this run's model.
  frozen, excluded: '/'-joined names of the parameters config.train.frozen and
  config.train.init_exclude match.
  """
  pos = vit.POS_EMBEDDING_PATH
  loaded, resampled, mismatched = [], [], []
  for path, shape in target.items():
    if path not in stored or "/".join(path) in excluded:
      continue
    if tuple(stored[path]) == tuple(shape):
      loaded.append(path)
    elif path == pos and len(stored[path]) == 2 and stored[path][-1] == shape[-1]:
      loaded.append(path)
      resampled.append(path)
    else:
      mismatched.append(path)
  if mismatched:
    hints, explained = _head_hints(stored, target)
    if set(mismatched) - explained:
      hints.append(
        "Only vision/pos_embedding adapts (to a new image size); vocabulary, widths, "
        f"layer counts and text length must match the source ({EXCLUDE_KEY} initialises "
        "the parameters it matches fresh instead of reading them)."
      )
    shapes = [
      f"{'/'.join(p)} is {tuple(stored[p])} there, {tuple(target[p])} here" for p in mismatched
    ]
    raise ValueError(
      f"config.train.init_from ({source}) does not fit config.model: "
      + "; ".join(shapes)
      + ". "
      + " ".join(hints)
    )

  def names(paths):
    return tuple(sorted("/".join(p) for p in paths))

  new = names(p for p in target if p not in stored and "/".join(p) not in excluded)
  fresh_by_choice = names(p for p in target if "/".join(p) in excluded)
  _check_frozen_are_loaded(new, fresh_by_choice, frozenset(frozen), source)
  return Report(
    source=source,
    loaded=names(loaded),
    resampled=names(resampled),
    new=new,
    excluded=fresh_by_choice,
    unused=names(p for p in stored if p not in target),
  )


def _check_frozen_are_loaded(new, excluded, frozen: frozenset, source: str) -> None:
  """Raises ValueError naming the frozen parameters among the fresh ones (`new`: the
  source lacks them; `excluded`: config.train.init_exclude matches them)."""
  lacking = sorted(frozen.intersection(new))
  dropped = sorted(frozen.intersection(excluded))
  if lacking:
    raise ValueError(
      f"config.train.frozen freezes {compact(lacking)}, which config.train.init_from "
      f"({source}) does not hold: frozen, they would keep their random initialisation for the "
      "whole run. Narrow config.train.frozen, or start from a source that has them "
      f"(for example: {', '.join(lacking[:3])})."
    )
  if dropped:
    raise ValueError(
      f"config.train.frozen freezes {compact(dropped)}, which {EXCLUDE_KEY} initialises "
      "fresh instead of reading them from config.train.init_from: frozen, they would keep "
      f"their random initialisation for the whole run. Narrow config.train.frozen or "
      f"{EXCLUDE_KEY} (both match, for example: {', '.join(dropped[:3])})."
    )


def exclude_patterns(config) -> tuple[str, ...]:
  """config.train.init_exclude (absent from configs written before it existed)."""
  return tuple(config.train.get("init_exclude", ()))


def check_source(config) -> str:
  """ "export" or "workdir": what config.train.init_from is; FileNotFoundError naming it
  when it is neither (the trainer asks before it writes anything)."""
  source = epath.Path(config.train.init_from)
  if (source / "params").exists():
    return "export"
  if (source / "checkpoints").exists():
    return "workdir"
  raise FileNotFoundError(
    f"config.train.init_from={source} is neither an export ({source / 'params'} is "
    f"missing) nor a training workdir ({source / 'checkpoints'} is missing)"
  )


def create(config, run: state_lib.Setup) -> tuple[dict, Report]:
  """The initial state of `run` with the parameters of `config.train.init_from`, in the
  layout's shardings, its optimizer state initialised from them; logs the Report."""
  source = checkpoint.absolute(config.train.init_from)
  abstract = run.layout.abstract["params"]
  target = {
    params_lib.path_names(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
  }
  frozen = frozenset(optim.matching_names(abstract, state_lib.frozen_patterns(config)))
  excluded = frozenset(optim.matching_names(abstract, exclude_patterns(config), EXCLUDE_KEY))
  if check_source(config) == "export":
    loaded, report = _read(source / "params", (), target, run, f"export {source}", frozen, excluded)
    held = export.vocab_file_in(source)  # vocab.model or vocab.txt.gz (CLIP BPE)
    vocab_file = epath.Path(held) if held else None
  else:
    loaded, report = _read_newest_checkpoint(source, target, run, config.train, frozen, excluded)
    vocab_file = _run_vocab(source)
  for line in report.log_lines():
    logging.info("%s", line)
  _warn_if_other_vocabulary(vocab_file, config)
  _warn_if_other_layout(source, config)
  _check_head_labels(source, config, report)
  _check_temperature(loaded, config, source)
  return state_lib.create(config, run, loaded), report


def _check_temperature(loaded: dict, config, source: epath.Path) -> None:
  """A loaded temperature outside config.model.temperature's [min, max] is an error: the
  first update would clamp it to the bound whatever the learning rate (a jump in logit
  scale), and a frozen one would stay outside all run."""
  value = loaded.get(("log_inv_temperature",))
  if value is None:
    return
  low, high = coca.log_inv_temperature_range(config.model.temperature)
  log_inv = float(jax.device_get(value))
  if not low - 1e-5 <= log_inv <= high + 1e-5:  # float32 rounding of a bound
    t = config.model.temperature
    raise ValueError(
      f"config.train.init_from={source}: its temperature {math.exp(-log_inv):.4g} is "
      f"outside config.model.temperature [min, max] = [{t.min}, {t.max}]: widen that "
      f"range, or start the temperature fresh with {EXCLUDE_KEY}=('^log_inv_temperature$',)"
    )


def _read(
  item: epath.Path,
  prefix: tuple,
  target: dict,
  run,
  source: str,
  frozen=frozenset(),
  excluded=frozenset(),
):
  """({path names: float32 array in its target sharding}, Report) of the Orbax tree at
  `item` (its parameters under `prefix`: () for an export, ("params",) for a state);
  `frozen`, `excluded`: the '/'-joined names config.train.frozen and
  config.train.init_exclude match (see `plan`)."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    try:
      stored = handler.metadata(item)
      stored = getattr(stored, "tree", stored)
      for key in prefix:
        stored = stored[key]
      stored_shapes = {
        params_lib.path_names(p): tuple(m.shape)
        for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]
      }
    except Exception as e:  # any failure to read or parse the metadata
      raise checkpoint.unreadable(item, e) from e
    report = plan(stored_shapes, {p: t.shape for p, t in target.items()}, source, frozen, excluded)
    request = _nest({(*prefix, *p): s for p, s in _requests(report, stored_shapes, target, run)})
    try:
      restored = handler.restore(
        item,
        args=ocp.args.PyTreeRestore(
          item=request,
          restore_args=ocp.checkpoint_utils.construct_restore_args(request),
          partial_restore=True,  # the source's other entries (optimizer, unused) stay unread
        ),
      )
    except Exception as e:  # Orbax wraps TensorStore's read errors in a bare Exception
      raise checkpoint.unreadable(item, e) from e
  finally:
    handler.close()
  loaded = {
    params_lib.path_names(p)[len(prefix) :]: v
    for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]
  }
  for name in report.resampled:
    path = tuple(name.split("/"))
    t = target[path]
    loaded[path] = jax.device_put(vit.resize_pos_embedding(loaded[path], t.shape[0]), t.sharding)
  return loaded, report


def _requests(report: Report, stored_shapes: dict, target: dict, run):
  """(path, ShapeDtypeStruct to read) of each loaded parameter: float32 in its target
  sharding, or replicated at its stored shape when it is resampled afterwards."""
  replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
  for name in report.loaded:
    path = tuple(name.split("/"))
    if name in report.resampled:
      yield path, jax.ShapeDtypeStruct(stored_shapes[path], jnp.float32, sharding=replicated)
    else:
      t = target[path]
      yield path, jax.ShapeDtypeStruct(t.shape, jnp.float32, sharding=t.sharding)


def _read_newest_checkpoint(workdir: epath.Path, target: dict, run, train_config, frozen, excluded):
  """`_read` of the newest step of `workdir` that every process can read (as a resume
  picks it: an unreadable step is skipped with a warning)."""
  mngr = checkpoint.manager(str(workdir), train_config, read_only=True)
  steps = sorted(mngr.all_steps(), reverse=True)
  mngr.close()
  failures = []
  for step in steps:
    item = checkpoint.step_path(mngr, step) / checkpoint.STATE
    try:
      source = f"checkpoint step {step} of {workdir}"
      result = _read(item, ("params",), target, run, source, frozen, excluded)
      recorded = _recorded(item.parent)
      error = None
    except checkpoint.UnreadableCheckpointError as e:
      result, error = None, e
    # Every process must take the same step: the resume's agreement (one all-gather).
    if not checkpoint.failing_processes(step, error is not None):
      try:  # then every process compares the same global values
        _check_values(item.parent, recorded, *result)
        return result
      except checkpoint.UnreadableCheckpointError as e:
        error = e
    logging.warning("init_from: skipping unreadable checkpoint %s: %s", item, error)
    failures.append(str(error))
  raise FileNotFoundError(
    f"config.train.init_from={workdir} has no readable checkpoint in {workdir / 'checkpoints'}"
    + (": " + "; ".join(failures) if failures else "")
  )


def _recorded(step_dir: epath.Path) -> dict | None:
  """The fingerprints saved with the checkpoint step at `step_dir` (None: from before
  them); UnreadableCheckpointError if its data item cannot be read."""
  try:
    data = ocp.JsonCheckpointHandler().restore(step_dir / checkpoint.DATA)
  except Exception as e:  # any failure to read or parse it
    raise checkpoint.unreadable(step_dir, e) from e
  return data.get(checkpoint.FINGERPRINTS)


def _check_values(step_dir: epath.Path, recorded, loaded: dict, report: Report) -> None:
  """checkpoint.check_values of the parameters `_read` loaded from the checkpoint step at
  `step_dir`, except those it resampled (their stored values are gone); those stored in
  another dtype than the float32 read are not compared."""
  tree = {
    "/".join(("params", *path)): value
    for path, value in loaded.items()
    if "/".join(path) not in report.resampled
  }
  checkpoint.check_values(step_dir, recorded, tree)


def _nest(flat: dict) -> dict:
  """{("a", "b"): x} -> {"a": {"b": x}}."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _run_vocab(workdir: epath.Path) -> epath.Path | None:
  """The vocabulary file named by a workdir's config.json, if any."""
  try:
    path = export.vocab_file_of(export.read_config(workdir / export.CONFIG_FILE))
  except FileNotFoundError:
    return None
  return epath.Path(path) if path else None


# Task heads whose classifier rows stand for labels the config names: (head, the labels'
# name, the config key that names them).
HEAD_LABELS = (
  ("vqa_head", "answers", "config.data.vqa.answers"),
  ("video_head", "classes", "config.data.video.class_names"),
)


def _labels(head: str, config) -> tuple[str, ...]:
  """The labels of `head`'s classifier rows, in row order, under `config`."""
  if head == "vqa_head":
    return tuple(config.data.vqa.get("answers", ()))
  from coca_jax.data import video

  return tuple(video.class_names(config.data))


def _check_head_labels(source: epath.Path, config, report: Report) -> None:
  """A task head's classifier read from the source scores the source's labels (VQA
  answers, video classes), row by row: a run whose labels differ (other training files or
  class list, the same count) would train and report other labels on those rows. A
  ValueError then. A head whose classifier starts fresh (init_exclude) is not compared."""
  for head, unit, key in HEAD_LABELS:
    if not any(name.startswith(f"{head}/classifier/") for name in report.loaded):
      continue
    try:
      theirs = _labels(head, export.read_config(source / export.CONFIG_FILE))
    # Best effort: a source from before these keys, or whose class file or TFDS dataset
    # is not on this machine, is loaded with a warning.
    except Exception as e:  # noqa: BLE001
      logging.warning("init_from: the source's %s cannot be compared with %s: %s", unit, key, e)
      continue
    own = _labels(head, config)
    if not theirs or not own or theirs == own:
      continue
    moved = [i for i, (a, b) in enumerate(zip(theirs, own)) if a != b]
    first = moved[0] if moved else min(len(theirs), len(own))
    raise ValueError(
      f"config.train.init_from={source}: its {head} scores other {unit} than this run's "
      f"{key} ({len(moved)} of {len(own)} differ; row {first} is "
      f"{theirs[first] if first < len(theirs) else None!r} there, "
      f"{own[first] if first < len(own) else None!r} here), so its classifier rows would "
      f"score the wrong {unit}. Use the source's {unit}, or start the classifier fresh "
      f"with {EXCLUDE_KEY}=('^{head}/classifier/',)"
    )


def layout_differences(source_model, model) -> list[str]:
  """The layout options (config.MODEL_OPTIONS, the attention kernel aside: it computes the
  same function) where two model configs differ, as "model.KEY: SOURCE -> RUN"."""

  def names(options, prefix=""):
    for key, value in options.items():
      if isinstance(value, dict):
        yield from names(value, f"{prefix}{key}.")
      elif prefix + key != "attention":
        yield prefix + key

  option = config_lib.model_option
  return [
    f"model.{name}: {option(source_model, name)!r} -> {option(model, name)!r}"
    for name in names(config_lib.MODEL_OPTIONS)
    if option(source_model, name) != option(model, name)
  ]


def _warn_if_other_layout(source: epath.Path, config) -> None:
  """Layout options without parameters of their own (GELU's form, the text mask, the
  token contract) load without a shape error, but the loaded weights then compute
  another function than the one they learned: worth a warning naming them."""
  path = source / export.CONFIG_FILE
  if not path.exists():
    return
  changed = layout_differences(export.read_config(path).model, config.model)
  if changed:
    logging.warning(
      "init_from: this run's model layout differs from the source's, so the loaded "
      "weights compute another function than they learned: %s (config.open_clip_layout "
      "sets open_clip's)",
      "; ".join(changed),
    )


def _warn_if_other_vocabulary(source_vocab: epath.Path | None, config) -> None:
  """Same-sized vocabularies with other pieces load without a shape error, but every
  token id would mean something else: worth a warning."""
  own = export.vocab_file_of(config)
  if source_vocab is None or not own or not source_vocab.exists():
    return
  if source_vocab.read_bytes() != epath.Path(own).read_bytes():
    logging.warning(
      "init_from: the source's vocabulary %s differs from config.data.vocab_path=%s; "
      "token ids will not mean what the pretrained model learned",
      source_vocab,
      own,
    )
