"""export.write: what it replaces and what it refuses to touch."""

import json

import ml_collections
import numpy as np
import pytest
from jax.experimental import multihost_utils
from tiny_runs import tiny_config

from coca_jax import checkpoint, export, train
from coca_jax import state as state_lib
from configs import tiny


def test_config_json_is_written_whole_and_a_torn_one_is_named(tmp_path):
  """config.json was written in place: a kill during the write left it empty, and every
  restart failed with JSON's "Expecting value: line 1 column 1", naming no file (review
  helper-86). It is staged and renamed over the old one; an empty one is named."""
  path = tmp_path / export.CONFIG_FILE
  path.write_text('{"old": 1}')
  export.write_text(path, '{"new": 2}')
  assert export.read_json(path) == {"new": 2}
  assert sorted(p.name for p in tmp_path.iterdir()) == [export.CONFIG_FILE]  # no staging left
  path.write_text("")
  with pytest.raises(ValueError, match=rf"{path} is not valid JSON .*config\.before_step_N"):
    export.read_config(path)


@pytest.mark.parametrize("other", ["checkpoints", "notes.md"])
def test_export_refuses_a_directory_that_is_not_an_export(tmp_path, other):
  """--output=WORKDIR (or any folder with other files) is an error, and nothing in it is
  lost; an older export at the path is replaced."""
  params = {"w": np.arange(4, dtype=np.float32)}
  config = ml_collections.ConfigDict({"model": {"width": 4}})
  out = tmp_path / "out"
  out.mkdir()
  (out / other).mkdir() if other == "checkpoints" else (out / other).write_text("keep")
  (out / "config.json").write_text("{}")
  with pytest.raises(FileExistsError, match=rf"not a coca_jax export.*'{other}'"):
    export.write(params, config, str(out), "float32", None)
  assert sorted(p.name for p in out.iterdir()) == sorted([other, "config.json"])
  assert not (tmp_path / ".out.partial").exists()
  with pytest.raises(FileExistsError, match="not a coca_jax export"):
    export.export_from_workdir(str(tmp_path / "no_run"), str(out), "float32")

  fresh = tmp_path / "fresh"
  export.write(params, config, str(fresh), "float32", None)
  export.write({"w": params["w"] + 1}, config, str(fresh), "float32", None)  # replaces
  assert sorted(p.name for p in fresh.iterdir()) == ["config.json", "params"]
  restored = export.ocp.StandardCheckpointer().restore(fresh / "params")
  np.testing.assert_array_equal(restored["w"], params["w"] + 1)


def test_a_folder_with_a_config_but_no_params_is_not_an_export(tmp_path):
  """A folder holding only config.json and vocab.model passed as an export and was
  replaced whole: the user's vocab.model was lost, their config.json overwritten."""
  out = tmp_path / "mine"
  out.mkdir()
  (out / "config.json").write_text("{}")
  (out / "vocab.model").write_text("keep")
  params = {"w": np.arange(4, dtype=np.float32)}
  config = ml_collections.ConfigDict({"model": {"width": 4}})
  with pytest.raises(FileExistsError, match=r"not a coca_jax export .* and no params/"):
    export.write(params, config, str(out), "float32", None)
  assert (out / "vocab.model").read_text() == "keep" and (out / "config.json").read_text() == "{}"


def test_a_dtype_or_path_that_cannot_make_an_export_is_an_error_before_writing(
  tmp_path, monkeypatch
):
  """An int8 cast wrote zeros that loaded without a word; "." as the output staged the
  export inside itself and could not be renamed."""
  params = {"w": np.arange(4, dtype=np.float32)}
  config = ml_collections.ConfigDict({"model": {"width": 4}})
  with pytest.raises(ValueError, match=r"export dtype 'int8'; expected one of"):
    export.write(params, config, str(tmp_path / "out"), "int8", None)
  with pytest.raises(ValueError, match="export dtype 'bf16'"):
    export.export_from_workdir(str(tmp_path / "no_run"), str(tmp_path / "out"), "bf16")
  monkeypatch.chdir(tmp_path)
  for output in (".", "..", "./"):
    with pytest.raises(ValueError, match="has no name of its own"):
      export.write(params, config, output, "float32", None)
  assert list(tmp_path.iterdir()) == []


def test_a_missing_vocabulary_is_an_error_before_anything_is_written(tmp_path):
  """config.data.vocab_path missing where the export ran was skipped: an export without
  vocab.model, whose loading fell back to the training machine's path."""
  params = {"w": np.arange(4, dtype=np.float32)}
  gone = str(tmp_path / "elsewhere" / "vocab.model")
  config = ml_collections.ConfigDict({"data": {"vocab_path": gone}})
  with pytest.raises(FileNotFoundError, match=rf"config\.data\.vocab_path={gone} does not exist"):
    export.write(params, config, str(tmp_path / "out"), "float32", gone)
  assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no staging
  # An older export at the path stays as it was.
  old = tmp_path / "old"
  (old / "params").mkdir(parents=True)
  (old / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="vocab_path"):
    export.write(params, config, str(old), "float32", gone)
  assert sorted(p.name for p in old.iterdir()) == ["config.json", "params"]
  assert (old / "config.json").read_text() == "{}"


@pytest.mark.parametrize(
  "name, kept_as", [("spm.model", "vocab.model"), ("bpe.txt.gz", "vocab.txt.gz")]
)
def test_the_vocabulary_given_is_copied_whatever_the_config_names(tmp_path, name, kept_as):
  """The open_clip converter passes CLIP's BPE file with no config.data.vocab_path."""
  vocab_file = tmp_path / name
  vocab_file.write_bytes(b"vocabulary bytes")
  config = ml_collections.ConfigDict({"data": {"vocab_path": ""}})
  export.write(
    {"w": np.zeros(2, np.float32)}, config, str(tmp_path / "out"), "float32", str(vocab_file)
  )
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
    ["config.json", "params", kept_as]
  )
  assert (tmp_path / "out" / kept_as).read_bytes() == b"vocabulary bytes"


def test_loading_a_training_workdir_says_how_to_export_it(tmp_path):
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match=r"training workdir: export it first with `python "):
    export.load_model(str(tmp_path / "run"))
  with pytest.raises(FileNotFoundError, match=r"params is missing$"):
    export.load_model(str(tmp_path / "elsewhere"))


def test_only_process_0_checks_the_destination_and_every_process_gets_its_verdict(
  tmp_path, monkeypatch
):
  """Every process checked its own disk: one without the vocabulary (or seeing a file at
  the output path) stopped before the collective parameter save while the others waited
  in it. Process 0 (the one that replaces the output and copies the vocabulary) decides,
  and its verdict is broadcast (stands in for two processes here)."""
  gone = str(tmp_path / "vocab.model")
  not_a_dir = tmp_path / "export"
  not_a_dir.write_text("a file where the export goes")
  fine = str(tmp_path / "new_export")
  config = ml_collections.ConfigDict({"data": {"vocab_path": gone}})
  sent = []

  def broadcast(value, verdict_of_process_0):
    sent.append(int(value))
    return np.int32(verdict_of_process_0)

  monkeypatch.setattr(export.jax, "process_count", lambda: 2)
  cases = [
    # (process, output, verdict of process 0, expected error)
    (1, str(not_a_dir), 0, None),  # process 1 never looks at its own disk
    (1, fine, 1, RuntimeError),
    (0, fine, 1, FileNotFoundError),
    (0, str(not_a_dir), 1, FileExistsError),
  ]
  for process, output, verdict, error in cases:
    monkeypatch.setattr(export.jax, "process_index", lambda p=process: p)
    monkeypatch.setattr(
      multihost_utils, "broadcast_one_to_all", lambda value, v=verdict: broadcast(value, v)
    )
    if error is None:
      export.check_destination(output, gone, config)
    else:
      match = "refused by process 0" if error is RuntimeError else ""
      with pytest.raises(error, match=match):
        export.check_destination(output, gone, config)
  assert sent == [0, 0, 1, 1]


def test_an_export_without_a_vocabulary_says_so(tmp_path):
  """A run on synthetic data names no vocabulary, so its export holds none; loading it
  said only "vocabulary not found: '<export>/vocab.model'"."""
  config = tiny.get_config()
  config.data.vocab_path = ""
  with pytest.raises(FileNotFoundError, match="holds no vocabulary .* synthetic data"):
    export.load_vocab(str(tmp_path), config)


def test_an_export_stopped_between_its_renames_is_named_and_cleaned_up(tmp_path, monkeypatch):
  """Between moving the older export aside and putting the new one in place the path is
  empty: loading named only the missing params/, and the next export left the older copy
  (.out.old, a full hidden set of parameters) behind."""
  params = {"w": np.arange(4, dtype=np.float32)}
  config = ml_collections.ConfigDict({"model": {"width": 4}})
  out = tmp_path / "out"
  export.write(params, config, str(out), "float32", None)
  path_class = type(export.epath.Path(out))  # epath's concrete class for local paths
  rename = path_class.rename

  def stop_before_the_new_one(self, target):
    if self.name == ".out.partial":
      raise KeyboardInterrupt
    return rename(self, target)

  monkeypatch.setattr(path_class, "rename", stop_before_the_new_one)
  with pytest.raises(KeyboardInterrupt):
    export.write({"w": params["w"] + 1}, config, str(out), "float32", None)
  monkeypatch.undo()
  assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old", ".out.partial"]
  with pytest.raises(
    FileNotFoundError, match=r"the export before it, complete, is at .*\.out\.old"
  ):
    export.load_model(str(out))
  export.write({"w": params["w"] + 2}, config, str(out), "float32", None)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  restored = export.ocp.StandardCheckpointer().restore(out / "params")
  np.testing.assert_array_equal(restored["w"], params["w"] + 2)


def test_an_output_under_a_file_is_an_error_before_writing(tmp_path):
  """It failed after the whole restore, naming the staging folder, then waited ~5 minutes
  on Orbax's timeouts."""
  (tmp_path / "afile").write_text("keep")
  params = {"w": np.arange(4, dtype=np.float32)}
  config = ml_collections.ConfigDict({"model": {"width": 4}})
  with pytest.raises(FileExistsError, match=r"out: .*afile is a file, not a directory"):
    export.write(params, config, str(tmp_path / "afile" / "sub" / "out"), "float32", None)
  assert (tmp_path / "afile").read_text() == "keep"


@pytest.mark.slow  # ~10 s
def test_an_older_checkpoint_is_exported_with_the_config_that_trained_it(tmp_path):
  """A resume at step 3 that changed the config kept the old one as
  config.before_step_3.json; `--step=3` exported step 3's weights under the new
  config.json (a changed pooler mode or text mask would then be silently wrong)."""
  config = tiny_config(6)
  state = state_lib.create(config, state_lib.setup(config))
  mngr = checkpoint.manager(str(tmp_path), config.train)
  for step in (3, 6):
    checkpoint.save(mngr, dict(state, step=np.int32(step)), dict(step=step, seed=0))
  mngr.wait_until_finished()
  mngr.close()
  before = json.loads(config.to_json_best_effort())
  before["eval"]["decode"]["beam_size"] = 7  # the run's config until its resume at step 3
  (tmp_path / "config.before_step_3.json").write_text(json.dumps(before))
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  for step, beam in ((3, 7), (6, config.eval.decode.beam_size)):
    out = tmp_path / f"export_{step}"
    assert export.export_from_workdir(str(tmp_path), str(out), "float32", step) == (step, "float32")
    assert json.loads((out / "config.json").read_text())["eval"]["decode"]["beam_size"] == beam
  assert export.config_file_of_step(tmp_path, 2).name == "config.before_step_3.json"
  assert export.config_file_of_step(tmp_path, 4).name == "config.json"


@pytest.mark.slow  # ~10 s
def test_a_checkpoint_from_before_an_image_size_change_exports_at_its_own_size(tmp_path):
  """Step 2 trained at 16 px, then a resume at 32 px: the export of step 2 restored it
  into the 32 px layout (the position embedding resampled) but wrote it with step 2's
  config, an export that could not be loaded; a good export at --output was replaced."""
  before, after = tiny_config(4), tiny_config(4)
  after.model.vision.image_size = 2 * before.model.vision.image_size
  mngr = checkpoint.manager(str(tmp_path), after.train)
  for step, config in ((2, before), (4, after)):
    state = state_lib.create(config, state_lib.setup(config))
    checkpoint.save(mngr, dict(state, step=np.int32(step)), dict(step=step, seed=0))
  mngr.wait_until_finished()
  mngr.close()
  (tmp_path / "config.before_step_2.json").write_text(before.to_json_best_effort())
  (tmp_path / "config.json").write_text(after.to_json_best_effort())
  for step, config in ((2, before), (4, after), (None, after)):
    out = tmp_path / f"export_{step}"
    export.export_from_workdir(str(tmp_path), str(out), "float32", step)
    _, loaded = export.load_model(str(out))  # its params fit the model its config builds
    assert loaded.model.vision.image_size == config.model.vision.image_size


@pytest.mark.slow  # ~10 s
def test_a_checkpoint_deleted_by_the_run_while_it_is_read_is_no_damage(tmp_path, monkeypatch):
  """A run still training (keeping its last checkpoint) saves a new step and deletes the
  one the export is reading: the export lists the steps again and exports the new one; an
  explicit --step says what happened. Both had called the step unreadable and told the
  user to delete or repair the run's checkpoints."""
  config = tiny_config(6)
  config.train.keep_checkpoints = 1
  state = state_lib.create(config, state_lib.setup(config))
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  mngr = checkpoint.manager(str(tmp_path), config.train)
  checkpoint.save(mngr, dict(state, step=np.int32(3)), dict(step=3, seed=0))
  mngr.wait_until_finished()
  read, overtaken = checkpoint._restore_step, {3}  # the step the run deletes while read

  def training_meanwhile(m, layout, step, **kwargs):
    if step in overtaken:
      overtaken.remove(step)
      checkpoint.save(mngr, dict(state, step=np.int32(step + 3)), dict(step=step + 3, seed=0))
      mngr.wait_until_finished()
      assert not (tmp_path / "checkpoints" / str(step)).exists()  # kept: the last 1
    return read(m, layout, step, **kwargs)

  monkeypatch.setattr(checkpoint, "_restore_step", training_meanwhile)
  monkeypatch.setattr(checkpoint, "RETRY_S", 0.0)
  exported = export.export_from_workdir(str(tmp_path), str(tmp_path / "newest"), "float32")
  assert exported == (6, "float32")
  overtaken.add(6)
  with pytest.raises(FileNotFoundError, match="checkpoint 6 .* was deleted while it was read"):
    export.export_from_workdir(str(tmp_path), str(tmp_path / "six"), "float32", 6)
  mngr.close()
  assert not (tmp_path / "six").exists()


@pytest.mark.slow  # ~25 s: two tiny runs
def test_relative_paths_work_for_training_export_loading_and_init_from(tmp_path, monkeypatch):
  """Orbax refuses relative paths: `--workdir=run` failed at the first checkpoint save,
  `--output=exp` at the export, and coca_jax.load("exp") with a TypeError (helper-89)."""
  monkeypatch.chdir(tmp_path)
  assert train.train(tiny_config(2), "run")["step"] == 2
  assert export.export_from_workdir("run", "exp", "float32") == (2, "float32")
  model, config = export.load_model("exp")
  assert config.model.width == tiny_config(2).model.width
  finetune = train.train(tiny_config(2, train=dict(init_from="exp")), "finetune")
  assert finetune["step"] == 2
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2"]
