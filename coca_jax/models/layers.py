"""Transformer building blocks: dense, attention (self / cross / causal, KV cache), MLP.

Legend: B batch, T query length, S key length, D width, H heads, K head width
(D = H * K), F MLP width, L stacked layers.

Parameters are float32 and carry logical axis names (`embed`, `heads`, `kv`, `mlp`,
`norm`, `layers`); `coca_jax.sharding` maps them to mesh axes. Computation runs in the
configured `dtype`; softmax, norms and the attention logits run in float32.
"""

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from coca_jax import sharding

# Remat policies for the scanned layer stacks (MaxText's names). "none" keeps every
# activation (fastest, most memory); "nothing_saveable" recomputes the whole layer in
# the backward pass (least memory).
REMAT_POLICIES = {
  "none": None,
  "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def matmul(spec: str, x, kernel, dtype, out_dtype=None, bias=None) -> jax.Array:
  """einsum(spec, x, kernel) + bias, with x and kernel in `dtype`, accumulated and
  biased in float32, returned in `out_dtype` (default `dtype`).

  `spec` names every index in two of its three terms, or in all three for batch indices
  (attention's per-head products; x may lead with "...");
  bias (float32) spans the output's trailing dimensions. The backward pass is written
  out (`_matmul`'s custom VJP) rather than left to autodiff, for two reasons measured on
  XLA's CPU backend:
  - float32: autodiff's transposed dot_generals for the kernel gradient (contracting the
    batch and sequence axes) compiled to XLA's generic "dot" kernel, where the same
    contraction written as an einsum goes to the YNNPACK matmul: 1.1-1.2x faster training
    steps at widths 128-512 (`python -m coca_jax.bench open_clip`).
  - bfloat16: autodiff upcast the backward matmuls to float32 x float32; here they are
    bfloat16 x bfloat16 -> float32, the fast path on CPUs with AVX512-BF16 (376 vs 201
    GFLOP/s for float32 at [2048, 256] x [256, 1024] on the 2-core dev machine) and the
    usual mixed-precision matmul on TPUs and GPUs, also when `out_dtype` is float32 (its
    cotangent is rounded to `dtype`). The bias gradient is a float32 sum.
  """
  out_dtype = jnp.dtype(out_dtype or dtype)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  bias = None if bias is None else bias.astype(jnp.float32)
  return _matmul(_explicit(spec, x.ndim), out_dtype, x, kernel, bias)


def _explicit(spec: str, x_ndim: int) -> str:
  """spec with its leading "..." spelled out as letters for x's extra dimensions."""
  if "..." not in spec:
    return spec
  named = len(spec.split(",")[0].replace("...", ""))
  return spec.replace("...", "ABCDEFGH"[: x_ndim - named])


def _matmul_forward(spec, out_dtype, x, kernel, bias):
  return _dot(spec, x, kernel, out_dtype, bias)


def _dot(spec, a, b, out_dtype, bias=None) -> jax.Array:
  """einsum(spec, a, b) (+ float32 bias) in out_dtype, accumulated in float32.

  Where jax runs on GPUs, a low-precision out_dtype is the GEMM's own output (cuBLAS
  accumulates in float32 inside) and the bias is added after: a float32 product written
  out and read back by the cast's fusion is twice the memory traffic. CoCa-Base bfloat16
  training step on an H200 (batch 256, cuDNN attention, scanned layers): 250.8 -> 233.4
  ms (1.07x). Elsewhere the product is float32, biased, then cast: the bfloat16 fast
  path of XLA's CPU dots (see `matmul`), and what TPUs' matrix units do anyway. The
  choice is made when tracing, by the default backend (the TPU programs compiled ahead
  of time on a CPU host, `coca_jax.aot`, take the float32 path as they should):
  `lax.platform_dependent` would stage a switch whose partitioned form deadlocked on 8
  CPU devices (see `_kernel_grad`).
  """
  out_dtype = jnp.dtype(out_dtype)
  if out_dtype != jnp.float32 and gemm_outputs_low_precision():
    y = jnp.einsum(spec, a, b, preferred_element_type=out_dtype)
    return y if bias is None else y + bias.astype(out_dtype)
  y = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
  return (y if bias is None else y + bias).astype(out_dtype)


def gemm_outputs_low_precision() -> bool:
  """Whether `_dot` asks the GEMM for its low-precision output (on GPUs)."""
  return jax.default_backend() == "gpu"


_matmul = jax.custom_vjp(_matmul_forward, nondiff_argnums=(0, 1))


def _matmul_fwd(spec, out_dtype, x, kernel, bias):
  return _matmul_forward(spec, out_dtype, x, kernel, bias), (x, kernel, bias)


def _matmul_bwd(spec, out_dtype, residuals, grad):
  x, kernel, bias = residuals
  dbias = None
  if bias is not None:
    dbias = jnp.sum(grad.astype(jnp.float32), axis=tuple(range(grad.ndim - bias.ndim)))
  # The backward dots run in the forward's precision. A low-precision output's cotangent
  # holds low-precision values (the cast is exact); a float32 output's (the vocabulary
  # logits under bfloat16) is rounded to bfloat16, as a bfloat16 matmul followed by a
  # cast to float32 would do: autodiff would otherwise upcast both backward dots to
  # float32 x float32 (the [B T, V] x [V, D] pair was 2x slower at the benchmark's sizes).
  grad = grad.astype(x.dtype)
  inputs, out = spec.split("->")
  x_spec, kernel_spec = inputs.split(",")
  dx = _dot(f"{out},{kernel_spec}->{x_spec}", grad, kernel, x.dtype)
  dk = _kernel_grad(x_spec, out, kernel_spec, x, grad)
  return dx, dk.astype(kernel.dtype), dbias


def _kernel_grad(x_spec: str, out: str, kernel_spec: str, x, grad) -> jax.Array:
  """einsum(x, grad) -> kernel_spec, in float32.

  Without batch indices, the dot contracts the leading (batch and sequence) axes of both
  operands, so a row-major matmul kernel needs one of them transposed in memory, and
  XLA's CPU layout assignment transposes x however the dot is written, fused into x's
  producer as strided writes. Where grad is the smaller (the MLP's down-projection: x
  [B S F], grad [B S D]), float32 on one CPU device computes the gradient transposed, as
  grad^T x, and then transposes that kernel-sized result. A barrier keeps XLA from
  folding the transpose back into the dot; grad is `_materialized` before its transposed
  copy. Measured at the benchmark's width 256, float32: the down-projection's kernel
  gradient with its GELU 10.6 -> 6.8 ms, the training step 0.68-0.70 -> 0.59 s/step.
  bfloat16 measured slower that way (0.36 -> 0.38-0.42 s/step), and other platforms
  transpose inside their matmul units: both take the einsum.
  """
  f32 = jnp.float32

  def direct(x, grad):
    return jnp.einsum(f"{x_spec},{out}->{kernel_spec}", x, grad, preferred_element_type=f32)

  batched = set(x_spec) & set(out) & set(kernel_spec)
  # One device only: on a multi-device mesh (8 fake CPU devices) the partitioned program
  # with the platform switch deadlocked in an all-reduce (7 of 8 devices arrived).
  sharded = jax.sharding.get_abstract_mesh().size > 1
  if batched or sharded or x.dtype != f32 or grad.size >= x.size:
    return direct(x, grad)
  flipped = "".join(c for c in out + x_spec if c in kernel_spec)

  def transposed(x, grad):
    dk = jnp.einsum(
      f"{out},{x_spec}->{flipped}", _materialized(grad), x, preferred_element_type=f32
    )
    return jnp.einsum(f"{flipped}->{kernel_spec}", jax.lax.optimization_barrier(dk))

  return jax.lax.platform_dependent(x, grad, cpu=transposed, default=direct)


def _materialized(a: jax.Array) -> jax.Array:
  """`a`, written to memory once before its consumers read it (XLA CPU, inside
  `_kernel_grad`'s CPU branch only).

  XLA CPU drops optimization barriers before it fuses (none is left in the compiled
  program), and it duplicates cheap elementwise producers into every consumer. The
  narrow cotangent of a down-projection is the residual stream's, a sum over every later
  layer's LayerNorm backward, so its transposed copy recomputed that whole chain element
  by element, with strided writes: copies with 59, 43, 27 and 9 operands in the
  benchmark's 4-layer ViT, quadratic in depth (copies were 13.5% of the width-256 float32
  step's op time, 5.3% after). A conditional is a fusion boundary: its operand is
  computed once, and the copy reads it. The predicate reads one element, so it is not
  constant-folded; both branches return `a` (the second only where a[0] is NaN).
  Measured with the steps of both versions alternated in one process (coca_jax.bench
  open_clip's model, float32): width 128 1.16x, width 256 1.09x and 1.11x (paper layout
  1.10x), width 512 1.08x and 0.97x; the demo's scanned step 0.98x (within noise).
  """
  first = a.reshape(-1)[0]
  return jax.lax.cond(first == first, lambda a: a, lambda a: a * 1.0, a)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], names: tuple[str | None, ...]) -> nnx.Param:
  """A float32 parameter carrying its logical axis names."""
  if len(shape) != len(names):
    raise ValueError(f"parameter shape {shape} and logical names {names} differ in rank")
  return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names)


def fan_in_out_init(in_axis, out_axis):
  """Glorot-uniform initialiser for kernels whose fan-in/out span several axes."""
  return nnx.initializers.variance_scaling(
    1.0, "fan_avg", "uniform", in_axis=in_axis, out_axis=out_axis
  )


class Dense(nnx.Module):
  """y = x @ kernel + bias over the last axis of x: [..., I] -> [..., O]."""

  def __init__(self, in_dim, out_dim, names, *, dtype, rngs, use_bias=True, f32_output=False):
    self.kernel = param(rngs, fan_in_out_init(0, 1), (in_dim, out_dim), names)
    self.bias = param(rngs, nnx.initializers.zeros, (out_dim,), names[1:]) if use_bias else None
    self.dtype = dtype
    self.f32_output = f32_output

  def __call__(self, x: jax.Array) -> jax.Array:
    out_dtype = jnp.float32 if self.f32_output else self.dtype
    bias = None if self.bias is None else self.bias[...]
    return matmul("...i,io->...o", x, self.kernel[...], self.dtype, out_dtype, bias)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, computed in float32, returned in `dtype`."""

  def __init__(self, dim: int, *, eps: float, dtype, rngs: nnx.Rngs):
    self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",))
    self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("norm",))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.scale[...], self.bias[...], self.eps, self.dtype)


def layer_norm(x: jax.Array, scale, bias, eps: float, dtype) -> jax.Array:
  """LayerNorm of x [..., D] over D, in float32, returned in `dtype`; scale, bias [D].

  On GPUs the gradient is written out (`_layer_norm`'s custom VJP) over x as [N, D]
  rows, as a fused LayerNorm kernel computes it: two row means for dx, column sums for
  the scale and bias. Autodiff on XLA's GPU backend (jax 0.11.2) laid the backward out as
  [B, D, T] (the scale and bias sums split into a sum over T, then B): three float32
  transposed copies of the activations per LayerNorm and a transpose back before the
  next matmul, 25 of 197 ms per CoCa-Base step on an H200. Measured in one run there
  (batch 256, unrolled, no remat): 197.3 ms with autodiff, 190.3 with autodiff over
  [N, D] rows, 184.9 with this gradient (README, "On one GPU"); its residuals are x
  (kept anyway by the matmul that reads the output) and two floats per row.
  Elsewhere autodiff takes the gradient: on the 2-core CPU the written-out one made the
  Base-width bfloat16 step slower (1,818-1,991 vs 1,702-1,795 ms, four alternated pairs;
  the [N, D] reshape alone 1,782-1,969; the same code differed by up to 14% between runs
  that day) and the demo's step no faster, and TPUs were not measured. As in `_dot`, the
  default backend decides when tracing (`coca_jax.aot`'s TPU programs, compiled on a CPU
  host, take autodiff as TPUs would).
  """
  dtype = jnp.dtype(dtype)
  if not written_out_layer_norm_gradient():
    return _normalized(eps, dtype, x, scale, bias)[0]
  shape = x.shape
  return _layer_norm(eps, dtype, x.reshape(-1, shape[-1]), scale, bias).reshape(shape)


def written_out_layer_norm_gradient() -> bool:
  """Whether `layer_norm` takes its custom VJP (on GPUs)."""
  return jax.default_backend() == "gpu"


def _normalized(eps, dtype, x, scale, bias):
  """x [..., D] -> (layer norm in dtype, mean [..., 1], 1 / std [..., 1]), in float32."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  inv_std = jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + eps)
  return ((x32 - mean) * inv_std * scale + bias).astype(dtype), mean, inv_std


def _layer_norm_forward(eps, dtype, x, scale, bias):
  return _normalized(eps, dtype, x, scale, bias)[0]


_layer_norm = jax.custom_vjp(_layer_norm_forward, nondiff_argnums=(0, 1))


def _layer_norm_fwd(eps, dtype, x, scale, bias):
  y, mean, inv_std = _normalized(eps, dtype, x, scale, bias)
  return y, (x, mean, inv_std, scale)


def _layer_norm_bwd(eps, dtype, residuals, grad):
  """dx = (g' - mean(g') - xhat mean(g' xhat)) / std with g' = grad * scale;
  dscale = sum over rows of grad * xhat, dbias = sum of grad."""
  x, mean, inv_std, scale = residuals
  grad = grad.astype(jnp.float32)
  xhat = (x.astype(jnp.float32) - mean) * inv_std
  scaled = grad * scale
  dx = inv_std * (
    scaled - scaled.mean(-1, keepdims=True) - xhat * (scaled * xhat).mean(-1, keepdims=True)
  )
  return dx.astype(x.dtype), jnp.sum(grad * xhat, axis=0), jnp.sum(grad, axis=0)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


# config.model.attention: "einsum" (below) or an implementation of
# jax.nn.dot_product_attention ("xla"; "cudnn": the fused GPU kernel).
ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")


def dot_product_attention(q, k, v, mask, heads_first: bool = False, implementation="einsum"):
  """Multi-head attention weights applied to values.

  Args:
    q: [B, T, H, K] queries.
    k: [B, S, H, K] keys ([B, H, S, K] when heads_first).
    v: [B, S, H, K] values ([B, H, S, K] when heads_first).
    mask: bool, broadcastable to [B, H, T, S]; True where a query may attend a key,
      or None for no mask. Every query row must allow at least one key.
    heads_first: keys and values already head-major, as decoding keeps the image-side
      ones (`LayerStack.unstack`): the dots then read them in place instead
      of transposing them every step (8.6x faster cross-attention at batch 16 on CPU).
    implementation: one of ATTENTION_IMPLEMENTATIONS; jax.nn.dot_product_attention
      takes [B, T, H, K] keys and values, so head-major ones always use "einsum".
      "cudnn"'s training kernels take only even T and S: jax 0.11.2 refused the
      contrastive pooler's single query (no mask) on an H200; 0.10.2's check refuses
      odd lengths only with a mask. A call with an odd length (that query, a ViT with a
      class token, a decoding step) or a head dimension cuDNN does not take
      (`cudnn_takes`) runs "xla" instead, the same math; the unimodal stack's odd T + 1
      tokens with [CLS] are padded to even (`text.pad_one_token`).
  Returns:
    [B, T, H, K] in the dtype of v.
  """
  if implementation == "cudnn" and not cudnn_takes(q.shape[1], k.shape[1], q.shape[-1]):
    implementation = "xla"
  if implementation != "einsum" and not heads_first:
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    return out.astype(v.dtype)
  kv = "bhsk" if heads_first else "bshk"
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum(f"bthk,{kv}->bhts", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  return matmul(f"bhts,{kv}->bthk", weights, v, v.dtype)


def cudnn_takes(query_len: int, key_len: int, head_dim: int) -> bool:
  """Whether jax's cuDNN fused attention takes these shapes: even lengths (see
  `dot_product_attention`) and a head dimension that is a multiple of 8, at most 128
  (jax 0.10.2's check; Hopper GPUs take up to 256, which no configuration here needs)."""
  return query_len % 2 == 0 and key_len % 2 == 0 and head_dim % 8 == 0 and head_dim <= 128


def causal_mask(query_len: int, key_len: int, query_offset=0) -> jax.Array:
  """[1, 1, T, S] bool: query t (at absolute position offset + t) sees keys <= it."""
  q_pos = jnp.arange(query_len)[:, None] + query_offset
  k_pos = jnp.arange(key_len)[None, :]
  return (k_pos <= q_pos)[None, None]


class Attention(nnx.Module):
  """Multi-head attention with separate query and key/value inputs.

  Keys carry no bias by default: softmax over keys is invariant to it, so its gradient is
  only rounding noise (which Adafactor's normalised first steps would amplify).
  `key_bias=True` adds one (open_clip's layout, whose checkpoints hold it).
  `implementation` picks `dot_product_attention`'s kernel (`coca.build` sets it from
  config.model.attention on every Attention; it holds no parameters).

  Self-attention passes the same tokens twice; cross-attention passes the image tokens
  as `kv_inputs` (`kv_width` wide, default `width`). `project_kv` is public so decoding
  can compute image-side keys and values once per image and keep text-side keys and
  values in a cache.
  """

  def __init__(
    self,
    width: int,
    heads: int,
    *,
    dtype,
    rngs: nnx.Rngs,
    kv_width: int | None = None,
    key_bias: bool = False,
  ):
    if width % heads:
      raise ValueError(f"width={width} is not divisible by heads={heads}")
    head_dim = width // heads
    kv_width = kv_width or width
    qkv_init = fan_in_out_init(0, (1, 2))
    self.query = param(rngs, qkv_init, (width, heads, head_dim), ("embed", "heads", "kv"))
    self.key = param(rngs, qkv_init, (kv_width, heads, head_dim), ("embed", "heads", "kv"))
    self.value = param(rngs, qkv_init, (kv_width, heads, head_dim), ("embed", "heads", "kv"))
    self.query_bias = param(rngs, nnx.initializers.zeros, (heads, head_dim), ("heads", "kv"))
    self.key_bias = (
      param(rngs, nnx.initializers.zeros, (heads, head_dim), ("heads", "kv")) if key_bias else None
    )
    self.value_bias = param(rngs, nnx.initializers.zeros, (heads, head_dim), ("heads", "kv"))
    self.out = param(
      rngs, fan_in_out_init((0, 1), 2), (heads, head_dim, width), ("heads", "kv", "embed")
    )
    self.out_bias = param(rngs, nnx.initializers.zeros, (width,), ("embed",))
    self.dtype = dtype
    self.implementation = "einsum"

  def _project(self, x, kernel, bias=None):
    """[B, S, D] -> [B, S, H, K], split over the batch and (tensor parallelism) heads."""
    y = matmul(
      "bsd,dhk->bshk", x, kernel[...], self.dtype, bias=None if bias is None else bias[...]
    )
    return sharding.constrain(y, ("batch", "length", "heads", "kv"))

  def project_kv(self, kv_inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, S, D_kv] -> keys, values [B, S, H, K]."""
    return (
      self._project(kv_inputs, self.key, self.key_bias),
      self._project(kv_inputs, self.value, self.value_bias),
    )

  def attend(self, inputs: jax.Array, keys, values, mask, heads_first=False) -> jax.Array:
    """Queries from inputs [B, T, D] attend given keys/values [B, S, H, K] (or
    [B, H, S, K] when heads_first) -> [B, T, D]."""
    q = self._project(inputs, self.query, self.query_bias)
    out = dot_product_attention(q, keys, values, mask, heads_first, self.implementation)
    out = sharding.constrain(out, ("batch", "length", "heads", "kv"))  # [B, T, H, K]
    return matmul("bthk,hkd->btd", out, self.out[...], self.dtype, bias=self.out_bias[...])

  def __call__(self, inputs: jax.Array, kv_inputs: jax.Array, mask=None) -> jax.Array:
    return self.attend(inputs, *self.project_kv(kv_inputs), mask)


class Mlp(nnx.Module):
  """Two-layer GELU MLP: [..., D] -> [..., F] -> [..., D]. GELU with the tanh
  approximation (`gelu_approximate`, the default) or the exact erf form."""

  def __init__(self, width: int, mlp_dim: int, *, dtype, rngs: nnx.Rngs, gelu_approximate=True):
    self.up = Dense(width, mlp_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.down = Dense(mlp_dim, width, ("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.gelu_approximate = gelu_approximate

  def __call__(self, x: jax.Array) -> jax.Array:
    h = gelu(self.up(x), self.gelu_approximate)
    h = sharding.constrain(h, ("batch", "length", "mlp"))
    return self.down(h)


def gelu(x: jax.Array, approximate: bool) -> jax.Array:
  """GELU, tanh-approximated or exact. The exact form is x (1 + erf(x / sqrt 2)) / 2, as
  PyTorch computes it (open_clip's models), rather than jax.nn.gelu's x erfc(-x / sqrt 2)
  / 2: the same function (equal to float32 rounding where |x| is not far out in the
  negative tail, whose values are ~1e-7), and on XLA's CPU backend its forward runs 2.2x
  faster ([2048, 1024] float32: 0.76 vs 1.71 ms; with the gradient 1.61 vs 1.99 ms)."""
  if approximate:
    return jax.nn.gelu(x, approximate=True)
  return x * (1 + jax.lax.erf(x * jnp.asarray(2**-0.5, x.dtype))) * jnp.asarray(0.5, x.dtype)


MULTIMODAL_BLOCKS = ("fused", "split")


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: self-attention, optional cross-attention, MLP.

  With `cross_attention=True` this is a multimodal decoder layer (Section 3.2 of the
  paper): the text attends to the captioning pooler's outputs after self-attention.
  `multimodal_block` arranges such a layer:

    "fused" (the paper)   x += SelfAttn(LN(x)); x += CrossAttn(LN(x), img); x += MLP(LN(x))
    "split" (open_clip)   x += SelfAttn(LN(x)); x += MLP(LN(x));
                          x += CrossAttn(LN(x), LN(img)); x += MLP(LN(x))

  (open_clip's residual block then its cross-attention block, each with an MLP, the
  image tokens normed by the cross block's own LayerNorm, `cross_kv_norm`.)
  """

  def __init__(
    self,
    width,
    heads,
    mlp_dim,
    *,
    cross_attention: bool,
    eps,
    dtype,
    rngs,
    gelu_approximate: bool = True,
    key_bias: bool = False,
    multimodal_block: str = "fused",
  ):
    if multimodal_block not in MULTIMODAL_BLOCKS:
      raise ValueError(
        f"config.model.text.multimodal_block={multimodal_block!r}; use one of {MULTIMODAL_BLOCKS}"
      )

    def norm():
      return LayerNorm(width, eps=eps, dtype=dtype, rngs=rngs)

    def mlp():
      return Mlp(width, mlp_dim, dtype=dtype, rngs=rngs, gelu_approximate=gelu_approximate)

    def attention():
      return Attention(width, heads, dtype=dtype, rngs=rngs, key_bias=key_bias)

    split = cross_attention and multimodal_block == "split"
    self.self_norm = norm()
    self.self_attention = attention()
    self.self_mlp_norm, self.self_mlp = (norm(), mlp()) if split else (None, None)
    if cross_attention:
      self.cross_norm = norm()
      self.cross_kv_norm = norm() if split else None
      self.cross_attention = attention()
    else:
      self.cross_norm = self.cross_kv_norm = self.cross_attention = None
    self.mlp_norm = norm()
    self.mlp = mlp()

  def cross_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Image tokens [B, N, D] -> cross-attention keys, values [B, N, H, K]."""
    if self.cross_kv_norm is not None:
      context = self.cross_kv_norm(context)
    return self.cross_attention.project_kv(context)

  def __call__(self, x, mask=None, context=None, cache=None):
    """One layer.

    Args:
      x: [B, T, D] tokens.
      mask: self-attention mask, broadcastable to [B, H, T, S]; S = T without a cache,
        S = cache length with one.
      context: cross-attention keys/values: either [B, N, D] tokens, or this layer's
        precomputed head-major (keys, values) pair of [B', H, N, K] (`LayerStack.unstack`)
        for B' images, B a multiple of B' (beam search: B / B' beams per image).
      cache: None, or a dict with "key"/"value" [B, S, H, K] and "index" (scalar int32,
        position of x[:, 0]); the new keys/values are written at `index`.
    Returns:
      (x [B, T, D], new cache or None).
    """
    h = self.self_norm(x)
    keys, values = self.self_attention.project_kv(h)
    if cache is not None:
      index = cache["index"]
      keys = jax.lax.dynamic_update_slice_in_dim(
        cache["key"], keys.astype(cache["key"].dtype), index, 1
      )
      values = jax.lax.dynamic_update_slice_in_dim(
        cache["value"], values.astype(cache["value"].dtype), index, 1
      )
      cache = dict(key=keys, value=values, index=index)
    x = x + self.self_attention.attend(h, keys, values, mask)
    if self.self_mlp is not None:
      x = x + self.self_mlp(self.self_mlp_norm(x))
    if self.cross_attention is not None:
      if context is None:
        raise ValueError("a cross-attention block needs `context` (the image tokens)")
      if isinstance(context, tuple):
        # Precomputed keys/values of B images for B x K rows of x (K beams per image,
        # image-major): each image's K rows fold into the query axis, so the unmasked
        # cross-attention reads every image's keys/values once, not K times.
        images = context[0].shape[0]
        h = self.cross_norm(x).reshape(images, -1, x.shape[-1])  # [B, K * T, D]
        h = self.cross_attention.attend(h, *context, None, heads_first=True)
        x = x + h.reshape(x.shape)
      else:
        x = x + self.cross_attention.attend(self.cross_norm(x), *self.cross_kv(context), None)
    x = x + self.mlp(self.mlp_norm(x))
    return sharding.constrain(x, ("batch", "length", "activation_embed")), cache


class LayerStack(nnx.Module):
  """`num_layers` identical blocks with stacked parameters, run with `lax.scan`.

  Every parameter gains a leading `layers` axis, so compile time does not grow with
  depth (as in MaxText). Each scanned layer is rematerialised by `remat_policy`.
  `scan=False` unrolls the same loop (same parameters): compile time grows with depth,
  but XLA sees the whole stack at once and no loop carries the activations. Decoding
  always unrolls (`unstack`, `decode`), whatever `scan` says.
  """

  def __init__(
    self,
    make_layer: Callable[[nnx.Rngs], nnx.Module],
    num_layers: int,
    remat_policy: str,
    rngs,
    scan: bool = True,
  ):
    if remat_policy not in REMAT_POLICIES:
      raise ValueError(
        f"config.model.remat_policy={remat_policy!r}; known: {sorted(REMAT_POLICIES)}"
      )

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(layer_rngs):
      return make_layer(layer_rngs)

    self.layers = create(rngs)
    self.num_layers = num_layers
    self.remat_policy = remat_policy
    self.scan = scan

  def __call__(self, x, mask=None, context=None):
    """Runs every layer over x [B, T, D], cross-attending to context tokens [B, N, D]
    (or None) -> [B, T, D]."""
    graphdef, layer_params = nnx.split(self.layers)

    def body(h, params):
      return nnx.merge(graphdef, params)(h, mask, context)[0], None

    policy = REMAT_POLICIES[self.remat_policy]
    if self.remat_policy != "none":
      # prevent_cse=False suits a loop only (jax.checkpoint's documentation): unrolled,
      # XLA may merge each layer's recomputation with its forward. With it False,
      # CoCa-Base unrolled under "nothing_saveable" took 51.9 GiB on an H200, as much as
      # under "none" (scanned: 15.1 GiB).
      body = jax.checkpoint(body, policy=policy, prevent_cse=not self.scan)
    x, _ = jax.lax.scan(body, x, layer_params, unroll=not self.scan)
    return x

  def unstack(self, context=None) -> tuple:
    """Each layer's parameters sliced out of the stack, with its cross-attention keys
    and values of context tokens [B, N, D] (head-major [B, H, N, K] each; None without
    context): a tuple of `num_layers` (params, (keys, values) or None) pairs.

    Decoding calls this once per decode call, before its token loop, and `decode` runs
    the layers unrolled over the result. A scanned stack inside the token loop made XLA's
    CPU backend copy every layer's weights (and its image keys/values) out of the stack
    at every token: most of a batch-1 step at open_clip's B/32 shapes. The price is one
    copy of the stack's weights per decode call, held while it runs.
    """
    graphdef, layer_params = nnx.split(self.layers)
    layers = []
    for i in range(self.num_layers):
      params = jax.tree.map(lambda a, i=i: a[i], layer_params)
      kv = None
      if context is not None:
        keys, values = nnx.merge(graphdef, params).cross_kv(context)
        kv = (keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3))
      layers.append((params, kv))
    return tuple(layers)

  def decode(self, x, mask, cache: dict, unstacked: tuple):
    """Runs new tokens x [B, t, D] through every layer, reading and extending the KV cache.

    `unstacked`: `unstack(...)`. `cache` has "key"/"value": one [B, S, H, K] per layer
    (each written in place), and a scalar "index"; `mask` is the self-attention mask
    [.., t, S]. Returns (x [B, t, D], new cache).
    """
    graphdef = nnx.graphdef(self.layers)
    keys, values = [], []
    for (params, context), key, value in zip(unstacked, cache["key"], cache["value"]):
      layer_cache = dict(key=key, value=value, index=cache["index"])
      x, new = nnx.merge(graphdef, params)(x, mask, context, layer_cache)
      keys.append(new["key"])
      values.append(new["value"])
    return x, dict(key=tuple(keys), value=tuple(values), index=cache["index"] + x.shape[1])
