"""Where the step's time goes against PyTorch: each ViT module's forward + backward in both.

  python benchmarks/modules.py [--arch vit_tiny] [--shape 32x197 --shape 128x37] [--repeats 15]

Times dino_jax's Attention (qkv projection, attention, output projection), Mlp, Block and the
whole backbone (the [CLS] feature of crops of 16 * sqrt(T - 1) px) against timm's modules of the
same size (torch_step.py's timm_vit for the backbone), and the attention core alone
(vit.attention_weights times v, the matmul form, against torch's fused
scaled_dot_product_attention).
Each call is the gradient of sum(out ** 2) with respect to the parameters and (except for the
backbone's images) the input: a loss that needs the whole forward pass (with sum(out * r), XLA
dropped the last matmul's forward). The two frameworks' calls alternate (timing.py).
The default shapes are those of the CPU comparison step (vit_tiny/16, batch 16): 2 x 16 global
crops (197 tokens at patch 16, 224 px) and 8 x 16 local crops (37 tokens, 96 px). float32;
PyTorch at its default thread count.

Prints a table (ms per call and the ratio) and, as its last line, one JSON object
{"results": [{"module", "shape", "jax_ms", "torch_ms", "ratio"}, ...]}.
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from absl import app, flags
from timm.models.vision_transformer import Attention as TorchAttention
from timm.models.vision_transformer import Block as TorchBlock
from timm.models.vision_transformer import Mlp as TorchMlp

from dino_jax.models import vit
from timing import time_interleaved
from torch_step import timm_vit

_ARCH = flags.DEFINE_enum("arch", "vit_tiny", list(vit.SIZES), "Width and heads from this size.")
_SHAPES = flags.DEFINE_multi_string("shape", ["32x197", "128x37"], "CROPSxTOKENS, repeatable.")
_PATCH = flags.DEFINE_integer("patch", 16, "Patch size of the backbone.")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed calls of each after a warm-up (median).")


def input_shape(module: str, crops: int, tokens: int, dim: int) -> tuple[int, ...]:
  """(crops, tokens, dim) tokens; for the backbone (crops, S, S, 3) images of tokens - 1 patches."""
  if module != "backbone":
    return crops, tokens, dim
  side = _PATCH.value * round((tokens - 1) ** 0.5)
  return crops, side, side, 3


def jax_call(module: str, crops: int, tokens: int, dim: int, heads: int):
  """A jitted gradient call of the dino_jax module, with its arguments bound."""
  key = jax.random.PRNGKey(0)
  if module == "attention core":
    args = [jax.random.normal(k, (crops, heads, tokens, dim // heads))
            for k in jax.random.split(key, 3)]
    core = lambda q, k, v: jnp.matmul(vit.attention_weights(q, k), v)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(core(q, k, v) ** 2), (0, 1, 2)))
    return functools.partial(grad, *args)
  layer = {"attention": lambda: vit.Attention(heads), "mlp": lambda: vit.Mlp(4 * dim),
           "block": lambda: vit.Block(heads),
           "backbone": lambda: vit.VisionTransformer(_PATCH.value, **vit.SIZES[_ARCH.value]),
           }[module]()
  x = jax.random.normal(key, input_shape(module, crops, tokens, dim))
  params = layer.init(jax.random.PRNGKey(1), x)
  wrt = 0 if module == "backbone" else (0, 1)  # as in training: no gradient for the images
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x) ** 2), wrt))
  return functools.partial(grad, params, x)


def torch_call(module: str, crops: int, tokens: int, dim: int, heads: int):
  """The same gradient in PyTorch with timm's module: a call that runs forward and backward."""
  torch.manual_seed(0)
  if module == "attention core":
    args = [torch.randn(crops, heads, tokens, dim // heads, requires_grad=True) for _ in range(3)]
    fn = lambda: F.scaled_dot_product_attention(*args)
    params = args
  else:
    layer = {"attention": lambda: TorchAttention(dim, heads, qkv_bias=True),
             "mlp": lambda: TorchMlp(dim, 4 * dim),
             "block": lambda: TorchBlock(dim, heads, qkv_bias=True),
             "backbone": lambda: timm_vit(vit.SIZES[_ARCH.value], _PATCH.value, 224, 0.0),
             }[module]()
    shape = input_shape(module, crops, tokens, dim)
    if module == "backbone":  # NCHW
      shape = (crops, 3, shape[1], shape[2])
    x = torch.randn(shape, requires_grad=module != "backbone")
    fn = lambda: layer(x)
    params = [x] + list(layer.parameters())

  def call():
    for p in params:
      p.grad = None
    (fn() ** 2).sum().backward()

  return call


def main(argv):
  del argv
  size = vit.SIZES[_ARCH.value]
  dim, heads = size["embed_dim"], size["num_heads"]
  results = []
  for shape in _SHAPES.value:
    crops, tokens = (int(n) for n in shape.split("x"))
    for module in ["attention core", "attention", "mlp", "block", "backbone"]:
      calls = {"jax": jax_call(module, crops, tokens, dim, heads),
               "torch": torch_call(module, crops, tokens, dim, heads)}
      for call in calls.values():
        jax.block_until_ready(call())
      times = time_interleaved(calls, _REPEATS.value)
      jax_ms, torch_ms = (1e3 * float(np.median(times[n])) for n in ("jax", "torch"))
      results.append({"module": module, "shape": shape, "jax_ms": round(jax_ms, 2),
                      "torch_ms": round(torch_ms, 2), "ratio": round(jax_ms / torch_ms, 3)})
  print(f"{jax.devices()[0].device_kind}: {_ARCH.value} (width {dim}, {heads} heads), float32, "
        f"forward + backward, ms per call (median of {_REPEATS.value}); torch "
        f"{torch.__version__} on {torch.get_num_threads()} threads")
  print(f"{'module':16s} {'crops x T':>10s} {'dino_jax':>9s} {'torch':>9s} {'jax/torch':>9s}")
  for r in results:
    print(f"{r['module']:16s} {r['shape']:>10s} {r['jax_ms']:9.2f} {r['torch_ms']:9.2f} "
          f"{r['ratio']:9.2f}")
  print(json.dumps({"device": jax.devices()[0].device_kind, "arch": _ARCH.value,
                    "results": results}))


if __name__ == "__main__":
  app.run(main)
