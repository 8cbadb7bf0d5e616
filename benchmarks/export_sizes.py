"""Sizes and times of every export format, and how exactly each comes back, for ViT-S/16.

  python benchmarks/export_sizes.py [--workdir DIR] [--out_dir /tmp/export_sizes]

Without --workdir: a ViT-S/16 workdir with the release's head (K = 65536) whose state is one
optimizer step in (random weights and gradients: the Adam moments are full, as in a real run).
For each format: export seconds, bytes on disk, import seconds (importing.import_weights: read,
check, write the workdir), the max |difference| of the parameters after export -> import (0 =
bitwise), and the max |difference| between PyTorch's [CLS] on the exported file and ours at 224 px
(timm's VisionTransformer for pth / safetensors / full, transformers.ViTModel for hf; 2 random
images, fp32). Prints one JSON object per format, then one with everything.
"""
import functools
import json
import os
import platform
import shutil
import tempfile
import time

import jax
import numpy as np
import optax
import torch
from absl import app, flags

from dino_jax import checkpoint
from dino_jax import config as config_lib
from dino_jax import optim, schedules
from dino_jax import state as state_lib
from dino_jax.convert import exporting, importing
from dino_jax.models import build_vit

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir to export (default: a fresh ViT-S/16).")
_OUT = flags.DEFINE_string("out_dir", None, "Where exports go (default: a temp dir, removed).")

RUNS = [("pth", False), ("pth", True), ("safetensors", False), ("safetensors", True),
        ("hf", False), ("full", False)]


def make_workdir(path: str):
  """ViT-S/16 + the release's head: its init, then one AdamW step on random gradients (the last
  layer is still frozen, as in the release's first epoch), a random centre."""
  config = config_lib.base_config()  # vit_small/16, out_dim 65536, the release's defaults
  fns = schedules.dino_schedules(config, 1251, 125100)
  tx = optim.make_optimizer(config, fns, 1251)
  state = jax.jit(state_lib.init_fn(config, tx))(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda x: (1e-3 * rng.standard_normal(x.shape)).astype(x.dtype),
                       state.params)

  @jax.jit
  def step(state, grads):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)

  state = step(state, grads)
  state = state.replace(center=rng.standard_normal(state.center.shape).astype(np.float32))
  checkpoint.save_config(path, config)
  mngr = checkpoint.manager(path)
  checkpoint.save(mngr, 1, jax.tree.map(jax.numpy.asarray, state))  # teacher = the init
  mngr.wait_until_finished()
  mngr.close()


def size(path: str) -> int:
  if os.path.isdir(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
  return os.path.getsize(path)


def max_abs_diff(a, b) -> float:
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64)
                                                        - np.asarray(y, np.float64)))), a, b)
  return max(jax.tree.leaves(diffs))


def torch_cls(fmt: str, path: str, x: np.ndarray) -> np.ndarray:
  """PyTorch's [CLS] features of the exported backbone at x's size (224: no resize)."""
  xt = torch.from_numpy(x).permute(0, 3, 1, 2)
  if fmt == "hf":
    from transformers import ViTModel  # pylint: disable=g-import-not-at-top
    model = ViTModel.from_pretrained(path, add_pooling_layer=False).eval()
    with torch.no_grad():
      return model(pixel_values=xt).last_hidden_state[:, 0].numpy()
  from timm.models.vision_transformer import VisionTransformer  # pylint: disable=g-import-not-at-top
  if fmt == "safetensors":
    from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
    sd = load_file(path)
  else:
    sd = torch.load(path, weights_only=True)
  if fmt == "full":
    sd = sd["teacher"]
  sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")} or sd
  model = VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                            num_classes=0, norm_layer=functools.partial(torch.nn.LayerNorm,
                                                                        eps=1e-6)).eval()
  model.load_state_dict(sd, strict=True)
  with torch.no_grad():
    return model(xt).numpy()


def main(argv) -> None:
  del argv
  torch.set_num_threads(1)
  tmp = tempfile.mkdtemp()
  out_dir = _OUT.value or tmp
  os.makedirs(out_dir, exist_ok=True)
  workdir = _WORKDIR.value
  if workdir is None:
    workdir = os.path.join(tmp, "workdir")
    t = time.perf_counter()
    make_workdir(workdir)
    print(f"made {workdir} in {time.perf_counter() - t:.1f} s")
  config, state, step = exporting.load_state(workdir)
  vit = build_vit(config.model.arch, config.model.patch_size)
  x = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
  ours = np.asarray(jax.jit(vit.apply)({"params": state.teacher_params["backbone"]}, x))

  results = []
  for fmt, with_head in RUNS:
    name = f"{fmt}{'+head' if with_head else ''}"
    path = os.path.join(out_dir, f"vit_small16.{name}" + ("" if fmt == "hf" else
                                                          ".safetensors" if fmt == "safetensors"
                                                          else ".pth"))
    t = time.perf_counter()
    exporting.export(workdir, path, fmt=fmt, with_head=with_head)
    export_s = time.perf_counter() - t
    imported = os.path.join(tmp, f"imported_{name}")
    shutil.rmtree(imported, ignore_errors=True)
    t = time.perf_counter()
    got = importing.import_weights(path, imported, config=None if fmt == "full" else config)
    import_s = time.perf_counter() - t
    got = jax.tree.map(np.asarray, got)
    if fmt == "full":
      param_diff = max(max_abs_diff(got.params, state.params),
                       max_abs_diff(got.teacher_params, state.teacher_params),
                       max_abs_diff(got.opt_state, state.opt_state),
                       max_abs_diff(got.center, state.center))
    else:
      net = state.teacher_params if with_head else state.teacher_params["backbone"]
      param_diff = max_abs_diff(got.teacher_params if with_head
                                else got.teacher_params["backbone"], net)
    row = {"format": name, "bytes": size(path), "MB": round(size(path) / 1e6, 1),
           "export_s": round(export_s, 2), "import_s": round(import_s, 2),
           "roundtrip_max_abs_diff": param_diff,
           "torch_cls_max_abs_diff": float(np.max(np.abs(torch_cls(fmt, path, x) - ours))),
           "cls_max_abs": float(np.max(np.abs(ours)))}
    print(json.dumps(row))
    results.append(row)
  print(json.dumps({"model": "vit_small/16", "out_dim": config.out_dim, "step": step,
                    "jax": jax.__version__, "torch": torch.__version__,
                    "host": platform.machine(), "cpus": os.cpu_count(), "results": results}))
  shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
