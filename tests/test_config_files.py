"""Config files load from any working directory (they import their siblings as
`configs.<...>`, which is not an installed package)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow  # a subprocess importing jax (~5 s)
def test_a_config_importing_its_sibling_loads_outside_the_repository(tmp_path, repo):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = subprocess.run(
    [sys.executable, "-m", "coca_jax.params", f"--config={repo / 'configs' / 'demo_vqa.py'}"],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout.strip().splitlines()[-1])["task_heads"] > 0
