"""export.write: what it replaces and what it refuses to touch."""

import ml_collections
import numpy as np
import pytest

from coca_jax import export


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
