"""The stride-1 3x3 convolution of each ResNet-50 stage at a crop size: XLA's forward against
PyTorch's.

  python benchmarks/convolutions.py --crop 64 --batch 16

Prints one row per (stage, spatial size): jax and torch milliseconds (median, the two called in
turn) and their ratio, then one JSON line. Finds shapes where XLA:CPU's convolution falls off its
fast path (e.g. a 2 x 2 input, which a 64 px crop gives the last stage; figures in
benchmarks/RESULTS.md).
"""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
from timing import time_interleaved

# (width of the 3x3 conv, its input's stride from the image) per stage of a ResNet-50.
STAGES = ((64, 4), (128, 8), (256, 16), (512, 32))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--crop", type=int, default=64, help="crop size in pixels")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), [(1, 1), (1, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC")))
  rows = []
  for width, stride in STAGES:
    size = max(1, args.crop // stride)
    x = rng.standard_normal((args.batch, size, size, width), dtype=np.float32)
    w = rng.standard_normal((3, 3, width, width), dtype=np.float32)
    xj, wj = jnp.asarray(x), jnp.asarray(w)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
    conv(xj, wj).block_until_ready()  # compile

    def torch_conv(xt=xt, wt=wt):
      with torch.no_grad():
        return torch.nn.functional.conv2d(xt, wt, padding=1)

    times = time_interleaved({"jax": lambda: conv(xj, wj), "torch": torch_conv}, args.repeats)
    jax_ms, torch_ms = (1e3 * float(np.median(times[k])) for k in ("jax", "torch"))
    rows.append({"width": width, "size": size, "jax_ms": jax_ms, "torch_ms": torch_ms})
    print(f"3x3 conv {width:>3} ch at {size:>3} x {size:<3} (batch {args.batch}): jax "
          f"{jax_ms:8.2f} ms, torch {torch_ms:7.2f} ms, jax / torch {jax_ms / torch_ms:6.1f}x")
  print(json.dumps({"crop": args.crop, "batch": args.batch, "rows": rows,
                    "torch_threads": torch.get_num_threads(), "jax": jax.__version__}))


if __name__ == "__main__":
  main()
