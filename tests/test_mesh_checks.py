"""Configs the mesh or the model cannot take fail early, naming the config key at fault.

A mesh axis that does not divide a sharded parameter dimension otherwise surfaces as
jax's IndivisibleError at the first array, naming neither the parameter nor the config;
zero pooler queries otherwise give a NaN image embedding.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from coca_jax import export, sharding
from coca_jax import state as state_lib
from coca_jax.models import coca
from configs import tiny
from configs.open_clip import tiny as open_clip_tiny

# A device order unlike jax.devices(), as jax.make_mesh gives on a TPU slice.
PERMUTATION = [5, 2, 7, 0, 3, 6, 1, 4]

# `embed` split over fsdp and tensor at once (tensor-parallel without `heads`, `mlp`,
# `vocab`): fsdp x tensor must divide the width.
JOINT_RULES = tuple(
  ("embed", ("fsdp", "tensor"))
  if name == "embed"
  else (name, None)
  if name in ("mlp", "heads", "vocab")
  else (name, axes)
  for name, axes in tiny.get_config().sharding_rules
)


def permuted_devices():
  return [jax.devices()[i] for i in PERMUTATION]


@pytest.mark.slow
@pytest.mark.parametrize("devices", [jax.devices, permuted_devices], ids=["ordered", "permuted"])
def test_setup_names_the_parameter_an_explicit_tensor_size_does_not_divide(devices):
  c = tiny.get_config()  # 2 heads: tensor=4 splits them 4 ways
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 2, 4
  with pytest.raises(
    sharding.MeshError,
    match=r"parameter \['[a-z_]+'\].*: dimension \d \(2\) is split over mesh axes \('tensor',\) "
    r"= 4 ways.*choose config\.mesh\.tensor \(now 4",
  ):
    state_lib.setup(c, devices())


@pytest.mark.slow
def test_setup_names_the_fsdp_key_for_an_fsdp_split():
  c = tiny.get_config()
  c.model.width = 36
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
  with pytest.raises(sharding.MeshError, match=r"\(36\) .* choose config\.mesh\.fsdp \(now 8"):
    state_lib.setup(c, jax.devices())


def test_automatic_mesh_reports_a_tensor_size_that_divides_no_head_count():
  c = tiny.get_config()  # tensor-sharded: 2 heads, mlp 64, vocab 64
  c.mesh.tensor = 4
  assert (c.mesh.data, c.mesh.fsdp) == (-1, -1)
  with pytest.raises(
    sharding.MeshError,
    match=r"config\.mesh\.tensor=4 does not divide the tensor-sharded parameter dimension of "
    r"2 \(parameter \['.*\]\).*devices: 1, 2$",
  ):
    state_lib.setup(c, jax.devices())


def test_mesh_needs_collect_tensor_and_joint_dimensions():
  c = tiny.get_config()
  model = nnx.eval_shape(lambda: coca.build(c.model))
  params = nnx.state(model, nnx.Param).to_pure_dict()
  needs = sharding.MeshNeeds.of(
    params, sharding.param_specs(model, c.sharding_rules), 8, c.sharding_rules
  )
  assert needs.fsdp_dims == (32,) and needs.tensor_dims == (2, 64) and needs.other_dims == ()
  assert "['attention']" in needs.parameter(2, ("tensor",))
  joint = sharding.MeshNeeds.of(params, sharding.param_specs(model, JOINT_RULES), 8, JOINT_RULES)
  assert joint.tensor_dims == (32,) and joint.other_dims == ((32, ("fsdp", "tensor")),)


# Base: width 768, heads 12, mlp 3072, vocab 64,000.
BASE = dict(fsdp_dims=(768,), tensor_dims=(12, 3072, 64_000))


@pytest.mark.parametrize(
  "devices, tensor, needs, want",
  [
    # fsdp alone would take the 4 devices left by tensor=2; 4 x 2 does not divide 36.
    (
      8,
      2,
      dict(fsdp_dims=(36,), tensor_dims=(36,), other_dims=((36, ("fsdp", "tensor")),)),
      (2, 2, 2),
    ),
    (16, 4, BASE, (1, 4, 4)),  # tensor=4 divides every tensor dimension: fsdp as before
  ],
)
def test_automatic_mesh_divides_tensor_and_joint_dimensions(devices, tensor, needs, want):
  c = tiny.get_config()
  c.mesh.tensor = tensor
  needs = sharding.MeshNeeds(batch_rows=devices, **needs)
  shape, _ = sharding.mesh_shape(c.mesh, devices, needs)
  assert shape == want
  assert not needs.indivisible(dict(zip(sharding.MESH_AXES, shape)))


def test_automatic_mesh_lists_the_tensor_sizes_that_fit():
  c = tiny.get_config()
  c.mesh.tensor = 8
  needs = sharding.MeshNeeds(batch_rows=64, **BASE)
  with pytest.raises(sharding.MeshError, match=r"tensor=8 .* dimension of 12; .*: 1, 2, 4$"):
    sharding.mesh_shape(c.mesh, 8, needs)


@pytest.mark.slow
def test_automatic_mesh_with_joint_rules_builds_the_state_on_permuted_devices():
  c = tiny.get_config()
  c.sharding_rules = JOINT_RULES
  c.model.width = 36  # fsdp=4 alone would divide it; fsdp x tensor = 8 does not
  c.mesh.tensor = 2
  devices = permuted_devices()
  run = state_lib.setup(c, devices)
  assert dict(run.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert [d.id for d in run.mesh.devices.flat] == [d.id for d in devices]  # not re-sorted
  state = state_lib.create(c, run)
  kernel = state["params"]["image_projection"]["kernel"]  # (36, 16): embed over fsdp x tensor
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(("fsdp", "tensor"), None)
  assert {s.data.shape for s in kernel.addressable_shards} == {(9, 16)}
  assert np.isfinite(np.asarray(kernel)).all()


@pytest.mark.parametrize("mode", ["cascade", "parallel"])
@pytest.mark.parametrize("key", ["contrastive_queries", "caption_queries"])
def test_two_poolers_need_queries(mode, key):
  c = tiny.get_config()
  c.model.pooler.mode = mode
  c.model.pooler[key] = 0
  with pytest.raises(ValueError, match=rf"config\.model\.pooler\.{key}=0: pooler mode '{mode}'"):
    nnx.eval_shape(lambda: coca.build(c.model))


def test_open_clip_layout_in_a_two_pooler_mode_fails():
  c = open_clip_tiny.get_config()  # open_clip_layout: contrastive_queries=0, mode "single"
  nnx.eval_shape(lambda: coca.build(c.model))
  c.model.pooler.mode = "cascade"
  with pytest.raises(ValueError, match=r"config\.model\.pooler\.contrastive_queries=0"):
    nnx.eval_shape(lambda: coca.build(c.model))


def test_odd_class_counts_take_a_tensor_axis():
  """The VQA and video classifiers' `classes` are replicated: 7 answers and 5 classes on
  tensor=2 (the `vocab` rule gave an indivisible dimension). The text vocabulary stays
  split over tensor."""
  c = tiny.get_config()
  c.model.vqa.num_answers, c.model.video.num_classes = 7, 5
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  shardings = state_lib.setup(c, permuted_devices()).layout.shardings["params"]
  P = jax.sharding.PartitionSpec
  assert shardings["vqa_head"]["classifier"]["kernel"].spec == P("fsdp", None)
  assert shardings["video_head"]["classifier"]["kernel"].spec == P("fsdp", None)
  assert shardings["vqa_head"]["classifier"]["bias"].spec == P(None)
  assert shardings["text"]["token_embedding"].spec == P("tensor", "fsdp")


def test_a_config_json_without_the_classes_rule_gets_it(tmp_path):
  """An export's config.json written before the `classes` axis existed: its rules gain
  ("classes", None), and its own entries stay as written."""
  c = tiny.get_config()
  old_rules = [[name, axes] for name, axes in c.sharding_rules if name != "classes"]
  old_rules[0] = ["batch", "data"]  # the export's own choice, kept
  c.sharding_rules = old_rules
  (tmp_path / "config.json").write_text(c.to_json_best_effort())
  read = export.read_config(tmp_path / "config.json")
  assert sharding.logical_to_spec(("embed", "classes"), read.sharding_rules) == (
    jax.sharding.PartitionSpec("fsdp", None)
  )
  assert sharding.logical_to_spec(("batch",), read.sharding_rules) == (
    jax.sharding.PartitionSpec("data")
  )
  assert [name for name, _ in read.sharding_rules].count("classes") == 1
