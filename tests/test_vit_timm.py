"""The ViT against timm's VisionTransformer, an independent implementation of the same network.

Weights: a timm model's state_dict (its init, perturbed so every bias and LayerNorm matters),
converted with dino_jax.convert. At other resolutions timm (dynamic_img_size off) gets the release's
position-embedding resize, written here in PyTorch as the reference describes it: bicubic
torch.nn.functional.interpolate with scale_factor (g + 0.1) / n, align_corners False. Tolerance:
max |ours - timm| <= 1e-4 * max |timm| (fp32 on CPU).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dino_jax import convert
from dino_jax.models import build_vit, resize_pos_embed
import release

timm_vit = pytest.importorskip("timm.models.vision_transformer")

# vit_tiny/16 whole at 224 px; at other sizes (the resize does not depend on depth) vit_tiny/16 and
# vit_small/8 widths with fewer blocks, to stay fast (patch 8 at 480 x 320 px is 2400 tokens).
CASES = {
    "vit_tiny16": dict(embed_dim=192, depth=12, num_heads=3, patch_size=16),
    "vit_tiny16_4blocks": dict(embed_dim=192, depth=4, num_heads=3, patch_size=16),
    "vit_small8_2blocks": dict(embed_dim=384, depth=2, num_heads=6, patch_size=8),
}
RUNS = [("vit_tiny16", (224, 224)), ("vit_tiny16_4blocks", (96, 96)),
        ("vit_tiny16_4blocks", (320, 480)), ("vit_small8_2blocks", (224, 224)),
        ("vit_small8_2blocks", (96, 96)), ("vit_small8_2blocks", (320, 480))]
REL = 1e-4


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref))) / float(np.max(np.abs(ref)))


def make_timm(img_size, embed_dim, depth, num_heads, patch_size) -> nn.Module:
  return timm_vit.VisionTransformer(
      img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
      num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=0, global_pool="token",
      dynamic_img_size=False, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6)).eval()


def random_timm_state_dict(case: dict, seed: int = 0) -> dict[str, torch.Tensor]:
  """timm's init at 224 px, every tensor perturbed (zero biases and unit LayerNorms would hide a
  wrong mapping)."""
  torch.manual_seed(seed)
  sd = make_timm(224, **case).state_dict()
  return {k: v + 0.05 * torch.randn_like(v) for k, v in sd.items()}


def timm_outputs(sd: dict, case: dict, x: torch.Tensor, n_last: int):
  """timm at x's size (NCHW): [CLS] (B, D), last attention (B, heads, T, T), last n normed
  tokens."""
  h, w = x.shape[-2:]
  p = case["patch_size"]
  model = make_timm((h, w), **case)
  pos_embed = release.interpolate_pos_encoding(sd["pos_embed"], h // p, w // p)
  model.load_state_dict({**sd, "pos_embed": pos_embed}, strict=True)
  seen = {}
  last = model.blocks[-1].attn
  hook = last.register_forward_pre_hook(lambda mod, inp: seen.setdefault("x", inp[0]))
  with torch.no_grad():
    cls = model.forward_head(model.forward_features(x), pre_logits=True)
    hook.remove()
    # The attention probabilities, recomputed from the last attention's input (timm fuses them).
    b, t, d = seen["x"].shape
    qkv = last.qkv(seen["x"]).reshape(b, t, 3, last.num_heads, d // last.num_heads)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4)
    attn = (q * last.scale @ k.transpose(-2, -1)).softmax(-1)
    # get_intermediate_layers: the blocks one by one, the final norm on each of the last n.
    # pylint: disable-next=protected-access
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    inter = []
    for i, blk in enumerate(model.blocks):
      tokens = blk(tokens)
      if len(model.blocks) - i <= n_last:
        inter.append(model.norm(tokens))
  return cls.numpy(), attn.numpy(), [t.numpy() for t in inter]


@functools.lru_cache(maxsize=None)
def ours_fn(case_name: str, n_last: int):
  model = build_vit("vit_custom", **CASES[case_name], img_size=224)

  @jax.jit
  def run(params, x):
    v = {"params": params}
    return (model.apply(v, x), model.apply(v, x, method=model.get_last_selfattention),
            model.apply(v, x, n_last, method=model.get_intermediate_layers))

  return run


@pytest.mark.parametrize("case_name,hw", RUNS, ids=[f"{c}-{h}x{w}" for c, (h, w) in RUNS])
def test_matches_timm(case_name, hw):
  """[CLS], last self-attention and the last 2 blocks' normed tokens equal timm's at 224 px (no
  resize), 96 px (local crops) and 480 x 320 px (attention maps) with the release's resize."""
  case = CASES[case_name]
  sd = random_timm_state_dict(case)
  params = convert.torch_to_flax(sd)
  rng = np.random.default_rng(1)
  batch = 1 if hw[0] * hw[1] > 224 * 224 else 2
  x = rng.normal(size=(batch,) + hw + (3,)).astype(np.float32)
  ref_cls, ref_attn, ref_inter = timm_outputs(sd, case, torch.from_numpy(x).permute(0, 3, 1, 2),
                                              n_last=2)
  cls, attn, inter = jax.device_get(ours_fn(case_name, 2)(params, x))
  assert rel_err(cls, ref_cls) <= REL
  assert rel_err(attn, ref_attn) <= REL
  np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
  assert len(inter) == 2
  for ours, ref in zip(inter, ref_inter):
    assert rel_err(ours, ref) <= REL
  np.testing.assert_array_equal(inter[-1][:, 0], cls)  # the [CLS] is the last normed token 0


@pytest.mark.parametrize("n,grid", [(14, (6, 6)), (14, (20, 30)), (28, (12, 12)), (28, (60, 40)),
                                    (14, (14, 7))])
def test_resize_pos_embed_is_torch_bicubic_with_scale_factor(n, grid):
  """resize_pos_embed equals F.interpolate(scale_factor=(g + 0.1) / n, bicubic) to fp32 rounding,
  and differs clearly from a resize to the target size (the mapping this pins down matters)."""
  rng = np.random.default_rng(0)
  pos = rng.normal(size=(1, n * n + 1, 8)).astype(np.float32)
  ours = np.asarray(resize_pos_embed(jnp.asarray(pos), grid))
  ref = release.interpolate_pos_encoding(torch.from_numpy(pos), *grid).numpy()
  assert rel_err(ours, ref) <= 1e-5
  d = pos.shape[-1]
  by_size = F.interpolate(torch.from_numpy(pos[:, 1:]).reshape(1, n, n, d).permute(0, 3, 1, 2),
                          size=grid, mode="bicubic", align_corners=False)
  by_size = by_size.permute(0, 2, 3, 1).reshape(1, -1, d).numpy()
  assert rel_err(ours[:, 1:], by_size) > 100 * 1e-5


def test_gradients_match_timm():
  """The backward pass: d(sum(cls * c)) / d(every parameter, the image) equals timm's autograd on
  the same weights (vit_tiny/16 widths, 4 blocks, 224 px, so the position embedding is used as is).
  This pins what the memory-saving pieces (the checkpointed GELU, the rematerialised LayerNorms,
  the softmax's custom JVP) compute: the exact gradient, only with less kept."""
  case = CASES["vit_tiny16_4blocks"]
  sd = random_timm_state_dict(case)
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 224, 224, 3)).astype(np.float32)
  cot = rng.normal(size=(2, case["embed_dim"])).astype(np.float32)

  model = make_timm((224, 224), **case)
  model.load_state_dict(sd, strict=True)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
  (model(xt) * torch.from_numpy(cot)).sum().backward()
  want = convert.torch_to_flax({k: p.grad for k, p in model.named_parameters()})
  want_dx = xt.grad.permute(0, 2, 3, 1).numpy()

  ours = build_vit("vit_custom", **case, img_size=224)
  loss = lambda p, x: jnp.sum(ours.apply({"params": p}, x) * cot)
  grads, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(convert.torch_to_flax(sd), x)
  assert rel_err(dx, want_dx) <= REL
  assert jax.tree.structure(grads) == jax.tree.structure(want)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want)):
    assert rel_err(g, w) <= REL, jax.tree_util.keystr(path)
