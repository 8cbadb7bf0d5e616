"""The head's weight-normalised last layer: the module against the matrix form W = g V / ||V||.

  python benchmarks/weight_norm.py [--rows 16 --rows 32 ...] [--bottleneck 256] [--out_dim 65536]

Times dino_jax.models.head.WeightNormDense, which computes (x V) * g / ||V||, against x W with
W built inside the matmul's operand, forward and forward + backward (gradients w.r.t. x, V and
g), for each row count: the teacher sees 2 rows per image, the student 2 + the local crops. The
forms are called in turn.
Prints a table and, as its last line, one JSON object {form: {rows: {"fwd": ms, "grad": ms}}}.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dino_jax.models.head import WeightNormDense
from timing import time_interleaved

_ROWS = flags.DEFINE_multi_integer("rows", [16, 32, 64, 160], "Rows of x (B x crops).")
_BOTTLENECK = flags.DEFINE_integer("bottleneck", 256, "Input width (head.bottleneck_dim).")
_OUT_DIM = flags.DEFINE_integer("out_dim", 65536, "K, the number of prototypes.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls after 2 warm-up calls (median).")


def matrix_form(params, x):
  """x W, W = g V / ||V|| per column: the weight built first, as torch's weight_norm does."""
  v, g = params["params"]["kernel_v"], params["params"]["kernel_g"]
  return x @ (g * v / jnp.linalg.norm(v, axis=0, keepdims=True))


def main(argv):
  del argv
  layer = WeightNormDense(_OUT_DIM.value)
  forms = {"module": layer.apply, "matrix": matrix_form}
  rng = np.random.default_rng(0)
  params = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, _BOTTLENECK.value)))
  results = {name: {} for name in forms}
  for rows in _ROWS.value:
    x = jnp.asarray(rng.normal(size=(rows, _BOTTLENECK.value)), jnp.float32)
    calls = {}
    for name, f in forms.items():
      fwd = jax.jit(f)
      grad = jax.jit(jax.grad(lambda p, x, f=f: jnp.sum(jnp.sin(f(p, x))), argnums=(0, 1)))
      for kind, fn in (("fwd", fwd), ("grad", grad)):
        jax.block_until_ready(fn(params, x))
        jax.block_until_ready(fn(params, x))
        calls[(name, kind)] = lambda fn=fn, x=x: fn(params, x)
    times = time_interleaved(calls, _REPEATS.value)
    for (name, kind), t in times.items():
      results[name].setdefault(rows, {})[kind] = 1e3 * float(np.median(t))
  print(f"K = {_OUT_DIM.value}, input width {_BOTTLENECK.value}, {jax.devices()[0].platform}; "
        "median ms")
  print(f"{'rows':>6} " + " ".join(f"{n + ' ' + k:>14}" for n in forms for k in ("fwd", "grad")))
  for rows in _ROWS.value:
    print(f"{rows:>6} " + " ".join(f"{results[n][rows][k]:14.1f}" for n in forms
                                  for k in ("fwd", "grad")))
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main)
