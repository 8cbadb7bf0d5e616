"""VisionTransformer: parameter counts, output shapes and methods, patch embedding and position
embedding (against NumPy and torch's bicubic interpolate), drop path, bf16, init statistics.
(The comparison with timm's ViT is in test_vit_timm.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dino_jax.models import VisionTransformer, resize_pos_embed, vit_base, vit_small, vit_tiny
from dino_jax.models.head import DINOHead
from dino_jax.models.vit import Block, drop_path


def tiny(**kw):
  return VisionTransformer(**{**dict(patch_size=4, embed_dim=32, depth=3, num_heads=2,
                                     img_size=16), **kw})


def run(model, params, x, *calls):
  """[model.apply(params, x, method=m, **kw) for m, kw in calls] as one jitted program (cheaper
  than op-by-op dispatch of every new shape); m None is __call__."""
  fn = lambda p, x: [model.apply({"params": p}, x, method=m, **kw) for m, kw in calls]
  return compile_fast(fn, params, x)(params, x)


def random_params(model, shape=(1, 16, 16, 3), seed=0):
  """Random weights on the model's tree (faster than init's RNG; the final LN stays 1 / 0)."""
  tree = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))["params"]
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if name == "['norm']['scale']":
      return jnp.ones(x.shape)
    if name == "['norm']['bias']":
      return jnp.zeros(x.shape)
    base = 1.0 if name.endswith("['scale']") else 0.0
    return jnp.asarray(base + rng.normal(size=x.shape) * 0.2, jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf, tree)


@pytest.fixture(scope="module")
def tiny_params():
  return random_params(tiny())


def compile_fast(fn, *args):
  """jit with LLVM optimisation off: half the compile time of one-off programs, same arithmetic."""
  return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def _images(b=2, h=16, w=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, h, w, 3)), jnp.float32)


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def backbone_params(d, depth, p=16, img=224, mlp_ratio=4):
  """Closed form: patch conv, [CLS], pos embed, blocks (2 LN, qkv, proj, fc1, fc2), final LN."""
  h = d * mlp_ratio
  block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
  return (3 * p * p * d + d) + d + ((img // p) ** 2 + 1) * d + depth * block + 2 * d


def head_params(d, k, hidden=2048, bottleneck=256):
  return (d * hidden + hidden) + (hidden * hidden + hidden) + (hidden * bottleneck + bottleneck) + (
      bottleneck * k + k)


@pytest.mark.parametrize("make,d,paper", [(vit_tiny, 192, None), (vit_small, 384, 21e6),
                                          (vit_base, 768, 85e6)])
def test_param_counts(make, d, paper):
  model = make(patch_size=16)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  n = _count(shapes["params"])
  assert n == backbone_params(d, 12)
  if paper:  # the paper's 21M / 85M
    assert abs(n - paper) / paper < 0.04
  head = DINOHead(65536)
  head_shapes = jax.eval_shape(head.init, jax.random.PRNGKey(0), jnp.zeros((1, d)))
  assert _count(head_shapes["params"]) == head_params(d, 65536)


def test_vit_small_16_count_is_21_7m():
  assert backbone_params(384, 12) == 21_665_664  # timm's vit_small_patch16_224, num_classes=0


def test_output_shapes_attention_rows_sum_to_one(tiny_params):
  model, x = tiny(), _images()
  cls, attn = run(model, tiny_params, x, (None, {}), (model.get_last_selfattention, {}))
  assert cls.shape == (2, 32)
  assert attn.shape == (2, 2, 17, 17)
  assert np.all(np.asarray(attn) >= 0)
  np.testing.assert_allclose(np.sum(attn, -1), 1.0, rtol=1e-5)


def test_intermediate_layers_last_is_the_normed_output(tiny_params):
  model, x = tiny(), _images(2)
  layers, cls = run(model, tiny_params, x, (model.get_intermediate_layers, {"n": 2}), (None, {}))
  assert len(layers) == 2 and all(t.shape == (2, 17, 32) for t in layers)
  np.testing.assert_allclose(layers[-1][:, 0], cls, rtol=1e-6, atol=1e-6)
  # Each is final-LN-normed: zero mean, unit variance per token (LN scale 1, bias 0 at init).
  for t in layers:
    np.testing.assert_allclose(np.mean(t, -1), 0, atol=1e-5)
    np.testing.assert_allclose(np.var(t, -1), 1, rtol=1e-3)
  # The second-to-last is the output of the first depth - 1 blocks: a shallower model on the same
  # weights gives it as its last layer.
  shallow = tiny(depth=2)
  sp = {k: v for k, v in tiny_params.items() if k != "blocks_2"}
  (want,), = run(shallow, sp, x, (shallow.get_intermediate_layers, {"n": 1}))
  np.testing.assert_allclose(layers[0], want, rtol=1e-6, atol=1e-6)


def test_tokens_are_patch_matmul_plus_pos_embed(tiny_params):
  """prepare_tokens against NumPy: row-major patches times the conv kernel, [CLS] first."""
  model, x = tiny(), np.asarray(_images(2))
  tokens, = run(model, tiny_params, jnp.asarray(x), (model.prepare_tokens, {}))
  p, g = 4, 4
  patches = x.reshape(2, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, g * g, p * p * 3)
  kernel = np.asarray(tiny_params["patch_embed"]["kernel"]).reshape(p * p * 3, 32)
  emb = patches @ kernel + np.asarray(tiny_params["patch_embed"]["bias"])
  cls = np.broadcast_to(np.asarray(tiny_params["cls_token"]), (2, 1, 32))
  want = np.concatenate([cls, emb], 1) + np.asarray(tiny_params["pos_embed"])
  np.testing.assert_allclose(tokens, want, rtol=1e-5, atol=1e-6)


def torch_resize(pos_embed, gh, gw):
  """The release's interpolate_pos_encoding: scale factors (g + 0.1) / n, bicubic."""
  pos = torch.from_numpy(np.array(pos_embed))
  n = int(np.sqrt(pos.shape[1] - 1))
  patch = pos[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
  patch = torch.nn.functional.interpolate(
      patch, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic", align_corners=False)
  assert patch.shape[-2:] == (gh, gw)
  patch = patch.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
  return torch.cat([pos[:, :1], patch], 1).numpy()


@pytest.mark.parametrize("n,gh,gw", [(14, 6, 6), (14, 30, 20), (4, 8, 12), (14, 14, 14),
                                     (4, 3, 5)])
def test_resize_pos_embed_matches_torch_bicubic(n, gh, gw):
  pos = np.random.default_rng(n + gh).normal(size=(1, n * n + 1, 8)).astype(np.float32)
  got = resize_pos_embed(jnp.asarray(pos), (gh, gw))
  assert got.shape == (1, gh * gw + 1, 8)
  np.testing.assert_array_equal(got[:, 0], pos[:, 0])  # [CLS] entry kept
  np.testing.assert_allclose(got, torch_resize(pos, gh, gw), rtol=1e-5, atol=1e-5)


def test_non_square_input_uses_the_resized_pos_embed(tiny_params):
  model, x = tiny(), _images(2, 12, 24)
  calls = (model.prepare_tokens, {}), (None, {}), (model.get_last_selfattention, {})
  tokens, cls, attn = run(model, tiny_params, x, *calls)
  assert tokens.shape == (2, 1 + 3 * 6, 32)
  assert cls.shape == (2, 32)
  assert attn.shape == (2, 2, 19, 19)
  no_pos = {**tiny_params, "pos_embed": jnp.zeros_like(tiny_params["pos_embed"])}
  base, _, _ = run(model, no_pos, x, *calls)
  np.testing.assert_allclose(tokens - base, np.broadcast_to(
      torch_resize(tiny_params["pos_embed"], 3, 6), tokens.shape), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="multiple of the patch size"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 18, 16, 3)))


def test_drop_path_only_when_not_deterministic_first_block_zero(tiny_params):
  x = _images()
  model = tiny(drop_path_rate=0.5)
  stochastic = lambda s: (None, {"deterministic": False,
                                 "rngs": {"drop_path": jax.random.PRNGKey(s)}})
  default, det, *outs = run(model, tiny_params, x, (None, {}), (None, {"deterministic": True}),
                            stochastic(0), stochastic(1))
  np.testing.assert_array_equal(default, det)
  (rate0,) = run(tiny(), tiny_params, x, stochastic(0))  # no drop path at rate 0
  np.testing.assert_allclose(det, rate0, rtol=1e-6, atol=1e-6)
  assert not np.allclose(outs[0], det) and not np.allclose(outs[0], outs[1])
  # Rates grow linearly from 0 at the first block to drop_path_rate at the last.
  bound = model.bind({"params": tiny_params})
  np.testing.assert_allclose([b.drop_path_rate for b in bound.blocks], [0.0, 0.25, 0.5])
  # A one-block model with a high rate: that block is the first, so it never drops.
  one = tiny(depth=1, drop_path_rate=0.9)
  p1 = {k: v for k, v in tiny_params.items() if k not in ("blocks_1", "blocks_2")}
  out, det = run(one, p1, x, stochastic(0), (None, {}))
  np.testing.assert_array_equal(out, det)


def test_drop_path_statistics():
  x = jnp.ones((4000, 3, 2))
  y = np.asarray(drop_path(x, 0.3, jax.random.PRNGKey(0)))
  dropped = np.all(y == 0, axis=(1, 2))
  assert abs(dropped.mean() - 0.3) < 0.03  # whole samples, 3 sigma ~ 0.022
  np.testing.assert_allclose(y[~dropped], 1 / 0.7, rtol=1e-6)
  # In a block with rate 0.5 both residual branches are dropped for ~1/4 of the samples.
  block = Block(num_heads=2, drop_path_rate=0.5)
  xb = jax.random.normal(jax.random.PRNGKey(1), (2000, 3, 8))
  params = jax.eval_shape(block.init, jax.random.PRNGKey(2), xb[:1])
  params = jax.tree.map(lambda p: jnp.full(p.shape, 0.1), params)
  apply = lambda p, x: block.apply(p, x, deterministic=False,
                                   rngs={"drop_path": jax.random.PRNGKey(3)})
  out = compile_fast(apply, params, xb)(params, xb)
  identity = np.all(np.asarray(out) == np.asarray(xb), axis=(1, 2))
  assert abs(identity.mean() - 0.25) < 0.04


def test_bf16_compute_keeps_fp32_params(tiny_params):
  x = _images(2)
  model = tiny(dtype=jnp.bfloat16)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  out, attn = run(model, tiny_params, x, (None, {}), (model.get_last_selfattention, {}))
  assert out.dtype == jnp.bfloat16
  (ref,) = run(tiny(), tiny_params, x, (None, {}))
  err = np.linalg.norm(np.float32(out) - ref) / np.linalg.norm(ref)
  assert err < 3e-2
  np.testing.assert_allclose(np.sum(np.float32(attn), -1), 1.0, atol=2e-2)


def test_init_statistics():
  model = VisionTransformer(patch_size=8, embed_dim=128, depth=1, num_heads=2, img_size=96)
  x = jnp.zeros((1, 96, 96, 3))
  params = compile_fast(model.init, jax.random.PRNGKey(0), x)(jax.random.PRNGKey(0), x)["params"]
  flat = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  for name, v in flat.items():
    if "patch_embed" in name:  # torch's Conv2d default: U(+-1/sqrt(fan_in)), fan_in = 3 p p
      bound = 1 / np.sqrt(3 * 8 * 8)
      assert np.abs(v).max() <= bound and np.abs(v).max() > 0.9 * bound, name
    elif "kernel" in name or "cls_token" in name or "pos_embed" in name:
      assert abs(v.mean()) < 0.02 * 5 / np.sqrt(v.size), name
      tol = 0.03 if v.size > 10_000 else 0.2
      np.testing.assert_allclose(v.std(), 0.02, rtol=tol, err_msg=name)
      assert np.abs(v).max() < 2.0
    elif "scale" in name:
      np.testing.assert_array_equal(v, 1.0, err_msg=name)
    elif "bias" in name:
      np.testing.assert_array_equal(v, 0.0, err_msg=name)
    else:
      raise AssertionError(f"unexpected parameter {name}")
  assert len(flat) == 4 + 12 + 2  # patch (2), cls, pos; per block 12; final LN 2


@pytest.mark.parametrize("kw", [dict(attention="xla"), dict(remat=True),
                                dict(attention="xla", remat=True)])
def test_attention_impl_and_remat_give_the_same_outputs_and_gradients(tiny_params, kw):
  """model.attention='xla' (jax.nn.dot_product_attention) and model.remat only change how the
  numbers are computed: [CLS] output, attention maps and parameter gradients (with drop path on)
  match the plain matmul form, and the parameter tree is the same."""
  x = _images(2)
  base, other = tiny(drop_path_rate=0.2), tiny(drop_path_rate=0.2, **kw)
  assert (jax.tree.structure(jax.eval_shape(other.init, jax.random.PRNGKey(0), x)["params"])
          == jax.tree.structure(tiny_params))

  def outputs(model):
    def loss(p):
      out = model.apply({"params": p}, x, deterministic=False,
                        rngs={"drop_path": jax.random.PRNGKey(3)})
      return jnp.sum(out ** 2)
    attn = model.apply({"params": tiny_params}, x, method=model.get_last_selfattention)
    cls = model.apply({"params": tiny_params}, x)
    return cls, attn, jax.grad(loss)(tiny_params)

  want, got = jax.jit(lambda: outputs(base))(), jax.jit(lambda: outputs(other))()
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
  for g, w in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2])):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
