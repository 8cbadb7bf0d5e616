"""dino_jax.convert: release / timm / transformers names, layouts, round trips and errors.

The head reference is the release's DINOHead transcribed below (its published code cannot be
downloaded here): nn.Sequential MLP (Linear, [BatchNorm1d], GELU, ...), F.normalize, and
nn.utils.weight_norm(nn.Linear(bottleneck, K, bias=False)) with g filled with 1.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from dino_jax import convert
from dino_jax.convert.hf import release_to_hf
import release
from dino_jax.models import DINOHead, build_vit
from helpers import assert_trees_close

timm_vit = pytest.importorskip("timm.models.vision_transformer")

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")

SMALL = dict(embed_dim=48, depth=2, num_heads=3, patch_size=16)


def timm_model(**kw):
  kw = {**SMALL, **kw}
  return timm_vit.VisionTransformer(
      img_size=224, num_classes=0, dynamic_img_size=False,
      norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), **kw)


def flax_backbone(seed=0, **kw):
  """A ViT and random params of its shapes (random biases and LayerNorms too)."""
  model = build_vit("vit_custom", **{**SMALL, **kw})
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  rng = np.random.default_rng(seed)
  return model, jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                             shapes["params"])


def test_backbone_round_trips_are_bitwise_and_load_strictly_into_timm():
  _, params = flax_backbone()
  sd = convert.flax_to_torch(params)
  model = timm_model()
  assert list(sd) == list(model.state_dict())  # the release's / timm's names, in their order
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  assert_trees_close(convert.torch_to_flax(sd), params)
  # torch -> flax -> torch, from torch tensors.
  tsd = model.state_dict()
  back = convert.flax_to_torch(convert.torch_to_flax(tsd))
  assert list(back) == list(tsd)
  for k, v in tsd.items():
    np.testing.assert_array_equal(back[k], v.numpy())


def test_layouts():
  """PyTorch linear (out, in) vs flax (in, out); conv (D, 3, p, p) vs (p, p, 3, D)."""
  _, params = flax_backbone()
  sd = convert.flax_to_torch(params)
  np.testing.assert_array_equal(sd["blocks.1.attn.qkv.weight"],
                                params["blocks_1"]["attn"]["qkv"]["kernel"].T)
  np.testing.assert_array_equal(sd["patch_embed.proj.weight"][5, 2, 3, 7],
                                params["patch_embed"]["kernel"][3, 7, 2, 5])
  assert sd["pos_embed"].shape == (1, 197, 48) and sd["cls_token"].shape == (1, 1, 48)


def test_bfloat16_tensors_keep_their_bits():
  _, params = flax_backbone()
  tsd = {k: torch.from_numpy(v).to(torch.bfloat16)
         for k, v in convert.flax_to_torch(params).items()}
  out = convert.torch_to_flax(tsd)
  assert out["pos_embed"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(out["pos_embed"].astype(np.float32),
                                tsd["pos_embed"].float().numpy())


@pytest.mark.parametrize("use_bn,norm_last_layer,nlayers",
                         [(False, True, 3), (True, False, 3), (False, False, 1), (True, True, 2)])
def test_head_matches_release_head(use_bn, norm_last_layer, nlayers):
  """Torch head -> flax: same outputs (eval mode: BN with running stats); round trip bitwise."""
  torch.manual_seed(0)
  dims = dict(nlayers=nlayers, hidden_dim=32, bottleneck_dim=16)
  ref = release.DINOHead(24, 40, use_bn=use_bn, norm_last_layer=norm_last_layer, **dims).eval()
  with torch.no_grad():
    for name, t in ref.state_dict().items():
      if name.endswith("running_var"):
        t.uniform_(0.5, 2.0)
      elif name.endswith("num_batches_tracked"):
        t.fill_(7)
      elif not norm_last_layer or not name.endswith("weight_g"):
        t.add_(0.3 * torch.randn_like(t))
  tsd = ref.state_dict()
  params, stats = convert.torch_to_flax(tsd, with_batch_stats=True)
  head = DINOHead(40, use_bn=use_bn, norm_last_layer=norm_last_layer, **dims)
  x = np.random.default_rng(0).normal(size=(6, 24)).astype(np.float32)
  ours = head.apply({"params": params, "batch_stats": stats}, x)
  with torch.no_grad():
    theirs = ref(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())
  back = convert.flax_to_torch(params, stats, num_batches_tracked=7)
  assert list(back) == list(tsd)
  for k, v in tsd.items():
    np.testing.assert_array_equal(back[k], v.numpy())
  release.DINOHead(24, 40, use_bn=use_bn, **dims).load_state_dict(
      {k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_parametrized_weight_norm_names():
  """torch.nn.utils.parametrizations.weight_norm keys (original0 = g, original1 = v) are read."""
  torch.manual_seed(0)
  old = release.DINOHead(24, 40, hidden_dim=32, bottleneck_dim=16)
  new = release.DINOHead(24, 40, hidden_dim=32, bottleneck_dim=16, parametrized=True)
  new.load_state_dict({k.replace("weight_g", "parametrizations.weight.original0").replace(
      "weight_v", "parametrizations.weight.original1"): v for k, v in old.state_dict().items()})
  assert "last_layer.parametrizations.weight.original1" in new.state_dict()
  assert_trees_close(convert.torch_to_flax(new.state_dict()), convert.torch_to_flax(
      old.state_dict()))


def test_prefixes_and_wrapper_state_dicts():
  """'module.' (DDP) stripped; 'backbone.' + 'head.' keys give {'backbone', 'head'}; an explicit
  prefix selects a part; flax_to_torch writes the same layout back."""
  _, backbone = flax_backbone()
  head = DINOHead(40, hidden_dim=32, bottleneck_dim=16)
  shapes = jax.eval_shape(head.init, jax.random.PRNGKey(0), jnp.zeros((1, 48)))["params"]
  hp = jax.tree.map(lambda x: np.full(x.shape, 0.5, np.float32), shapes)
  wrapper = {"backbone": backbone, "head": hp}
  student = convert.flax_to_torch(wrapper, prefix="module.")  # the release's student
  assert next(iter(student)) == "module.backbone.cls_token"
  assert "module.head.last_layer.weight_v" in student
  assert_trees_close(convert.torch_to_flax(student), wrapper)
  assert_trees_close(convert.torch_to_flax(student, prefix="module.backbone."), backbone)
  assert_trees_close(convert.torch_to_flax(student, prefix="module.head."), hp)
  only_backbone = {k: v for k, v in student.items() if ".backbone." in k}
  assert_trees_close(convert.torch_to_flax(only_backbone), backbone)
  compiled = {"_orig_mod." + k: v for k, v in convert.flax_to_torch(backbone).items()}
  assert_trees_close(convert.torch_to_flax(compiled), backbone)


def test_transformers_names_round_trip():
  _, params = flax_backbone()
  sd = convert.flax_to_torch(params)
  hf = release_to_hf(sd)
  assert "encoder.layer.1.attention.attention.query.weight" in hf
  np.testing.assert_array_equal(hf["encoder.layer.0.attention.attention.key.bias"],
                                sd["blocks.0.attn.qkv.bias"][48:96])
  assert_trees_close(convert.torch_to_flax(hf), params)
  assert_trees_close(convert.torch_to_flax({"vit." + k: v for k, v in hf.items()}), params)


def error_message(fn, exc=ValueError) -> str:
  """The message of the `exc` that fn() raises (test_interop_cli uses it too)."""
  with pytest.raises(exc) as e:
    fn()
  return str(e.value)


def test_errors_name_the_key_and_both_shapes():
  _, params = flax_backbone()
  sd = convert.flax_to_torch(params)
  msg = error_message(lambda: convert.torch_to_flax({**sd, "head.weight": np.zeros((10, 48))}))
  assert "head.weight" in msg and "unknown" in msg
  msg = error_message(lambda: convert.torch_to_flax(
      {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}))
  assert "blocks.1.mlp.fc2.bias: missing" in msg and "(48,)" in msg
  bad = {**sd, "blocks.1.attn.qkv.weight": np.zeros((144, 40), np.float32)}
  msg = error_message(lambda: convert.torch_to_flax(bad))
  assert "blocks.1.attn.qkv.weight" in msg and "(144, 40)" in msg and "(144, 48)" in msg
  bad = {**sd, "pos_embed": np.zeros((1, 190, 48), np.float32)}
  assert "not a square grid" in error_message(lambda: convert.torch_to_flax(bad))
  # Against a target model: vit_custom 48 wide, patch 8.
  model = build_vit("vit_custom", **{**SMALL, "patch_size": 8})
  target = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"]
  msg = error_message(lambda: convert.torch_to_flax(sd, target=target))
  assert "patch_embed.proj.weight: shape (48, 3, 16, 16) in the state_dict, the model expects " \
         "(48, 3, 8, 8)" in msg
  assert "pos_embed: shape (1, 197, 48) in the state_dict, the model expects (1, 785, 48)" in msg
  deeper = build_vit("vit_custom", **{**SMALL, "depth": 3})
  target = jax.eval_shape(deeper.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"]
  assert "blocks.2.norm1.weight: missing" in error_message(
      lambda: convert.torch_to_flax(sd, target=target))
  assert "neither a ViT backbone" in error_message(lambda: convert.torch_to_flax({"fc.weight": sd[
      "norm.weight"]}))
  assert "checkpoint['teacher']" in error_message(lambda: convert.torch_to_flax({"teacher": sd}))
  assert "not a parameter" in error_message(lambda: convert.flax_to_torch({**params, "extra": {
      "kernel": np.zeros(3)}}))


def test_batchnorm_statistics():
  head = DINOHead(40, use_bn=True, hidden_dim=32, bottleneck_dim=16)
  shapes = jax.eval_shape(head.init, jax.random.PRNGKey(0), jnp.zeros((2, 24)))
  v = jax.tree.map(lambda x: np.random.default_rng(0).uniform(0.5, 1, x.shape).astype(np.float32),
                   shapes)
  assert "batch_stats" in error_message(lambda: convert.flax_to_torch(v["params"]))
  sd = convert.flax_to_torch(v["params"], v["batch_stats"])
  params, stats = convert.torch_to_flax(sd, with_batch_stats=True)
  assert_trees_close((params, stats), jax.tree.map(np.asarray, (dict(v["params"]),
                                                                dict(v["batch_stats"]))))
  assert_trees_close(convert.torch_to_flax(sd), params)  # params only: the statistics left out
