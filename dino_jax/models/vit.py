"""Vision Transformer backbone, as in DINO's release (pre-norm ViT with a [CLS] token).

Shapes: B batch, H x W image, p patch, T = 1 + (H // p) * (W // p) tokens, D width.
Inputs are NHWC float images (already normalised); `apply` returns the final-LN [CLS] feature (B, D).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# Width, depth, heads of the standard sizes (the paper's Table; large is the usual next step).
SIZES = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}


def trunc_normal(std: float = 0.02, lower: float = -2.0, upper: float = 2.0):
  """timm's trunc_normal_(std, a, b): N(0, std) cut at *absolute* bounds [a, b].

  With std 0.02 the cut sits at 100 sigma and never triggers; it is kept for the letter of the
  recipe. (jax.random.truncated_normal at +-100 sigma would sample the bound itself with
  probability ~2^-23 per draw, through erfinv(+-1), so the cut is done by clipping instead.)
  """

  def init(key, shape, dtype=jnp.float32):
    return jnp.clip(std * jax.random.normal(key, shape, dtype), lower, upper)

  return init


# PyTorch's default init of Conv2d / Linear (kaiming_uniform(a=sqrt(5)) and U(+-1/sqrt(fan_in)) bias).
# The release leaves the patch conv (and the head's weight-normalised layer) at this default.
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


@jax.checkpoint
def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as torch.nn.GELU(); flax's nn.gelu defaults to the tanh approximation.

  Checkpointed: the backward pass keeps x and recomputes the terms of the derivative from it,
  where autodiff of the formula would keep 0.5 x, erfc(-x / sqrt 2) and exp(-x^2 / 2), arrays the
  size of the MLP's hidden layer (the largest activations of a block). Same gradient
  (docs/notes/models.md, "Backward-pass memory").
  """
  return nn.gelu(x, approximate=False)


def _bicubic_matrix(n_in: int, n_out: int, scale_factor: float) -> np.ndarray:
  """(n_out, n_in) matrix of torch's 1-D bicubic resampling (a=-0.75, align_corners=False).

  Follows ATen's upsample_bicubic2d when `scale_factor` is given: src = (dst + 0.5) / s - 0.5,
  computed in float32 as ATen does for float inputs, four taps with indices clamped to the border.
  """
  a = np.float32(-0.75)
  inv = np.float32(1.0 / scale_factor)
  mat = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    real = inv * (np.float32(i) + np.float32(0.5)) - np.float32(0.5)
    i0 = int(np.floor(real))
    t = np.float32(real - np.float32(i0))
    x1, x2 = t, np.float32(1) - t
    w = [
        ((a * (x1 + 1) - 5 * a) * (x1 + 1) + 8 * a) * (x1 + 1) - 4 * a,
        ((a + 2) * x1 - (a + 3)) * x1 * x1 + 1,
        ((a + 2) * x2 - (a + 3)) * x2 * x2 + 1,
        ((a * (x2 + 1) - 5 * a) * (x2 + 1) + 8 * a) * (x2 + 1) - 4 * a,
    ]
    for k in range(4):
      mat[i, min(max(i0 - 1 + k, 0), n_in - 1)] += w[k]
  return mat


def resize_pos_embed(pos_embed: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
  """Resizes a (1, 1 + n*n, D) position embedding to a (gh, gw) patch grid, [CLS] entry kept.

  The release's exact mapping: torch bicubic interpolation with *scale factors* (g + 0.1) / n
  (not a target size), which shifts the sampling positions slightly; imported release weights only
  reproduce its features at other resolutions with this mapping. Returns (1, 1 + gh*gw, D).
  """
  n = math.isqrt(pos_embed.shape[1] - 1)
  assert n * n == pos_embed.shape[1] - 1, f"pos_embed grid is not square: {pos_embed.shape}"
  gh, gw = grid_hw
  cls_pos, patch_pos = pos_embed[:, :1], pos_embed[0, 1:].reshape(n, n, -1)
  mh = _bicubic_matrix(n, gh, (gh + 0.1) / n)
  mw = _bicubic_matrix(n, gw, (gw + 0.1) / n)
  patch_pos = jnp.einsum("hi,ijd,wj->hwd", mh, patch_pos.astype(jnp.float32), mw,
                         precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([cls_pos, patch_pos.reshape(1, gh * gw, -1).astype(pos_embed.dtype)], 1)


ATTENTION_IMPLS = ("matmul", "xla", "cudnn")


def attention_weights(q: jax.Array, k: jax.Array) -> jax.Array:
  """q, k (B, heads, T, head_dim) -> softmax(q k^T / sqrt(head_dim)) (B, heads, T, T), in q's
  dtype (the softmax in float32): the 'matmul' form of Attention.

  The release scales the logits, (q k^T) * s; scaling q is the same numbers when s is a power of
  two (head_dim 16, 64: every standard size) and T / head_dim times less work (XLA CPU also
  materialised s as a full (B, heads, T, T) array). Matmul form: faster than einsum on XLA CPU.
  """
  logits = jnp.matmul(q * q.shape[-1] ** -0.5, jnp.swapaxes(k, -1, -2))
  with jax.softmax_custom_jvp(True):  # the backward keeps only the output; see Attention
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)


# LayerNorm that keeps only its input for the backward pass and recomputes the normalised
# activations (a few elementwise ops) there, instead of keeping them beside the input.
LayerNorm = nn.remat(nn.LayerNorm)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (rows q, k, v; heads contiguous).

  impl: 'matmul' (softmax(q k^T * s) v written out; also the only form that returns the weights),
  'xla' or 'cudnn' (jax.nn.dot_product_attention with that implementation; cudnn is the fused
  flash kernel on NVIDIA GPUs, bf16/fp16 only). Same numbers up to rounding; which is fastest
  depends on the platform and the heads' width (docs/notes/models.md, "Attention forms").

  The softmax is differentiated through jax's custom JVP (jax.softmax_custom_jvp), which keeps
  only softmax's output for the backward pass; the default keeps its exp and sum as well.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  impl: str = "matmul"

  @nn.compact
  def __call__(self, x: jax.Array, return_attention: bool = False) -> jax.Array:
    """x: (B, T, D) -> output (B, T, D); or the attention (B, heads, T, T) if return_attention."""
    b, t, d = x.shape
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=trunc_normal(), bias_init=nn.initializers.zeros)
    qkv = dense(3 * d, name="qkv")(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
    # Split, not indexed: the gradient of a split is one concatenate, that of three indexings
    # three zero-padded copies of qkv added together.
    q, k, v = (y[:, :, 0] for y in jnp.split(qkv, 3, axis=2))  # each (B, T, heads, head_dim)
    if self.impl != "matmul" and not return_attention:
      with jax.softmax_custom_jvp(True):
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.impl)  # (B, T, heads, hd)
      return dense(d, name="proj")(out.reshape(b, t, d))
    q, k, v = (jnp.swapaxes(y, 1, 2) for y in (q, k, v))  # each (B, heads, T, head_dim)
    attn = attention_weights(q, k)
    if return_attention:
      return attn
    out = jnp.matmul(attn, v)  # (B, heads, T, head_dim)
    out = jnp.swapaxes(out, 1, 2).reshape(b, t, d)
    return dense(d, name="proj")(out)


class Mlp(nn.Module):
  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=trunc_normal(), bias_init=nn.initializers.zeros)
    return dense(x.shape[-1], name="fc2")(gelu(dense(self.hidden_dim, name="fc1")(x)))


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Stochastic depth: zeroes whole samples with probability `rate`, rescales the rest."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Block(nn.Module):
  """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "matmul"  # Attention.impl

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True,
               return_attention: bool = False) -> jax.Array:
    """x: (B, T, D) -> (B, T, D); or the attention (B, heads, T, T) if return_attention."""
    norm = functools.partial(LayerNorm, epsilon=1e-6, use_fast_variance=False, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    attn = Attention(self.num_heads, self.dtype, self.param_dtype, self.attention, name="attn")
    y = attn(norm(name="norm1")(x), return_attention)
    if return_attention:
      return y
    stochastic = not deterministic and self.drop_path_rate > 0
    if stochastic:
      y = drop_path(y, self.drop_path_rate, self.make_rng("drop_path"))
    x = x + y
    y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, self.param_dtype, name="mlp")(
        norm(name="norm2")(x))
    if stochastic:
      y = drop_path(y, self.drop_path_rate, self.make_rng("drop_path"))
    return x + y


class VisionTransformer(nn.Module):
  """DINO's ViT. Parameter names follow the release's state_dict keys (see dino_jax.convert)."""
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0  # the student uses 0.1; linear from 0 (first block) to this (last)
  img_size: int = 224  # the position embedding holds (img_size // patch_size)**2 patches + [CLS]
  dtype: Dtype = jnp.float32  # compute dtype (bf16 on GPU/TPU); params stay in param_dtype
  param_dtype: Dtype = jnp.float32
  attention: str = "matmul"  # Attention.impl: matmul | xla | cudnn
  remat: bool = False  # recompute each block's activations in the backward pass (less memory)

  def setup(self):
    p, d = self.patch_size, self.embed_dim
    self.patch_embed = nn.Conv(
        d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=torch_default_kernel_init, bias_init=torch_default_bias_init(3 * p * p),
        name="patch_embed")
    n = (self.img_size // p) ** 2
    self.cls_token = self.param("cls_token", trunc_normal(), (1, 1, d), self.param_dtype)
    self.pos_embed = self.param("pos_embed", trunc_normal(), (1, n + 1, d), self.param_dtype)
    rates = np.linspace(0, self.drop_path_rate, self.depth) if self.depth > 1 else [0.0]
    # nn.remat keeps only each block's input for the backward pass; deterministic and
    # return_attention (arguments 2, 3, counting the module; always passed positionally) are
    # Python values: static.
    block = nn.remat(Block, static_argnums=(2, 3)) if self.remat else Block
    self.blocks = [
        block(self.num_heads, self.mlp_ratio, float(r), self.dtype, self.param_dtype,
              self.attention)
        for r in rates
    ]
    self.norm = LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=self.dtype,
                          param_dtype=self.param_dtype)

  def prepare_tokens(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, 3) -> tokens (B, T, D): [CLS] + patch embeddings + position embedding."""
    b, h, w, _ = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = self.patch_embed(x.astype(self.dtype)).reshape(b, -1, self.embed_dim)
    x = jnp.concatenate([jnp.broadcast_to(self.cls_token, (b, 1, self.embed_dim)).astype(x.dtype),
                         x], axis=1)
    gh, gw = h // p, w // p
    pos = self.pos_embed
    if not (gh * gw == pos.shape[1] - 1 and gh == gw):  # the release's condition for resizing
      pos = resize_pos_embed(pos, (gh, gw))
    return x + pos.astype(x.dtype)

  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """x: (B, H, W, 3) -> final-LN [CLS] feature (B, D)."""
    x = self.prepare_tokens(x)
    for blk in self.blocks:
      x = blk(x, deterministic, False)
    return self.norm(x)[:, 0]

  def get_last_selfattention(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, 3) -> last block's attention (B, heads, T, T), before its residual update."""
    x = self.prepare_tokens(x)
    for blk in self.blocks[:-1]:
      x = blk(x, True, False)
    return self.blocks[-1](x, True, True)

  def get_intermediate_layers(self, x: jax.Array, n: int = 1) -> list[jax.Array]:
    """x: (B, H, W, 3) -> the last n blocks' tokens, each final-LN-normed: n x (B, T, D)."""
    x = self.prepare_tokens(x)
    out = []
    for i, blk in enumerate(self.blocks):
      x = blk(x, True, False)
      if len(self.blocks) - i <= n:
        out.append(self.norm(x))
    return out


def _factory(arch: str):
  def make(patch_size: int = 16, **overrides) -> VisionTransformer:
    return VisionTransformer(patch_size=patch_size, **{**SIZES[arch], **overrides})

  make.__name__ = arch
  make.__doc__ = f"{arch}: {SIZES[arch]}; any VisionTransformer field can be overridden."
  return make


vit_tiny = _factory("vit_tiny")
vit_small = _factory("vit_small")
vit_base = _factory("vit_base")
vit_large = _factory("vit_large")


def build_vit(arch: str, patch_size: int, **overrides) -> VisionTransformer:
  """VisionTransformer by name: one of SIZES' keys, or 'vit_custom' with every size given."""
  if arch == "vit_custom":
    return VisionTransformer(patch_size=patch_size, **overrides)
  if arch not in SIZES:
    raise ValueError(f"unknown model.arch {arch!r}; expected one of {sorted(SIZES) + ['vit_custom']}")
  return VisionTransformer(patch_size=patch_size, **{**SIZES[arch], **overrides})
