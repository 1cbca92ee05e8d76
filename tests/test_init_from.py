"""config.train.init_from (an export or a workdir's checkpoint), config.train.init_exclude
and config.train.frozen."""

import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_dots import dot_generals
from tiny_runs import tiny_config

from coca_jax import checkpoint, export, init_from, optim, train
from coca_jax import params as params_lib
from coca_jax import state as state_lib
from coca_jax import step as step_lib
from coca_jax.data import loader
from coca_jax.models import vit


def flat(params) -> dict:
  """{'a/b': numpy array} of a params tree."""
  return {
    "/".join(params_lib.path_names(p)): np.asarray(x)
    for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
  }


def assert_params_equal(a: dict, b: dict):
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A tiny model initialised with another seed than the finetune runs' (so a loaded
  parameter cannot equal a fresh one by chance), written as a float32 export and as a
  workdir with checkpoints at step 3 and step 6 (parameters x2; the temperature +0.1 in
  log, still in its range)."""
  root = tmp_path_factory.mktemp("source")
  config = tiny_config(6, train=dict(seed=1))
  run = state_lib.setup(config)
  state = state_lib.create(config, run)
  params = flat(state["params"])
  export.write(state["params"], config, str(root / "export"), "float32", None)
  mngr = checkpoint.manager(str(root / "workdir"), config.train)
  checkpoint.save(mngr, dict(state, step=np.int32(3)), dict(step=3, seed=0))

  def later(name, x):  # step 6's value: x2, the temperature kept in its range
    return x + 0.1 if name == "log_inv_temperature" else 2 * x

  step6 = jax.tree_util.tree_map_with_path(
    lambda path, x: later("/".join(params_lib.path_names(path)), x), state["params"]
  )
  checkpoint.save(mngr, dict(state, params=step6, step=np.int32(6)), dict(step=6, seed=0))
  mngr.wait_until_finished()
  mngr.close()
  return dict(root=root, params=params, doubled={k: later(k, v) for k, v in params.items()})


def finetune(init_from_dir, image_size=16):
  """The tiny config starting from `init_from_dir`."""
  config = tiny_config(3, train=dict(init_from=str(init_from_dir)))
  config.model.vision.image_size = image_size
  return config


@pytest.mark.slow  # ~12 s
def test_export_loads_its_params_and_embeddings_in_the_state_shardings(source, caplog):
  config = finetune(source["root"] / "export")
  run = state_lib.setup(config)
  with caplog.at_level(logging.INFO):
    state, report = init_from.create(config, run)
  assert_params_equal(flat(state["params"]), source["params"])
  assert report.new == () and report.unused == () and report.resampled == ()
  assert len(report.loaded) == len(source["params"])
  assert f"init_from export {source['root'] / 'export'}: loaded {len(report.loaded)}" in caplog.text
  assert "model layout differs" not in caplog.text
  # Every array in the layout's sharding; a fresh optimizer state (Adafactor's statistics
  # and momentum start at zero) at step 0.
  jax.tree.map(
    lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(f"{x.sharding} != {s}"),
    state,
    run.layout.shardings,
  )
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(state["opt_state"]))
  assert int(state["step"]) == 0

  exported, _ = export.load_model(str(source["root"] / "export"))
  model = state_lib.model_from_params(run.layout.graphdef, jax.device_get(state["params"]))
  rng = np.random.default_rng(0)
  image = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  ids = rng.integers(3, 64, (2, 8)).astype(np.int32)
  mask = np.ones((2, 8), np.int32)
  np.testing.assert_allclose(model.encode_image(image)[0], exported.encode_image(image)[0])
  np.testing.assert_allclose(model.encode_text(ids, mask)[0], exported.encode_text(ids, mask)[0])


def test_layout_options_without_parameters_that_differ_from_the_sources_are_named(source, caplog):
  """GELU's form, the text mask or the token contract changed under init_from loaded
  every parameter without a word, and the weights computed another function."""
  config = finetune(source["root"] / "export")
  config.model.gelu_approximate = False
  config.model.text.mask_mode = "open_clip_legacy"
  config.model.attention = "xla"  # the same function: not named
  with caplog.at_level(logging.WARNING):
    init_from._warn_if_other_layout(source["root"] / "export", config)
  assert "model layout differs from the source's" in caplog.text
  assert "model.gelu_approximate: True -> False" in caplog.text
  assert "model.text.mask_mode: 'paper' -> 'open_clip_legacy'" in caplog.text
  assert "attention" not in caplog.text.replace("attention_key_bias", "")
  older = finetune(source["root"] / "export").model
  del older.text["mask_mode"]  # a config from before the option: its default
  assert init_from.layout_differences(older, finetune(source["root"]).model) == []


def test_workdir_loads_the_newest_readable_checkpoint(source, tmp_path, caplog):
  config = finetune(source["root"] / "workdir")
  run = state_lib.setup(config)
  state, report = init_from.create(config, run)
  assert report.source == f"checkpoint step 6 of {source['root'] / 'workdir'}"
  assert_params_equal(flat(state["params"]), source["doubled"])

  # Step 6 unreadable: step 3 is loaded, with a warning naming step 6.
  workdir = tmp_path / "workdir"
  shutil.copytree(source["root"] / "workdir", workdir)
  (workdir / "checkpoints" / "6" / "state" / "_METADATA").write_bytes(b"\x00broken")
  config.train.init_from = str(workdir)
  with caplog.at_level(logging.WARNING):
    state, report = init_from.create(config, run)
  assert report.source == f"checkpoint step 3 of {workdir}"
  assert "skipping unreadable checkpoint" in caplog.text and "6" in caplog.text
  assert_params_equal(flat(state["params"]), source["params"])

  # Step 6's files replaced by other, readable ones (a storage fault): its fingerprints
  # tell, and step 3 is loaded. Before, step 6 was loaded with the wrong values.
  shutil.rmtree(workdir / "checkpoints" / "6" / "state")
  other = tmp_path / "other"
  mngr = checkpoint.manager(str(other), config.train)
  state6 = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, state)
  checkpoint.save(mngr, dict(state6, step=np.int32(6)), dict(step=6, seed=0))
  mngr.wait_until_finished()
  mngr.close()
  shutil.copytree(other / "checkpoints" / "6" / "state", workdir / "checkpoints" / "6" / "state")
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    state, report = init_from.create(config, run)
  assert report.source == f"checkpoint step 3 of {workdir}"
  assert "hold other values than were saved (e.g. params/" in caplog.text
  assert_params_equal(flat(state["params"]), source["params"])


def test_neither_export_nor_workdir_is_an_error_naming_both(tmp_path):
  config = finetune(tmp_path / "nothere")
  with pytest.raises(FileNotFoundError, match="neither an export .*params.* nor a training"):
    init_from.create(config, state_lib.setup(config))
  # The trainer names it before it writes anything (no checkpoints/ left behind).
  with pytest.raises(FileNotFoundError, match="neither an export .*params.* nor a training"):
    train.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
  "key, value, mismatch",
  [
    ("text.vocab_size", 100, "text/token_embedding is (64, 32) there, (100, 32) here"),
    ("width", 48, "text/token_embedding is (64, 32) there, (64, 48) here"),
    ("vision.mlp_dim", 128, "vision/blocks/layers/mlp/up/kernel is (2, 32, 64) there, "),
  ],
  ids=["vocabulary", "width", "mlp"],
)
def test_a_shape_mismatch_is_an_error_naming_the_parameter_and_both_shapes(
  source, key, value, mismatch
):
  config = finetune(source["root"] / "export")
  *sections, leaf = key.split(".")
  node = config.model
  for section in sections:
    node = node[section]
  node[leaf] = value
  with pytest.raises(ValueError, match="does not fit config.model") as error:
    init_from.create(config, state_lib.setup(config))
  assert mismatch in str(error.value)


def shapes(model_config) -> dict:
  """{path names: shape} of a model's parameters (jax.eval_shape: nothing allocated)."""
  abstract = params_lib.abstract(model_config)
  return {
    params_lib.path_names(p): tuple(leaf.shape)
    for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
  }


@pytest.mark.parametrize(
  "section, key, unit",
  [("vqa", "num_answers", "answers"), ("video", "num_classes", "classes")],
)
def test_a_task_head_of_another_size_is_an_error_saying_what_to_set(section, key, unit):
  """The common transfer case, a source finetuned on another answer vocabulary or class
  list: the message named the shapes but blamed 'vocabulary, widths, layer counts and
  text length' and said nothing of the head's config key."""
  model = tiny_config(1).model
  model[section][key] = 4
  stored = shapes(model)
  model[section][key] = 7
  head = f"{section}_head"
  with pytest.raises(ValueError) as error:
    init_from.plan(stored, shapes(model), "export /src")
  message = str(error.value)
  width = model.width
  assert message.startswith("config.train.init_from (export /src) does not fit config.model: ")
  assert f"{head}/classifier/kernel is ({width}, 4) there, ({width}, 7) here" in message
  assert f"{head}/classifier/bias is (4,) there, (7,) here" in message
  assert f"classifies 4 {unit}, config.model.{section}.{key}=7 here" in message
  assert f"set config.model.{section}.{key}=4" in message
  assert (
    f'to train a new classifier of 7 {unit}, set config.train.init_exclude=("^{head}/classifier/",)'
    in message
  )
  assert f'("^{head}/",) for a whole new' in message
  # Only the head differs: the advice about widths and vocabularies does not apply.
  assert "layer counts" not in message
  # Together with another difference, both pieces of advice.
  model.width = 48
  with pytest.raises(ValueError, match=f"set config.model.{section}.{key}=4.*layer counts"):
    init_from.plan(stored, shapes(model), "export /src")


def classifier(head) -> tuple[str, str]:
  return (f"{head}/classifier/bias", f"{head}/classifier/kernel")


@pytest.mark.parametrize("section, key", [("vqa", "num_answers"), ("video", "num_classes")])
def test_plan_initialises_an_excluded_head_of_another_size_fresh_and_loads_the_rest(section, key):
  """What the hint above advises: the classifier is excluded, the head's pooler loads."""
  model = tiny_config(1).model
  model[section][key] = 4
  stored = shapes(model)
  model[section][key] = 7
  target = shapes(model)
  head = f"{section}_head"
  report = init_from.plan(stored, target, "export /src", excluded=set(classifier(head)))
  assert report.excluded == classifier(head)
  assert report.new == () and report.unused == ()
  names = {"/".join(p) for p in target}
  assert set(report.loaded) == names - set(classifier(head))
  assert f"{head}/pooler/queries" in report.loaded
  # Excluding a parameter the source lacks: excluded, not new.
  del stored[(head, "classifier", "kernel")]
  report = init_from.plan(stored, target, "export /src", excluded=set(classifier(head)))
  assert report.excluded == classifier(head) and report.new == ()


def test_an_excluded_frozen_parameter_is_an_error_before_reading(source):
  """Excluded and frozen, it would stay random all run, as a frozen one the source lacks."""
  config = finetune(source["root"] / "export")
  config.train.frozen = ("^text_projection/", "^vision/")
  config.train.init_exclude = ("text_projection",)
  with pytest.raises(ValueError) as error:
    init_from.create(config, state_lib.setup(config))
  assert str(error.value) == (
    "config.train.frozen freezes text_projection/kernel, which config.train.init_exclude "
    "initialises fresh instead of reading them from config.train.init_from: frozen, they "
    "would keep their random initialisation for the whole run. Narrow config.train.frozen or "
    "config.train.init_exclude (both match, for example: text_projection/kernel)."
  )
  target = {("a",): (2,), ("b",): (3,)}
  with pytest.raises(ValueError, match="freezes b, which config.train.init_exclude"):
    init_from.plan(target, target, "src", frozen={"a", "b"}, excluded={"b"})
  report = init_from.plan(target, target, "src", frozen={"a"}, excluded={"b"})
  assert report.loaded == ("a",) and report.excluded == ("b",) and report.new == ()


@pytest.mark.parametrize(
  "patterns, message",
  [
    (
      ("^vision/", "^vqa_haed/"),
      r"^config\.train\.init_exclude pattern '\^vqa_haed/' matches no parameter; paths are "
      r"'/'-joined, e\.g\. '[a-z_/]+', under: caption_pooler, ",
    ),
    (
      ("",),
      r"^config\.train\.init_exclude=\('',\) holds an empty pattern, which would match every",
    ),
  ],
  ids=["matches-nothing", "empty"],
)
def test_an_init_exclude_pattern_matching_nothing_or_everything_is_an_error(
  source, patterns, message
):
  config = finetune(source["root"] / "export")
  config.train.init_exclude = patterns
  with pytest.raises(ValueError, match=message):
    init_from.create(config, state_lib.setup(config))


@pytest.mark.slow  # ~9 s: writes an export and initialises twice
def test_an_excluded_head_of_another_size_starts_fresh_and_the_rest_loads_bitwise(
  source, tmp_path, caplog
):
  """A VQA-finetuned source (4 answers) into a run with 7; text_projection/kernel is
  excluded too, at the same shape as the source's."""
  model = tiny_config(1).model
  model.vqa.num_answers = 4
  rng = np.random.default_rng(0)
  head = {
    "/".join(p): rng.normal(size=shape).astype(np.float32)
    for p, shape in shapes(model).items()
    if p[0] == "vqa_head"
  }
  params = {**source["params"], **head}
  config = write_export(params, tmp_path / "export")
  config.model.vqa.num_answers = 7
  config.train.init_exclude = ("^vqa_head/classifier/", "^text_projection/")
  run = state_lib.setup(config)
  with caplog.at_level(logging.INFO):
    state, report = init_from.create(config, run)
  excluded = {*classifier("vqa_head"), "text_projection/kernel"}
  assert set(report.excluded) == excluded and report.new == () and report.unused == ()
  assert not excluded & set(report.loaded)
  assert "init_from: excluded (initialised fresh) 3: text_projection/kernel, vqa_head/* (2)" in (
    caplog.text
  )
  loaded = flat(state["params"])
  fresh = flat(state_lib.create(config, run)["params"])  # the same run without init_from
  for name in excluded:
    np.testing.assert_array_equal(loaded[name], fresh[name], err_msg=name)
  assert loaded["vqa_head/classifier/kernel"].shape == (32, 7)
  assert not np.array_equal(loaded["text_projection/kernel"], params["text_projection/kernel"])
  assert_params_equal(
    {k: v for k, v in loaded.items() if k not in excluded},
    {k: v for k, v in params.items() if k not in excluded},
  )


def test_an_excluded_parameter_of_the_same_shape_is_not_read_from_a_workdir(source):
  config = finetune(source["root"] / "workdir")
  config.train.init_exclude = ("caption_pooler/queries",)
  state, report = init_from.create(config, state_lib.setup(config))
  assert report.excluded == ("caption_pooler/queries",)
  assert "caption_pooler/queries" not in report.loaded
  assert len(report.loaded) == len(source["doubled"]) - 1
  assert report.log_lines()[-2] == (
    "init_from: excluded (initialised fresh) 1: caption_pooler/queries"
  )
  loaded = flat(state["params"])
  name = "caption_pooler/queries"
  assert loaded[name].shape == source["doubled"][name].shape
  assert not np.array_equal(loaded[name], source["doubled"][name])
  assert not np.array_equal(loaded[name], source["params"][name])
  del loaded[name]
  assert_params_equal(loaded, {k: v for k, v in source["doubled"].items() if k != name})


def test_an_image_size_change_resamples_the_position_embedding(source):
  config = finetune(source["root"] / "export", image_size=32)
  state, report = init_from.create(config, state_lib.setup(config))
  name = "/".join(vit.POS_EMBEDDING_PATH)
  assert report.resampled == (name,) and name in report.loaded
  loaded = flat(state["params"])
  assert loaded[name].shape == (64, 32)
  expected = vit.resize_pos_embedding(jax.numpy.asarray(source["params"][name]), 64)
  np.testing.assert_array_equal(loaded[name], np.asarray(expected))
  rest = {k: v for k, v in loaded.items() if k != name}
  assert_params_equal(rest, {k: v for k, v in source["params"].items() if k != name})


def write_export(params: dict, directory):
  """Writes {'/'-joined name: array} as an export at `directory`; the tiny finetune config
  starting from it."""
  config = finetune(directory)
  tree = init_from._nest({tuple(name.split("/")): value for name, value in params.items()})
  export.write(tree, config, str(directory), "float32", None)
  return config


@pytest.mark.slow  # ~9 s
def test_new_and_unused_parameters_are_reported_and_new_ones_initialised_fresh(
  source, tmp_path, caplog
):
  """A source lacking one leaf of the model (as a task head is missing from a pretrained
  export) and holding one the model lacks."""
  params = {k: v for k, v in source["params"].items() if k != "text_projection/kernel"}
  params["vqa_head/kernel"] = np.ones((32, 4), np.float32)
  config = write_export(params, tmp_path / "export")

  run = state_lib.setup(config)
  with caplog.at_level(logging.INFO):
    state, report = init_from.create(config, run)
  assert report.new == ("text_projection/kernel",)
  assert report.unused == ("vqa_head/kernel",)
  assert "new (initialised fresh) 1: text_projection/kernel" in caplog.text
  assert "unused (in the source only) 1: vqa_head/kernel" in caplog.text
  fresh = flat(state_lib.create(config, run)["params"])
  loaded = flat(state["params"])
  np.testing.assert_array_equal(loaded["text_projection/kernel"], fresh["text_projection/kernel"])
  del params["vqa_head/kernel"]
  assert_params_equal({k: v for k, v in loaded.items() if k in params}, params)


def test_a_frozen_parameter_the_source_lacks_is_an_error_before_reading(source, tmp_path):
  """Frozen and initialised fresh, it would stay random all run (the review's case: a
  sincos-position export into a learned-position model with the vision tower frozen)."""
  params = {k: v for k, v in source["params"].items() if k != "text_projection/kernel"}
  config = write_export(params, tmp_path / "export")
  config.train.frozen = ("^text_projection/",)
  with pytest.raises(ValueError, match="freezes text_projection/kernel, which config.train"):
    init_from.create(config, state_lib.setup(config))
  # Unfrozen, the same source is a plain "new" parameter.
  report = init_from.plan({("a",): (2,)}, {("a",): (2,), ("b",): (3,)}, "src", {"a"})
  assert report.new == ("b",) and report.loaded == ("a",)
  with pytest.raises(ValueError, match="freezes b, which"):
    init_from.plan({("a",): (2,)}, {("a",): (2,), ("b",): (3,)}, "src", {"a", "b"})


def test_compact_names_groups_by_first_component():
  names = ["vision/a", "vision/b/c", "text_projection/kernel", "log_inv_temperature"]
  assert init_from.compact(names) == "log_inv_temperature, text_projection/kernel, vision/* (2)"
  assert init_from.compact([]) == "none"


def test_a_frozen_pattern_that_matches_nothing_is_an_error_naming_it():
  params = params_lib.abstract(tiny_config(1).model)
  with pytest.raises(ValueError, match=r"^config.train.frozen pattern '\^visoin/' matches no "):
    optim.frozen_mask(params, ("^vision/", "^visoin/"))
  with pytest.raises(ValueError, match="^config.train.frozen=.*empty pattern, which would match"):
    optim.frozen_mask(params, ("",))  # what `--config.train.frozen=` parses to
  with pytest.raises(ValueError, match=r"no parameter \(not a valid regular expression: "):
    optim.frozen_mask(params, ("^vision/[",))  # a typo: was 'matches no parameter' alone
  mask = optim.frozen_mask(params, ("^vision/", "unimodal/layers/mlp/"))
  frozen = {k for k, f in flat(mask).items() if f}
  assert frozen == {k for k in flat(params) if k.startswith("vision/")} | {
    k for k in flat(params) if k.startswith("text/unimodal/layers/mlp/")
  }


@pytest.mark.slow
@pytest.mark.parametrize("accum_steps", [1, 2])
def test_frozen_parameters_get_zero_gradients_and_no_backward_pass(accum_steps):
  from coca_jax.data import synthetic

  def gradients(frozen):
    config = tiny_config(1, train=dict(frozen=frozen, grad_accum_steps=accum_steps))
    run = state_lib.setup(config)
    params = state_lib.create(config, run)["params"]
    m = config.model
    batch = synthetic.batch(0, 0, range(4), m.vision.image_size, m.text.max_len, m.text.vocab_size)
    fn = step_lib.make_gradients(config, run.layout.graphdef)
    dots = sum(times for _, times in dot_generals(jax.make_jaxpr(fn)(params, batch).jaxpr))
    grads, _ = jax.jit(fn)(params, batch)
    return dots, flat(grads)

  plain_dots, plain = gradients(())
  frozen_dots, frozen = gradients(("^vision/",))
  assert plain.keys() == frozen.keys()
  for name, grad in frozen.items():
    if name.startswith("vision/"):
      assert not grad.any(), name  # exactly zero
      assert plain[name].any(), name
    else:
      np.testing.assert_allclose(grad, plain[name], rtol=1e-4, atol=1e-6, err_msg=name)
  # The ViT's backward is gone: per layer its 8 forward dots (q, k, v, out, scores,
  # weighted values, 2 MLP) each had 2 backward dots.
  assert plain_dots - frozen_dots >= 2 * 8 * tiny_config(1).model.vision.layers


def specs(shardings) -> dict:
  """{'a/b': str(PartitionSpec)} of a tree of shardings."""
  return {
    "/".join(params_lib.path_names(p)): str(s.spec)
    for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]
  }


def test_frozen_parameters_have_no_optimizer_state_and_trained_ones_keep_their_shardings():
  mesh = dict(data=2, fsdp=4, tensor=1)
  frozen = specs(
    state_lib.setup(tiny_config(3, train=dict(frozen=("^vision/",)), mesh=mesh)).layout.shardings
  )
  plain = specs(state_lib.setup(tiny_config(3, mesh=mesh)).layout.shardings)
  assert not [k for k in frozen if "vision/" in k and not k.startswith("params/")]
  prefix = "opt_state/inner_states/trained/inner_state/"
  trained = {k.removeprefix(prefix): v for k, v in frozen.items() if k.startswith(prefix)}
  assert len(trained) == len([k for k in frozen if k.startswith("opt_state/")])
  plain_opt = {
    k.removeprefix("opt_state/"): v for k, v in plain.items() if k.startswith("opt_state/")
  }
  assert trained == {k: v for k, v in plain_opt.items() if "vision/" not in k}
  assert any("'fsdp'" in v for v in trained.values())


@pytest.mark.slow  # ~10 s
def test_a_loaded_temperature_outside_the_configured_range_is_named(source):
  """tau 0.07 read into a run whose range is [0.1, 1]: the first update clamped it to 0.1
  whatever the learning rate (frozen, it stayed outside all run)."""
  config = finetune(source["root"] / "export")
  config.model.temperature.update(init=0.2, min=0.1)
  run = state_lib.setup(config)
  with pytest.raises(ValueError, match=r"its temperature 0\.07 is outside .*\[0\.1, 1\.0\]"):
    init_from.create(config, run)
  config.train.init_exclude = ("^log_inv_temperature$",)
  state, _ = init_from.create(config, run)
  assert float(state["params"]["log_inv_temperature"]) == pytest.approx(np.log(1 / 0.2))


@pytest.mark.slow  # ~10 s
def test_a_bfloat16_export_keeps_a_temperature_at_its_bound(source, tmp_path):
  """Rounded to bfloat16, log(1 / 0.05) = 2.9957 became 3.0, tau 0.0498 < min 0.05: a run
  whose temperature trained to its bound could not init_from its own bfloat16 export."""
  config = tiny_config(3)
  config.model.temperature.update(init=0.05, min=0.05)
  state = state_lib.create(config, state_lib.setup(config))
  export.write(state["params"], config, str(tmp_path / "export"), "bfloat16", None)
  model, _ = export.load_model(str(tmp_path / "export"))
  assert float(model.log_inv_temperature[...]) == np.float32(np.log(1 / 0.05))
  config.train.init_from = str(tmp_path / "export")
  loaded, _ = init_from.create(config, state_lib.setup(config))
  assert float(loaded["params"]["log_inv_temperature"]) == np.float32(np.log(1 / 0.05))


@pytest.mark.slow
def test_frozen_parameters_stay_bitwise_while_the_others_move(source):
  config = finetune(source["root"] / "export")
  config.train.frozen = ("^vision/", "caption_pooler")
  # A no_decay pattern for frozen parameters alone (helper-88): the step's decay mask sees
  # the trained ones only, and it had failed the first step as "in no parameter's name".
  config.optim.no_decay = (*config.optim.no_decay, "patch")
  assert config.optim.weight_decay > 0
  run = state_lib.setup(config)
  names = params_lib.count_by_path(run.layout.abstract["params"])
  assert {n.split("/")[0] for n in names if "patch" in n} == {"vision"}

  state, _ = init_from.create(config, run)
  before = flat(state["params"])
  train_step = step_lib.make_train_step(config, run)
  for batch in loader.batches(config, run.mesh, "train", 0, limit=3):
    state, metrics = train_step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  after = flat(state["params"])
  for name in after:
    if name.startswith(("vision/", "caption_pooler/")):
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    elif name != "log_inv_temperature":  # every other parameter gets a gradient
      assert not np.array_equal(after[name], before[name]), name


@pytest.mark.slow  # two end-to-end training runs
def test_trainer_finetunes_from_an_export_and_a_resume_ignores_init_from(source, tmp_path, caplog):
  export_dir = source["root"] / "export"
  config = finetune(export_dir)
  config.train.frozen = ("^vision/",)
  with caplog.at_level(logging.INFO):
    final = train.train(config, str(tmp_path))
  assert final["step"] == 3
  assert f"init_from export {export_dir}: loaded {len(source['params'])} parameters" in caplog.text
  vision = [k for k in source["params"] if k.startswith("vision/")]
  assert f"frozen by config.train.frozen=('^vision/',): {len(vision)} of" in caplog.text
  layout = state_lib.setup(config).layout
  state, _ = checkpoint.restore(
    checkpoint.manager(str(tmp_path), config.train, read_only=True), layout
  )
  params = flat(state["params"])
  for name in vision:
    np.testing.assert_array_equal(params[name], source["params"][name], err_msg=name)
  assert not np.array_equal(
    params["text/token_embedding"], source["params"]["text/token_embedding"]
  )

  # The resumed run restores its own step 3 (its init_from is not even read: here it
  # does not exist), and says so.
  caplog.clear()
  config.train.steps = 6
  config.train.init_from = str(tmp_path / "no_such_export")
  with caplog.at_level(logging.INFO):
    final = train.train(config, str(tmp_path))
  assert final["step"] == 6
  assert "resumed from checkpoint step 3" in caplog.text
  assert f"init_from={tmp_path / 'no_such_export'} ignored" in caplog.text
