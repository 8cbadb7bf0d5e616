"""What several test files share: the tiny training config, and comparing two trees of arrays."""
import jax
import ml_collections as mlc
import numpy as np

from dino_jax import config as config_lib

# A ViT and head small enough to train in seconds on the CPU (patch 4 on 16 px crops: 4 x 4
# tokens), on the embedded shapes images: dotted config key -> value.
TINY = {
    "data.source": "shapes", "data.workers": 0, "data.shapes_image_size": 16,
    "data.shapes_train_size": 96, "data.shapes_eval_size": 40,
    "model.arch": "vit_custom", "model.patch_size": 4, "model.embed_dim": 32,
    "model.depth": 2, "model.num_heads": 2,
    "model.head_hidden_dim": 32, "model.head_bottleneck_dim": 16, "out_dim": 64,
    "global_crops_size": 16, "local_crops_size": 8, "local_crops_number": 2, "batch_size": 16,
}


def tiny_config(base: mlc.ConfigDict | None = None, **overrides) -> mlc.ConfigDict:
  """base (default: the release's base_config) with TINY, then overrides, set: keyword names
  use "__" for ".", e.g. tiny_config(model__use_bn_in_head=True)."""
  c = config_lib.base_config() if base is None else base
  values = {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}
  for key, value in values.items():
    *path, last = key.split(".")
    node = c
    for part in path:
      node = node[part]
    node[last] = value
  return c


def tiny_flags(**overrides) -> list[str]:
  """TINY and overrides as the trainer's --config.KEY=VALUE flags."""
  values = {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}
  return [f"--config.{k}={v}" for k, v in values.items()]


def assert_trees_close(got, want, rtol: float = 0.0, *, norm: bool = False, what: str = ""):
  """got and want have the same structure and, leaf by leaf (failures name the leaf's path):

  rtol 0: the same dtype, shape and bits.
  rtol > 0, norm False: elementwise within rtol x the leaf's largest |value|.
  rtol > 0, norm True: ||got - want|| <= rtol ||want||, with the key third of each qkv bias left
    out. That is the comparison for weights after Adam steps: where a gradient is near Adam's
    eps the update is rounding noise, and the key bias's gradient is exactly zero (softmax
    ignores a shift shared by all keys), so those entries differ between any two summation
    orders, in PyTorch too.
  """
  assert jax.tree.structure(got) == jax.tree.structure(want), (
      f"{what}: {jax.tree.structure(got)} != {jax.tree.structure(want)}")
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    name = what + jax.tree_util.keystr(path)
    a, b = np.asarray(a), np.asarray(b)
    if rtol == 0:
      assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{name}: {a.dtype}{a.shape} vs " \
                                                       f"{b.dtype}{b.shape}"
      np.testing.assert_array_equal(a, b, err_msg=name)
      continue
    a, b = a.astype(np.float64), b.astype(np.float64)
    if not norm:
      np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(np.abs(b).max(), 1e-30),
                                 err_msg=name)
      continue
    if name.endswith("['qkv']['bias']"):
      d = a.shape[-1] // 3
      a[..., d:2 * d] = b[..., d:2 * d] = 0
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert err <= rtol, f"{name}: relative difference {err:.2e}"
