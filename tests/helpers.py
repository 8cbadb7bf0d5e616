"""Helpers shared by several test files."""
import jax
import numpy as np


def assert_params_close(got, want, rtol, what=""):
  """Per leaf, ||got - want|| <= rtol ||want||, key biases left out.

  Adam's first steps move each weight by ~lr g / (|g| + eps): where |g| is near eps the update is
  rounding noise, and the key bias's gradient is exactly zero (softmax ignores a shift shared by
  all keys). Those entries differ between any two summation orders (in PyTorch too), so the key
  third of each qkv bias is not compared and the rest is compared in norm.
  """
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    a, b = np.array(a, np.float64), np.array(b, np.float64)
    name = jax.tree_util.keystr(path)
    if name.endswith("['qkv']['bias']"):
      d = a.shape[-1] // 3
      a[..., d:2 * d] = b[..., d:2 * d] = 0
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert err <= rtol, f"{what}{name}: relative difference {err:.2e}"
