"""The same step on 1 device and on 8 forced host devices under several meshes."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from coca_jax import losses, sharding
from coca_jax import state as state_lib
from coca_jax import step as step_lib
from configs import tiny

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]


def host_batch(seed=0, batch=8):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 64, (batch, 8)).astype(np.int32)
  lengths = rng.integers(2, 9, batch)
  mask = (np.arange(8)[None] < lengths[:, None]).astype(np.int32)
  return dict(
    image=rng.normal(size=(batch, 16, 16, 3)).astype(np.float32),
    text=dict(ids=ids * mask, labels=np.roll(ids, -1, 1) * mask, mask=mask),
  )


def configured(mesh_shape, **train):
  c = tiny.get_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_shape
  for k, v in train.items():
    c.train[k] = v
  return c


def setup(config):
  devices = jax.devices()[: int(np.prod([config.mesh.data, config.mesh.fsdp, config.mesh.tensor]))]
  run = state_lib.setup(config, devices)
  state = state_lib.create(config, run)
  return run.mesh, run.layout, state, step_lib.make_train_step(config, run)


def run_three_steps(config):
  """Three steps on fixed batches; also counts how often the loss is traced."""
  traces = []
  real_total_loss = losses.total_loss

  def counting_total_loss(*args, **kwargs):
    traces.append(1)
    return real_total_loss(*args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(losses, "total_loss", counting_total_loss)
    mesh, _, state, train_step = setup(config)
    metrics = []
    for seed in (0, 1, 2):
      state, m = train_step(
        state, sharding.global_batch(host_batch(seed), mesh, config.sharding_rules)
      )
      metrics.append(jax.device_get(m))
  assert len(traces) == 1, "the train step was traced more than once"
  return jax.device_get(state["params"]), metrics


@pytest.fixture(scope="module")
def single_device_run():
  return run_three_steps(configured((1, 1, 1)))


@pytest.mark.parametrize(
  "mesh_shape",
  # One mesh in the quick loop; the 2-D and 3-D ones (~20 s each) in the slow set.
  [MESHES[1], *(pytest.param(m, marks=pytest.mark.slow) for m in MESHES[2:])],
)
def test_meshes_agree_with_a_single_device(mesh_shape, single_device_run):
  params, metrics = run_three_steps(configured(mesh_shape))
  ref_params, ref_metrics = single_device_run
  for got, want in zip(metrics, ref_metrics):
    for key in ("loss", "contrastive_loss", "captioning_loss", "grad_norm"):
      np.testing.assert_allclose(
        got[key], want[key], rtol=2e-5, err_msg=f"{key} on mesh {mesh_shape}"
      )
  # Reductions in another order differ in the last bits; Adafactor's normalised updates
  # carry that to ~1e-6 on parameters of scale 0.1. A sharding bug moves them by ~lr (8e-4).
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params, ref_params
  )


@pytest.mark.slow  # initialises sharded state on a 2x2x2 mesh (~9 s)
def test_params_and_optimizer_state_are_sharded_by_the_rules():
  config = configured((2, 2, 2))
  config.optim.factored_min_dim = 4
  _, layout, state, _ = setup(config)
  params = state["params"]
  assert params["text"]["unimodal"]["layers"]["mlp"]["up"]["kernel"].sharding.spec == P(
    None, "fsdp", "tensor"
  )
  assert params["text"]["token_embedding"].sharding.spec == P("tensor", "fsdp")
  assert params["vision"]["blocks"]["layers"]["self_attention"]["query"].sharding.spec == P(
    None, "fsdp", "tensor", None
  )
  assert params["log_inv_temperature"].sharding.spec == P()
  factored = [
    s
    for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda x: hasattr(x, "v_row"))
    if hasattr(s, "v_row")
  ][0]
  # The [L, D, F] kernel's row statistics drop F, its column statistics drop D.
  up_row = factored.v_row["text"]["unimodal"]["layers"]["mlp"]["up"]["kernel"]
  up_col = factored.v_col["text"]["unimodal"]["layers"]["mlp"]["up"]["kernel"]
  assert up_row.shape == (1, 32) and up_row.sharding.spec == P(None, "fsdp")
  assert up_col.shape == (1, 64) and up_col.sharding.spec == P(None, "tensor")
  # Every leaf really is spread: no param is fully replicated when a rule shards it.
  assert len(params["text"]["token_embedding"].addressable_shards) == 8
  assert params["text"]["token_embedding"].addressable_shards[0].data.shape == (32, 16)


def test_contrastive_loss_uses_the_global_batch():
  config = configured((8, 1, 1))
  mesh = sharding.make_mesh(config.mesh)
  rng = np.random.default_rng(0)
  img = rng.normal(size=(16, 4)).astype(np.float32)
  txt = rng.normal(size=(16, 4)).astype(np.float32)
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  batch = sharding.global_batch(dict(img=img, txt=txt), mesh, config.sharding_rules)
  assert len(batch["img"].addressable_shards) == 8

  @jax.jit
  def sharded_loss(b):
    from flax import nnx

    with nnx.logical_axis_rules(config.sharding_rules):
      return losses.contrastive_loss(b["img"], b["txt"], 0.1)[0]

  with jax.set_mesh(mesh):
    got = float(sharded_loss(batch))
  logits = img @ txt.T / 0.1
  lse_rows = np.log(np.exp(logits).sum(1))
  lse_cols = np.log(np.exp(logits).sum(0))
  want = (lse_rows - np.diag(logits)).mean() + (lse_cols - np.diag(logits)).mean()  # Eq. 1
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Per-device losses (negatives from 2 examples only) would differ a lot.
  assert abs(got - want) < 1e-4


def test_mesh_errors_name_the_sizes():
  c = tiny.get_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 3, 1, 1
  with pytest.raises(ValueError, match=r"data=3, fsdp=1, tensor=1.*8 are present"):
    sharding.make_mesh(c.mesh)
  c.mesh.data, c.mesh.fsdp = 3, -1
  with pytest.raises(ValueError, match="does not divide the 8 devices"):
    sharding.make_mesh(c.mesh)
  c.mesh.data = 2
  assert sharding.mesh_shape(c.mesh, 8)[0] == (2, 4, 1)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, -1, -1
  with pytest.raises(sharding.MeshError, match="positive or -1"):
    sharding.mesh_shape(c.mesh, 8)


@pytest.mark.parametrize(
  "devices, tensor, needs, want",
  [
    # CoCa 2.1B (width 1408 = 2^7 x 11) on 2,048 v4 chips: the pod of Section 4.1.
    (2048, 1, sharding.MeshNeeds((1408,), 65_536), (16, 128, 1)),
    (1024, 1, sharding.MeshNeeds((768,), 65_536), (4, 256, 1)),  # Base: 768 = 2^8 x 3
    (8, 1, sharding.MeshNeeds((32,), 8), (1, 8, 1)),  # FSDP over all when it divides
    (16, 2, sharding.MeshNeeds((36, 64), 16), (2, 4, 2)),  # tensor stays as configured
    (7, 1, sharding.MeshNeeds((32,)), (7, 1, 1)),  # nothing divides: data parallel
    # A batch split over fsdp only must stay whole: 8 does not divide 4 rows, 4 does.
    (8, 1, sharding.MeshNeeds((64,), 4, ("fsdp",)), (2, 4, 1)),
  ],
)
def test_automatic_mesh(devices, tensor, needs, want):
  c = tiny.get_config()
  c.mesh.tensor = tensor
  assert (c.mesh.data, c.mesh.fsdp) == (-1, -1)  # the default
  shape, why = sharding.mesh_shape(c.mesh, devices, needs)
  assert shape == want
  assert f"fsdp={want[1]}" in why and f"data={want[0]}" in why
  # Explicit sizes still win.
  c.mesh.data, c.mesh.fsdp = devices // tensor, 1
  assert sharding.mesh_shape(c.mesh, devices, needs)[0] == (devices // tensor, 1, tensor)


def test_setup_resolves_the_automatic_mesh_from_the_model():
  c = tiny.get_config()
  c.model.width = 36  # fsdp-sharded dimension: 8 does not divide it, 4 does
  run = state_lib.setup(c, jax.devices())
  assert dict(run.mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert "gcd: 36" in run.mesh_reason


def test_the_predictor_keeps_the_models_sharding_constraints_on_a_mesh(monkeypatch):
  """Evaluations on the training mesh traced the model without the logical-axis rules,
  so every activation constraint (sharding.constrain) was a no-op there, unlike in the
  train step; the embeddings are the same either way."""
  from coca_jax import predict
  from coca_jax.models import coca

  config = configured((2, 4, 1))
  model = coca.build(config.model, seed=0)
  images = np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype(np.float32)
  plain = predict.Predictor(model, config, None, 8).embed_images(images)
  active = []
  constrain = sharding.constrain

  def recording(x, logical_axes):
    active.append(bool(sharding.flax_spmd.get_logical_axis_rules()))
    return constrain(x, logical_axes)

  monkeypatch.setattr(sharding, "constrain", recording)
  predict._compiled.cache_clear()  # trace afresh
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    on_mesh = predict.Predictor(model, config, None, 8, mesh=mesh).embed_images(images)
  assert active and all(active)
  np.testing.assert_allclose(on_mesh, plain, atol=1e-5)
