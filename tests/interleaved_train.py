"""`python -m coca_jax.train`, as one process of a run whose mesh interleaves the
processes: the device list the trainer's mesh is built from alternates between
processes (process 0's first device, process 1's first, process 0's second, ...), so each
process's batch rows are NOT contiguous, as on a TPU slice where jax.make_mesh orders
devices by the ICI topology. CPU devices of a loopback run are otherwise contiguous.

    python tests/interleaved_train.py --config=... --coordinator_address=... ...
"""

import jax
from absl import app

from coca_jax import sharding, train

_make_mesh = sharding.make_mesh


def interleaved(devices) -> list:
  """`devices` ordered by (position within its process, process index)."""
  position = {}
  for d in sorted(devices, key=lambda d: d.id):
    position[d] = sum(1 for other in position if other.process_index == d.process_index)
  return sorted(devices, key=lambda d: (position[d], d.process_index))


def make_interleaved_mesh(mesh_config, devices=None, needs=sharding.MeshNeeds()):
  return _make_mesh(mesh_config, interleaved(jax.devices() if devices is None else devices), needs)


if __name__ == "__main__":
  sharding.make_mesh = make_interleaved_mesh  # only the trainer's mesh; JAX's own are untouched
  train.define_flags()
  app.run(train.main)
