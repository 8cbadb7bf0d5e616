"""Which attention form is fastest here: forward + backward of one ViT attention layer.

  python benchmarks/attention.py [--batch 64] [--dim 384] [--heads 6] [--dtype float32]

Times dino_jax.models.vit.Attention (qkv projection, attention, output projection) for each
implementation this platform runs (model.attention: matmul, xla; cudnn on NVIDIA GPUs in bf16/fp16)
at T = 197 tokens (a 224 px crop at patch 16) and T = 37 (a 96 px crop), B crops of each, the
implementations called in turn. The main job's sizes: --batch 64 --dim 64 --heads 8 --tokens 65
--tokens 17.
Prints a table and, as its last line, one JSON object {impl: {T: ms}}.
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dino_jax.models.vit import Attention
from timing import time_interleaved

_BATCH = flags.DEFINE_integer("batch", 64, "Crops per call.")
_DIM = flags.DEFINE_integer("dim", 384, "Width (ViT-S: 384).")
_HEADS = flags.DEFINE_integer("heads", 6, "Heads (ViT-S: 6).")
_DTYPE = flags.DEFINE_string("dtype", "", "Compute dtype; default float32 on CPU, bfloat16 else.")
_TOKENS = flags.DEFINE_multi_integer("tokens", [197, 37], "Sequence lengths.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls after 2 warm-up calls (median).")


def fwd_bwd_step(impl: str, tokens: int, dtype):
  """A jitted value_and_grad (w.r.t. params and input) of one Attention layer, and its inputs."""
  layer = Attention(_HEADS.value, dtype=dtype, impl=impl)
  x = jax.random.normal(jax.random.PRNGKey(0), (_BATCH.value, tokens, _DIM.value), dtype)
  params = layer.init(jax.random.PRNGKey(1), x)
  loss = lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32) ** 2)
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  jax.block_until_ready(step(params, x))
  jax.block_until_ready(step(params, x))
  return step, (params, x)


def main(argv):
  del argv
  platform = jax.devices()[0].platform
  dtype = jnp.dtype(_DTYPE.value or ("float32" if platform == "cpu" else "bfloat16"))
  impls = ["matmul", "xla"]
  if platform == "gpu" and dtype != jnp.float32:
    impls.append("cudnn")
  results = {impl: {} for impl in impls}
  for t in _TOKENS.value:
    steps = {}
    for impl in impls:
      try:
        steps[impl] = fwd_bwd_step(impl, t, dtype)
      except Exception as e:  # pylint: disable=broad-except
        results[impl][t] = None  # e.g. cudnn rejecting a shape
        print(f"{impl} at T={t}: {type(e).__name__}: {str(e)[:200]}")
    calls = {impl: functools.partial(step, *args) for impl, (step, args) in steps.items()}
    for impl, ts in time_interleaved(calls, _REPEATS.value).items():
      results[impl][t] = round(float(np.median(ts)) * 1e3, 3)
  print(f"{jax.devices()[0].device_kind}, {dtype.name}, batch {_BATCH.value}, width {_DIM.value}, "
        f"{_HEADS.value} heads: ms per forward + backward")
  print(f"{'impl':8s}" + "".join(f"{f'T={t}':>12s}" for t in _TOKENS.value))
  for impl, row in results.items():
    print(f"{impl:8s}" + "".join(f"{'-' if row[t] is None else row[t]:>12}" for t in row))
  print(json.dumps({"device": jax.devices()[0].device_kind, "dtype": dtype.name,
                    "batch": _BATCH.value, "results": results}))


if __name__ == "__main__":
  app.run(main)
