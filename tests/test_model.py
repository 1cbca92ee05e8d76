"""CoCa model: shapes, parameter counts vs Table 1, causality, [CLS] and pooler wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coca_jax import decode, losses
from coca_jax import params as params_lib
from coca_jax.models import coca, layers, text, vit
from configs import base, large, tiny
from configs import coca as coca_cfg

B, T = 3, 8


def tiny_batch(seed=0, lengths=(8, 5, 2)):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 64, size=(B, T)).astype(np.int32)
  mask = (np.arange(T)[None] < np.array(lengths)[:, None]).astype(np.int32)
  ids = np.where(mask == 1, ids, 0)
  image = rng.normal(size=(B, 16, 16, 3)).astype(np.float32)
  return dict(
    image=jnp.asarray(image),
    text=dict(ids=jnp.asarray(ids), mask=jnp.asarray(mask), labels=jnp.asarray(ids)),
  )


@pytest.fixture(scope="module")
def model():
  return coca.build(tiny.get_config().model, seed=0)


def test_public_method_shapes(model):
  batch = tiny_batch()
  image_embedding, caption_tokens = model.encode_image(batch["image"])
  assert image_embedding.shape == (B, 16) and image_embedding.dtype == jnp.float32
  assert caption_tokens.shape == (B, 8, 32)  # 8 caption queries in the tiny config
  text_embedding, unimodal_tokens = model.encode_text(batch["text"]["ids"], batch["text"]["mask"])
  assert text_embedding.shape == (B, 16) and unimodal_tokens.shape == (B, T, 32)
  np.testing.assert_allclose(np.linalg.norm(image_embedding, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(text_embedding, axis=-1), 1.0, rtol=1e-5)
  out = model(batch)
  assert out["logits"].shape == (B, T, 64) and out["logits"].dtype == jnp.float32
  np.testing.assert_allclose(float(out["temperature"]), 0.07, rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  m = coca.build(tiny.get_config("bf16").model)
  leaves = jax.tree.leaves(nnx.state(m, nnx.Param))
  assert all(x.dtype == jnp.float32 for x in leaves)
  out = m(tiny_batch())
  assert out["logits"].dtype == jnp.float32
  assert out["image_embedding"].dtype == jnp.float32


@pytest.mark.parametrize(
  "config_module, total, encoder, decoder",
  [(base, 383e6, 86e6, 297e6), (large, 787e6, 303e6, 484e6)],
)
def test_param_counts_match_table_1(config_module, total, encoder, decoder):
  counts = params_lib.count(params_lib.abstract(config_module.get_config().model))
  assert abs(counts["total"] - total) / total < 0.015, counts
  assert abs(counts["image_encoder"] - encoder) / encoder < 0.02, counts
  assert abs(counts["text_decoder"] - decoder) / decoder < 0.02, counts


def test_param_counts_of_the_2b_model():
  counts = params_lib.count(params_lib.abstract(coca_cfg.get_config().model))
  assert 1.0e9 <= counts["image_encoder"] < 1.1e9, counts
  assert 1.1e9 <= counts["text_decoder"] < 1.2e9, counts
  assert 2.1e9 <= counts["total"] < 2.25e9, counts
  assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_caption_logits_are_causal(model):
  batch = tiny_batch()
  t = 4
  changed = jax.tree.map(lambda x: x, batch)
  changed["text"]["ids"] = batch["text"]["ids"].at[0, t].set((batch["text"]["ids"][0, t] + 7) % 64)
  before, after = model(batch), model(changed)
  np.testing.assert_allclose(before["logits"][0, :t], after["logits"][0, :t], atol=1e-5)
  assert np.abs(before["logits"][0, t:] - after["logits"][0, t:]).max() > 1e-4
  _, uni_before = model.encode_text(batch["text"]["ids"], batch["text"]["mask"])
  _, uni_after = model.encode_text(changed["text"]["ids"], changed["text"]["mask"])
  np.testing.assert_allclose(uni_before[0, :t], uni_after[0, :t], atol=1e-5)
  assert np.abs(uni_before[0, t] - uni_after[0, t]).max() > 1e-4


def test_cls_sees_every_real_token_and_no_padding(model):
  batch = tiny_batch()
  ids, mask = batch["text"]["ids"], batch["text"]["mask"]
  reference, _ = model.encode_text(ids, mask)
  length = 5  # example 1 has 5 real tokens
  for t in range(length):
    emb, _ = model.encode_text(ids.at[1, t].set((ids[1, t] + 5) % 64), mask)
    assert np.abs(emb[1] - reference[1]).max() > 1e-5, f"[CLS] ignores real token {t}"
  for t in range(length, T):
    emb, _ = model.encode_text(ids.at[1, t].set(17), mask)
    np.testing.assert_allclose(emb[1], reference[1], atol=1e-6, err_msg=f"[CLS] sees padding {t}")


def test_text_embedding_does_not_depend_on_the_image(model):
  batch = tiny_batch()
  other = dict(batch, image=batch["image"] * -2.0 + 1.0)
  a, b = model(batch), model(other)
  np.testing.assert_array_equal(a["text_embedding"], b["text_embedding"])
  assert np.abs(a["image_embedding"] - b["image_embedding"]).max() > 1e-4
  assert np.abs(a["logits"] - b["logits"]).max() > 1e-4


@pytest.mark.parametrize("mode", ["cascade", "parallel"])
def test_pooler_wiring(mode):
  config = tiny.get_config("parallel" if mode == "parallel" else None)
  m = coca.build(config.model)
  image = tiny_batch()["image"]
  embedding, caption_tokens = m.encode_image(image)
  assert embedding.shape == (B, 16) and caption_tokens.shape == (B, 8, 32)
  # Perturb the captioning pooler: in cascade the contrastive pooler reads its output.
  m.caption_pooler.queries[...] = m.caption_pooler.queries[...] + 1.0
  perturbed, _ = m.encode_image(image)
  if mode == "cascade":
    assert np.abs(perturbed - embedding).max() > 1e-4
  else:
    np.testing.assert_array_equal(perturbed, embedding)


def test_patch_size_must_divide_image_size():
  config = tiny.get_config()
  config.model.vision.patch_size = 5
  with pytest.raises(ValueError, match=r"patch_size=5 does not divide image_size=16"):
    coca.build(config.model)


def test_unknown_remat_policy_is_a_config_error():
  config = tiny.get_config()
  config.model.remat_policy = "everything"
  with pytest.raises(ValueError, match="remat_policy"):
    coca.build(config.model)


def test_temperature_starts_at_its_init_and_is_stored_as_log_inverse():
  # The range [min, max] is kept by the optimizer (tests/test_optim.py), not the forward.
  m = coca.build(tiny.get_config().model)
  np.testing.assert_allclose(float(m.temperature()), 0.07, rtol=1e-6)
  m.log_inv_temperature[...] = jnp.float32(np.log(20.0))
  np.testing.assert_allclose(float(m.temperature()), 0.05, rtol=1e-6)


@pytest.mark.slow  # compiles the gradient and the decoder twice (16 s)
def test_bfloat16_gradients_and_decoding_follow_float32():
  """Every bfloat16 matmul (forward, the custom backward, the cached decoding steps)
  compiles and runs on CPU, and the loss, its gradient and greedy decoding of the same
  parameters stay close to float32's."""
  config = tiny.get_config()
  batch = tiny_batch()
  results = {}
  for dtype in ("float32", "bfloat16"):
    config.model.dtype = dtype
    graphdef, params = nnx.split(coca.build(config.model, seed=3))

    def loss(params, batch):
      outputs = nnx.merge(graphdef, params)(batch)
      return losses.total_loss(outputs, batch, config.loss)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(params, batch)
    options = decode.DecodeOptions.from_config(config, method="greedy")
    tokens = decode.jit_generate(graphdef, options)(params, batch["image"])
    results[dtype] = value, jax.tree.leaves(grads), np.asarray(tokens.tokens)
  (f32_loss, f32_grads, f32_tokens), (bf16_loss, bf16_grads, bf16_tokens) = results.values()
  np.testing.assert_allclose(float(bf16_loss), float(f32_loss), rtol=2e-2)
  flat32 = np.concatenate([np.ravel(g) for g in f32_grads])
  flat16 = np.concatenate([np.ravel(g) for g in bf16_grads])
  assert np.all(np.isfinite(flat16))
  cosine = flat32 @ flat16 / (np.linalg.norm(flat32) * np.linalg.norm(flat16))
  assert cosine > 0.99, cosine
  assert bf16_tokens.shape == f32_tokens.shape
  assert np.mean(bf16_tokens == f32_tokens) > 0.7


@pytest.mark.slow  # builds and compiles the decoder twice (14 s)
def test_xla_attention_kernel_matches_einsum():
  """config.model.attention="xla" (jax.nn.dot_product_attention, the "cudnn" kernel's
  CPU stand-in) gives the einsum kernel's outputs and captions, same parameters."""
  config = tiny.get_config()
  batch = tiny_batch()
  outputs = {}
  for kernel in ("einsum", "xla"):
    config.model.attention = kernel
    model = coca.build(config.model, seed=2)
    kernels = {m.implementation for _, m in nnx.iter_modules(model) if hasattr(m, "implementation")}
    assert kernels == {kernel}
    graphdef, params = nnx.split(model)
    options = decode.DecodeOptions.from_config(config, method="greedy")
    tokens = decode.jit_generate(graphdef, options)(params, batch["image"]).tokens
    outputs[kernel] = dict(model(batch), tokens=tokens)
  for key in ("logits", "image_embedding", "text_embedding", "tokens"):
    np.testing.assert_allclose(outputs["xla"][key], outputs["einsum"][key], atol=2e-5, rtol=0)


def test_cudnn_attention_takes_only_even_lengths(monkeypatch):
  """jax checks cuDNN's training kernels for even query and key lengths (0.11.2 on an H200
  refused the contrastive pooler's single query, unmasked): "cudnn" is asked for only
  there, "xla" (the same math) elsewhere; the unimodal stack's odd T + 1 is padded to
  even instead. Traced on CPU with jax's function recorded."""
  calls = []

  def recording(q, k, v, *, mask, implementation):
    calls.append((q.shape[1], k.shape[1], mask is not None, implementation))
    return jnp.zeros(q.shape, v.dtype)

  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  config = tiny.get_config()
  config.model.dtype, config.model.attention = "bfloat16", "cudnn"
  jax.eval_shape(lambda batch: coca.build(config.model)(batch), tiny_batch())
  # tiny: 16 patches, 8 caption queries, 1 contrastive query, text 8 (+ [CLS] unimodal).
  assert set(calls) == {
    (16, 16, False, "cudnn"),  # image encoder self-attention
    (8, 16, False, "cudnn"),  # captioning pooler
    (1, 8, False, "xla"),  # contrastive pooler over the caption pooler's 8 (cascade)
    (10, 10, True, "cudnn"),  # unimodal text with [CLS], one token padded (text.pad_one_token)
    (8, 8, True, "cudnn"),  # multimodal self-attention
    (8, 8, False, "cudnn"),  # multimodal cross-attention to the 8 caption tokens
  }


def test_auto_attention_is_cudnn_on_gpus_with_low_precision_compute():
  config = tiny.get_config()
  assert config.model.attention == "auto"
  for dtype, backend, expected in [
    ("bfloat16", "gpu", "cudnn"),
    ("float16", "gpu", "cudnn"),
    ("float32", "gpu", "einsum"),
    ("bfloat16", "cpu", "einsum"),
    ("bfloat16", "tpu", "einsum"),
  ]:
    config.model.dtype = dtype
    assert coca.attention_implementation(config.model, backend) == expected, (dtype, backend)
  config.model.dtype = "bfloat16"
  model = coca.build(config.model)
  kernels = {m.implementation for _, m in nnx.iter_modules(model) if hasattr(m, "implementation")}
  assert kernels == {"einsum"}  # this CPU


def test_cudnn_takes_only_head_dims_that_are_multiples_of_8_up_to_128():
  assert layers.cudnn_takes(8, 16, 64)
  assert layers.cudnn_takes(8, 16, 128)
  assert layers.cudnn_takes(8, 16, 88)  # CoCa 2.1B: 1408 / 16 heads
  assert not layers.cudnn_takes(8, 16, 12)
  assert not layers.cudnn_takes(8, 16, 136)
  assert not layers.cudnn_takes(9, 16, 64)
  assert not layers.cudnn_takes(8, 15, 64)


def test_unknown_attention_kernel_is_named():
  config = tiny.get_config()
  config.model.attention = "flash"
  with pytest.raises(ValueError, match="config.model.attention='flash'"):
    coca.build(config.model)
  config.model.attention = "cudnn"  # fused cuDNN attention: fp16 / bf16 inputs only
  with pytest.raises(ValueError, match="'cudnn' needs config.model.dtype bfloat16"):
    coca.build(config.model)


@pytest.mark.parametrize(
  "config_name, head", [("demo_vqa", "vqa_head"), ("demo_video", "video_head")]
)
def test_param_counts_of_finetunes_with_task_heads(config_name, head):
  """`python -m coca_jax.params` counts a VQA or video head (it raised KeyError)."""
  import importlib

  model_config = importlib.import_module(f"configs.{config_name}").get_config().model
  params = params_lib.abstract(model_config)
  counts = params_lib.count(params)
  leaves = jax.tree_util.tree_flatten_with_path(params[head])[0]
  assert counts["task_heads"] == sum(int(np.prod(leaf.shape)) for _, leaf in leaves) > 0
  assert counts["total"] == params_lib.total(params)
  assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


# Bilinear resampling with half-pixel centres, edge rows repeated, as hand-made 1-D weight
# matrices (output position i samples input coordinate (i + 0.5) * old / new - 0.5).
UPSAMPLE_2_TO_4 = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
UPSAMPLE_2_TO_3 = np.array([[1, 0], [0.5, 0.5], [0, 1]])
DOWNSAMPLE_4_TO_2 = np.array([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])


@pytest.mark.parametrize(
  "old, weights",
  [(2, UPSAMPLE_2_TO_4), (2, UPSAMPLE_2_TO_3), (4, DOWNSAMPLE_4_TO_2)],
  ids=["2_to_4", "2_to_3", "4_to_2"],
)
def test_position_embedding_resampling_is_bilinear_over_the_row_major_grid(old, weights):
  """[G*G, D] rows are a row-major G x G grid; each channel resamples as W @ grid @ W.T.
  The grid is not symmetric (rows 10x columns), so swapping its axes shows."""
  rows, cols = np.meshgrid(np.arange(old), np.arange(old), indexing="ij")
  grid = np.stack([10.0 * rows + cols, -(cols**2) + 0.5 * rows], -1)  # [G, G, 2]
  new = len(weights)
  got = vit.resize_pos_embedding(jnp.asarray(grid.reshape(old * old, 2), jnp.float32), new * new)
  want = np.einsum("ia,abd,jb->ijd", weights, grid, weights).reshape(new * new, 2)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


def test_position_embedding_resampling_refuses_a_non_square_grid():
  with pytest.raises(ValueError, match="not a square grid"):
    vit.resize_pos_embedding(jnp.zeros((6, 2)), 16)
  with pytest.raises(ValueError, match="10 position embedding rows"):
    vit.resize_pos_embedding(jnp.zeros((4, 2)), 10)


@pytest.mark.parametrize("mode", ["paper", "open_clip_legacy"])
def test_a_padded_token_leaves_the_unimodal_outputs_unchanged(model, mode):
  """text.pad_one_token (the unimodal stack's T + 1 made even for cuDNN): the first
  T + 1 outputs equal the unpadded stack's, with a text that has padding of its own."""
  batch = tiny_batch()
  ids, mask = batch["text"]["ids"], batch["text"]["mask"]
  x = jnp.asarray(np.random.default_rng(4).normal(size=(B, T + 1, 32)), jnp.float32)
  attn_mask = text.unimodal_mask(ids, mask, mode, 0)
  padded_x, padded_mask = text.pad_one_token(x, attn_mask)
  assert padded_x.shape == (B, T + 2, 32) and padded_mask.shape == (B, 1, T + 2, T + 2)
  np.testing.assert_array_equal(padded_mask[:, :, : T + 1, T + 1], False)  # no one sees it
  out = model.text.unimodal(x, attn_mask)
  np.testing.assert_allclose(model.text.unimodal(padded_x, padded_mask)[:, : T + 1], out, atol=1e-6)


def test_cudnn_model_pads_the_unimodal_stack_and_keeps_its_outputs(monkeypatch):
  """With "cudnn" the unimodal stack runs T + 2 tokens; its outputs equal the unpadded
  "xla" model's (same parameters). jax's cuDNN call is stood in for by its "xla" kernel."""
  original = jax.nn.dot_product_attention
  lengths = set()

  def xla_instead(q, k, v, *, mask, implementation):
    lengths.add(q.shape[1])
    return original(q, k, v, mask=mask, implementation="xla")

  batch = tiny_batch()
  outputs = {}
  for kernel in ("xla", "cudnn"):
    config = tiny.get_config()
    config.model.dtype, config.model.attention = "bfloat16", kernel
    monkeypatch.setattr(jax.nn, "dot_product_attention", xla_instead)
    lengths.clear()
    outputs[kernel] = coca.build(config.model, seed=5)(batch)
    assert (T + 2 in lengths) == (kernel == "cudnn") and (T + 1 in lengths) == (kernel == "xla")
  for key in ("text_embedding", "logits"):
    np.testing.assert_allclose(outputs["cudnn"][key], outputs["xla"][key], atol=1e-6, rtol=0)
