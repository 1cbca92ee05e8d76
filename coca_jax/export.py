"""Export: the parameters alone, as a standalone Orbax checkpoint the inference API loads.

    python -m coca_jax.export --workdir=DIR [--step=N] --output=DIR [--dtype=bfloat16|float32]

Layout of an export directory:
    params/       Orbax checkpoint of the model parameters (nested dict of arrays)
    config.json   the full config of the run
    vocab.model   the vocabulary (when the run had one): a SentencePiece model, or
    vocab.txt.gz  CLIP's BPE merges (models imported from open_clip)
An existing export at the output path is replaced only after the new one is complete; any
other existing directory (a training workdir given as --output, say) is an error, and
nothing in it is touched.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from coca_jax import checkpoint, console
from coca_jax import config as config_lib
from coca_jax import params as params_lib
from coca_jax import state as state_lib
from coca_jax import tokens as tokens_lib
from coca_jax.models import coca

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.model"
CLIP_VOCAB_FILE = "vocab.txt.gz"
EXPORT_ENTRIES = ("params", CONFIG_FILE, VOCAB_FILE, CLIP_VOCAB_FILE)
# The dtypes an export's parameters can have (config.train.export_dtype, --dtype of this
# CLI and of coca_jax.convert); config.model.dtype takes the same.
DTYPES = ("bfloat16", "float32")
LISTINGS = 3  # of a workdir whose run deletes checkpoints while they are read


def read_config(path) -> ml_collections.ConfigDict:
  """Reads a config.json written by training or export (`config.with_current_rules`)."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no config at {path}")
  return config_lib.with_current_rules(ml_collections.ConfigDict(read_json(path)))


def read_json(path) -> dict:
  """A config.json's values as stored; a file that is not JSON is a ValueError naming it
  (JSON's own message named neither the file nor the fix)."""
  path = epath.Path(path)
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(
      f"{path} is not valid JSON ({e}); a process killed while writing it, before writes "
      "were atomic, left it so: copy a config.before_step_N.json of the workdir, or the "
      "run's config, over it"
    ) from e


def write_text(path, text: str) -> None:
  """Writes config.json (or a copy of one) whole or not at all: to a temporary file, then
  renamed over it. Written in place, a kill during the write left an empty file, and
  every restart then failed reading it."""
  path = epath.Path(path)
  staging = path.parent / f".{path.name}.tmp"
  staging.write_text(text)
  staging.replace(path)


def write(
  params: dict,
  config: ml_collections.ConfigDict,
  output_dir: str,
  dtype: str,
  vocab_file: str | None,
) -> None:
  """Writes an export of `params` (nested dict of arrays) to `output_dir`, which must be
  absent, empty or an export (`check_output`). vocab_file: the vocabulary copied into it
  (train and the export CLI pass config.data.vocab_path, the open_clip converter CLIP's
  BPE file); None writes none. A vocab_file that does not exist is a FileNotFoundError
  before anything is written."""
  check_dtype(dtype)
  check_destination(output_dir, vocab_file, config)
  output = checkpoint.absolute(output_dir)
  staging = output.parent / f".{output.name}.partial"
  # Orbax's save starts with a barrier, so the others look at the staging folder only
  # after this clean-up.
  if jax.process_index() == 0 and staging.exists():
    staging.rmtree()
  # Scalars stay float32 (a few bytes): the temperature, at its bound after training as
  # often as not, rounded to bfloat16 could land outside config.model.temperature's range
  # (min 0.05: log(1 / 0.05) = 2.9957 -> 3.0), and init_from refused the run's own export.
  cast = jax.tree.map(lambda x: x.astype(jnp.float32 if x.ndim == 0 else jnp.dtype(dtype)), params)
  checkpoint.use_array_handler()
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(staging / "params", cast)
    checkpointer.wait_until_finished()
  except Exception as e:
    before = "the export already there is untouched" if output.exists() else "nothing is there"
    raise checkpoint.SaveError(
      f"writing the export {output} failed: {checkpoint.short_reason(e, 1000)}; {before}, and the "
      f"partial copy at {staging} goes with the next export"
    ) from e
  if jax.process_index() == 0:
    _complete(staging, output, config, vocab_file)
    logging.info("Exported %s parameters to %s", dtype, output)
  # No process returns (and exits into jax.distributed's shutdown barrier, whose timeout
  # would kill process 0 mid-rename on slow storage) before the export is in place.
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"coca_jax export {output} complete")


def _complete(staging, output, config, vocab_file) -> None:
  """Process 0: adds config.json and the vocabulary to the staged parameters, then puts
  the staging folder in place of `output` (an older export is moved aside first and
  deleted last, so one of the two is always complete)."""
  (staging / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
  if vocab_file:
    epath.Path(vocab_file).copy(staging / _vocab_name(vocab_file))
  old = _moved_aside(output)
  if output.exists():
    if old.exists():
      old.rmtree()
    output.rename(old)
  staging.rename(output)
  if old.exists():  # this export's predecessor, or one a crash between renames left
    old.rmtree()


def _moved_aside(output: epath.Path) -> epath.Path:
  """Where `_complete` moves an older export while the new one takes its place."""
  return output.parent / f".{output.name}.old"


def check_dtype(dtype: str) -> None:
  """ValueError unless `dtype` is one of DTYPES (an int8 cast would write zeros)."""
  if dtype not in DTYPES:
    raise ValueError(f"export dtype {dtype!r}; expected one of {DTYPES}")


def check_output(output_dir: str) -> None:
  """Raises FileExistsError unless `output_dir` is absent, an empty directory or an export
  (params/ and only other EXPORT_ENTRIES): `write` replaces it whole, so anything else
  there would be lost.
  ValueError for a path without a name of its own ("", ".", ".."): `write` stages the
  export beside it, under its name."""
  output = epath.Path(output_dir)
  if output.name in ("", ".", ".."):
    raise ValueError(
      f"export output {output_dir!r} has no name of its own; give a directory path that "
      "ends in a name, e.g. ./export"
    )
  if not output.exists():
    above = next((p for p in output.parents if p.exists()), None)
    if above is not None and not above.is_dir():  # else found after the whole restore
      raise FileExistsError(f"export output {output}: {above} is a file, not a directory")
    return
  if not output.is_dir():
    raise FileExistsError(f"export output {output} is a file, not a directory")
  entries = sorted(p.name for p in output.iterdir())
  other = [name for name in entries if name not in EXPORT_ENTRIES]
  if other or (entries and "params" not in entries):  # a config.json alone is not an export
    raise FileExistsError(
      f"export output {output} exists and is not a coca_jax export (it holds "
      f"{(other or entries)[:5]}{'' if other else ' and no params/'}); an export replaces "
      "only an older export: pick a new directory or remove this one"
    )


def check_vocab(vocab_file: str | None, config: ml_collections.ConfigDict) -> None:
  """FileNotFoundError when `write` is given a vocabulary file that is not there: the
  export would lack its vocabulary, and loading it would fall back to the run's path."""
  if not vocab_file or epath.Path(vocab_file).exists():
    return
  data = config.get("data") or {}
  named = "config.data.vocab_path=" if vocab_file == data.get("vocab_path") else "vocab_file="
  raise FileNotFoundError(
    f"{named}{vocab_file} does not exist on process 0, which writes the export; an export "
    f"holds its vocabulary ({_vocab_name(vocab_file)}), so nothing was written: put the "
    "file at that path (or name the right one in the run's config.json) and export again"
  )


def check_destination(output_dir: str, vocab_file: str | None, config) -> None:
  """`check_output` and `check_vocab`, decided by process 0 alone: it replaces the output
  and copies the vocabulary, so only its file system counts. In a multi-process job (the
  trainer's final export) its verdict is broadcast before the collective parameter save,
  so every process stops together (process 0 with the error, the others pointing at it)
  instead of some waiting in the save for those that stopped."""
  error = None
  if jax.process_index() == 0:
    try:
      check_output(output_dir)
      check_vocab(vocab_file, config)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
      error = e
  failed = error is not None
  if jax.process_count() > 1:
    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))
  if error is not None:
    raise error
  if failed:
    raise RuntimeError(
      f"the export to {output_dir} was refused by process 0, which writes it (its log "
      "names the problem); nothing was written"
    )


def load_model(export_dir: str) -> tuple[coca.CoCa, ml_collections.ConfigDict]:
  """Loads an export: (CoCa with float32 params, config). Errors name the missing path."""
  export = checkpoint.absolute(export_dir)
  if not (export / "params").exists():
    hint = ""
    if (export / "checkpoints").exists():  # a training workdir
      hint = (
        f"; it is a training workdir: export it first with `python -m coca_jax.export "
        f"--workdir={export} --output=DIR`"
      )
    if _moved_aside(export).exists():  # an export stopped between its two renames
      hint = (
        f"; the export before it, complete, is at {_moved_aside(export)} (an export "
        "replacing it was interrupted): rename it back, or export again"
      )
    raise FileNotFoundError(
      f"{export} is not a coca_jax export: {export / 'params'} is missing{hint}"
    )
  config = read_config(export / CONFIG_FILE)
  abstract_model = nnx.eval_shape(lambda: coca.build(config.model))
  graphdef, abstract_params = nnx.split(abstract_model)
  stored = ocp.StandardCheckpointer().metadata(export / "params")
  stored = getattr(stored, "item_metadata", stored)
  if stored is None:  # Orbax warns and returns no tree where it cannot read one
    raise ValueError(f"{export / 'params'} holds no parameter metadata Orbax can read")
  check_params_match(export, abstract_params.to_pure_dict(), stored)
  replicated = jax.sharding.NamedSharding(
    jax.sharding.Mesh(jax.devices()[:1], ("x",)), jax.sharding.PartitionSpec()
  )
  target = jax.tree.map(
    lambda a, m: jax.ShapeDtypeStruct(a.shape, m.dtype, sharding=replicated),
    abstract_params.to_pure_dict(),
    dict(stored),
  )
  params = ocp.StandardCheckpointer().restore(export / "params", target)
  params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  return nnx.merge(graphdef, params), config


def check_params_match(export_dir, expected, stored, shown: int = 5) -> None:
  """ValueError, before any array is read, unless the export's params (`stored`: its
  Orbax metadata tree) have exactly the paths and shapes of `expected` (the abstract
  params its config.json builds); names up to `shown` differing paths."""

  def shapes(tree) -> dict[str, tuple]:
    return {
      "/".join(params_lib.path_names(path)): tuple(leaf.shape)
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }

  want, have = shapes(expected), shapes(dict(stored))
  differing = sorted(p for p in want.keys() | have.keys() if want.get(p) != have.get(p))
  if not differing:
    return
  listed = "; ".join(
    f"{p}: expected {want.get(p, 'none')}, found {have.get(p, 'none')}" for p in differing[:shown]
  )
  more = f"; and {len(differing) - shown} more" if len(differing) > shown else ""
  raise ValueError(
    f"export {export_dir}: its params do not match the model its {CONFIG_FILE} builds "
    f"({len(differing)} parameters differ: {listed}{more}). Its {CONFIG_FILE} and params/ "
    "likely come from different runs, or from a different coca_jax version: export again "
    "with this version, from the run's workdir (python -m coca_jax.export) or, for an "
    "open_clip checkpoint, with python -m coca_jax.convert"
  )


def export_from_workdir(
  workdir: str, output: str, dtype: str | None = None, step: int | None = None
) -> tuple[int, str]:
  """Exports the params of a training checkpoint (default: the newest readable one, as a
  resume would pick) as `dtype` (default: config.train.export_dtype, what the run's own
  final export has); returns the exported step and dtype. The checkpoint is restored and
  described with the config that trained it (`config_file_of_step`): a resume may have
  changed the model since (an image size, a pooler mode, a vocabulary)."""
  if dtype is not None:
    check_dtype(dtype)
  check_output(output)  # before the restore, which can take minutes
  workdir_path = epath.Path(workdir)
  run_config = read_config(workdir_path / CONFIG_FILE)
  mngr = checkpoint.manager(workdir, run_config.train, read_only=True)

  def restore(target: int, at: int | None):
    """Checkpoint `at` (None: the newest readable) with the config of `target`."""
    config = _config_of_step(workdir_path, target if at is None else at)
    layout = state_lib.setup(config).layout
    return config, checkpoint.restore(mngr, layout, at, params_only=True)

  for listing in range(LISTINGS):
    steps = mngr.all_steps()
    if step is not None and step not in steps:
      raise FileNotFoundError(f"no checkpoint {step} in {workdir}/checkpoints")
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    target = max(steps) if step is None else step
    try:
      config, (state, data_position) = restore(target, step)
      break
    except checkpoint.UnreadableCheckpointError:
      # A run still training deletes its oldest checkpoints as it saves new ones: a step
      # listed here can vanish while it is read. That is no damage to report.
      gone = [s for s in steps if not checkpoint.step_path(mngr, s).exists()]
      if not gone:
        raise
      if step is not None:
        raise FileNotFoundError(
          f"checkpoint {step} in {workdir}/checkpoints was deleted while it was read: the "
          f"run writing there keeps only its last {run_config.train.keep_checkpoints} "
          "(config.train.keep_checkpoints). Export a newer step"
        ) from None
      if listing == LISTINGS - 1:
        raise
      logging.warning(
        "checkpoints %s were deleted while they were read (the run is still saving and "
        "keeps its last %d): listing the steps again",
        gone,
        run_config.train.keep_checkpoints,
      )
      mngr.reload()
  exported = int(data_position["step"])
  if config_file_of_step(workdir_path, exported) != config_file_of_step(workdir_path, target):
    # The newest step was unreadable, and the older one restored was trained otherwise.
    config, (state, data_position) = restore(exported, exported)
  if dtype is None:
    dtype = config.train.get("export_dtype", "bfloat16")  # configs from before the key
    check_dtype(dtype)
  write(state["params"], config, output, dtype, vocab_file_of(config))
  return exported, dtype


def _config_of_step(workdir: epath.Path, step: int):
  """The config that trained checkpoint `step`, its vocabulary checked, on a mesh this
  machine has (the run's own may need more devices; any mesh restores)."""
  path = config_file_of_step(workdir, step)
  if path.name != CONFIG_FILE:
    logging.info("checkpoint %d was trained under %s: the export's config", step, path)
  config = read_config(path)
  check_vocab(vocab_file_of(config), config)
  config.mesh = config_lib.default_mesh()
  return config


def config_file_of_step(workdir: epath.Path, step: int) -> epath.Path:
  """The config that trained checkpoint `step`: the earliest config.before_step_<N>.json
  with N >= step (a resume at step N kept the config before it there), else config.json."""
  kept = {}
  for path in workdir.glob("config.before_step_*.json"):
    number = path.name.removeprefix("config.before_step_").removesuffix(".json")
    if number.isdigit() and int(number) >= step:
      kept[int(number)] = path
  return kept[min(kept)] if kept else workdir / CONFIG_FILE


def load_vocab(export_dir: str, config):
  """The vocabulary of an export (coca_jax.data.vocab.load): its own vocabulary file, else
  the run's config.data.vocab_path. ValueError when it has more pieces than the model
  has token embeddings (config.model.text.vocab_size): the ids past them embedded as NaN."""
  from coca_jax.data import vocab

  path = vocab_file_in(export_dir) or vocab_file_of(config)
  if not path:
    raise FileNotFoundError(
      f"{export_dir} holds no vocabulary ({VOCAB_FILE} or {CLIP_VOCAB_FILE}) and its run "
      "named none (config.data.vocab_path is empty, as in a run on synthetic data): put "
      f"one at {os.path.join(export_dir, VOCAB_FILE)}"
    )
  vocabulary = vocab.load(path)
  pieces = tokens_lib.piece_count(vocabulary)
  size = ((config.get("model") or {}).get("text") or {}).get("vocab_size")
  c = tokens_lib.Contract.from_config(config)
  problem = None
  if size is not None and pieces > size:
    problem = f"more than the model's config.model.text.vocab_size={size} token embeddings"
  elif max(c.bos_id, c.eos_id, c.pad_id) >= pieces:
    problem = (
      f"too few for the model's special ids (start {c.bos_id}, end {c.eos_id}, pad {c.pad_id})"
    )
  if problem:
    raise ValueError(
      f"export {export_dir}: its vocabulary {path} has {pieces} pieces, {problem}; it belongs "
      "to another model (for a converted checkpoint: the --config or --vocab of the conversion)"
    )
  return vocabulary


def vocab_file_in(export_dir) -> str | None:
  """The vocabulary file an export holds (either kind), if any."""
  for name in (VOCAB_FILE, CLIP_VOCAB_FILE):
    path = epath.Path(export_dir) / name  # an export on gs:// too
    if path.exists():
      return os.fspath(path)
  return None


def _vocab_name(vocab_file: str) -> str:
  """The vocabulary's name inside an export: its kind stays readable from the name."""
  from coca_jax.data import vocab

  return CLIP_VOCAB_FILE if vocab.is_clip_bpe(vocab_file) else VOCAB_FILE


def vocab_file_of(config) -> str | None:
  """The vocabulary file of a run's config, if it names one."""
  path = config.data.get("vocab_path", "")
  return os.fspath(path) if path else None


def main(argv):
  console.quiet()
  del argv
  f = flags.FLAGS
  if not f.workdir or not f.output:
    raise app.UsageError("--workdir and --output are required")
  try:
    step, dtype = export_from_workdir(f.workdir, f.output, f.dtype, f.step)
  except checkpoint.SaveError as e:
    console.exit_now(str(e))
  except (FileNotFoundError, FileExistsError, ValueError) as e:  # each names its path
    sys.exit(f"error: {e}")
  print(json.dumps(dict(step=step, output=f.output, dtype=dtype)))


if __name__ == "__main__":
  # Defined here, not at import: the trainer imports this module and has its own flags.
  flags.DEFINE_string("workdir", None, "Training workdir holding config.json and checkpoints/.")
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: latest).")
  flags.DEFINE_string("output", None, "Export directory to write.")
  flags.DEFINE_enum(
    "dtype", None, DTYPES, "Dtype of exported params (default: the run's train.export_dtype)."
  )
  app.run(main)
