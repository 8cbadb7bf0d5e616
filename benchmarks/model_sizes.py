"""Parameter counts of vit_tiny / small / base at patch 16 (backbone, and DINO head with K = 65536),
and the forward time of vit_small/16 at 224 px on this machine's default device.

  python benchmarks/model_sizes.py [--batch 8] [--runs 7]

Prints one JSON object. Forward: jitted, fp32, median over --runs timed calls after 2 warm-up calls,
reported per image.
"""
import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax.models import DINOHead, vit_base, vit_small, vit_tiny


def count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--runs", type=int, default=7)
  args = parser.parse_args()

  key = jax.random.PRNGKey(0)
  sizes = {}
  for make in (vit_tiny, vit_small, vit_base):
    model = make(patch_size=16)
    backbone = count(jax.eval_shape(model.init, key, jnp.zeros((1, 224, 224, 3))))
    head = count(jax.eval_shape(DINOHead(65536).init, key, jnp.zeros((1, model.embed_dim))))
    sizes[f"{make.__name__}/16"] = {"backbone": backbone, "head_k65536": head}

  model = vit_small(patch_size=16)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, 224, 224, 3)), jnp.float32)
  params = jax.jit(model.init)(key, x[:1])
  forward = jax.jit(model.apply)
  t = time.perf_counter()
  forward(params, x).block_until_ready()
  compile_s = time.perf_counter() - t
  forward(params, x).block_until_ready()
  times = []
  for _ in range(args.runs):
    t = time.perf_counter()
    forward(params, x).block_until_ready()
    times.append(time.perf_counter() - t)
  dev = jax.devices()[0]
  print(json.dumps({
      "params": sizes,
      "forward": {"model": "vit_small/16", "image_size": 224, "dtype": "float32",
                  "batch": args.batch, "runs": args.runs,
                  "ms_per_image": 1e3 * float(np.median(times)) / args.batch,
                  "ms_per_image_min": 1e3 * float(np.min(times)) / args.batch,
                  "first_call_s": compile_s},
      "device": f"{dev.platform} ({dev.device_kind})", "host": platform.processor() or
      platform.machine(), "jax": jax.__version__,
  }))


if __name__ == "__main__":
  main()
