"""A dino_jax workdir -> the files PyTorch users exchange (`python -m dino_jax.export_torch`).

Formats (FORMATS): 'pth' (the backbone state_dict with the release's key names; with_head: the
release's MultiCropWrapper layout, 'backbone.*' and 'head.*'), 'safetensors' (the same tensors;
metadata: arch, patch size, heads, step), 'hf' (a transformers.ViTModel directory in the Hub's
layout: config.json, model.safetensors, preprocessor_config.json; backbone only), 'onnx' (the
backbone's graph with a dynamic batch axis, convert.onnx_export) and 'full' (the release's full
training checkpoint: both networks, the AdamW state, 'epoch', 'args', 'dino_loss'). The
export_torch module docstring says what each loads into.

The workdir and the output may be URIs (gs://bucket/...): files are serialised in memory and
written (metrics.jsonl read) through dino_jax.paths.
"""
from __future__ import annotations

import io
import json
import tempfile
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from absl import logging

from dino_jax import checkpoint
from dino_jax import paths
from dino_jax import state as state_lib
from dino_jax.convert import files, hf, onnx_export, optimizer
from dino_jax.convert.state_dicts import flax_to_torch, torch_extra
from dino_jax.models import build_models
from dino_jax.models.resnet import STAGES

FORMATS = ("pth", "safetensors", "hf", "onnx", "full")


def load_state(workdir: str, step: int | None = None) -> tuple[Any, Any, int]:
  """(config, TrainState of host numpy arrays, step) of a workdir's latest (or given) checkpoint."""
  config = checkpoint.load_config(workdir)
  abstract = state_lib.abstract_state(config)
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), abstract)
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    restored = checkpoint.restore(mngr, target, step=step)
  finally:
    mngr.close()
  if restored is None:
    raise FileNotFoundError(f"no readable checkpoint in {workdir}/checkpoints")
  step, state = restored
  return config, jax.tree.map(np.asarray, state), step


def backbone_shape(config: mlc.ConfigDict) -> dict[str, int]:
  """embed_dim, depth, num_heads, mlp_dim, patch_size, img_size of the config's ViT."""
  vit = build_models(config)[0].backbone
  return dict(embed_dim=vit.embed_dim, depth=vit.depth, num_heads=vit.num_heads,
              mlp_dim=int(vit.embed_dim * vit.mlp_ratio), patch_size=vit.patch_size,
              img_size=vit.img_size)


def _completed_epochs(workdir: str, config: mlc.ConfigDict, step: int) -> int:
  """Epochs done at `step` (the release's 'epoch'): by config.steps_per_epoch, else the trainer's
  metrics.jsonl; 0 when neither tells."""
  per_epoch = config.steps_per_epoch
  path = paths.path(workdir) / "metrics.jsonl"
  if not per_epoch and path.exists():  # the trainer logs epoch = step / steps_per_epoch
    rows = [json.loads(r) for r in path.read_text().splitlines() if r.strip()]
    rows = [r for r in rows if r.get("epoch")]
    if rows:
      per_epoch = round(rows[-1]["step"] / rows[-1]["epoch"])
  return step // per_epoch if per_epoch else 0


def _tensors(tree: Any) -> Any:
  torch = torch_extra("torch")
  return jax.tree.map(lambda x: torch.from_numpy(np.array(x)), tree)


def _torch_save(obj: Any, output: str) -> None:
  """torch.save(obj) at output (a local path or a URI)."""
  buf = io.BytesIO()
  torch_extra("torch").save(obj, buf)
  paths.write_bytes(output, buf.getvalue())


def _safetensors_save(sd: dict[str, np.ndarray], output: str, metadata: dict[str, str]) -> None:
  """A safetensors file of sd (name -> array) at output (a local path or a URI)."""
  paths.write_bytes(output, torch_extra("safetensors.numpy").save(sd, metadata=metadata))


def _hf_save(sd: dict[str, np.ndarray], shape: dict[str, int], output: str
             ) -> dict[str, np.ndarray]:
  """The hf directory at output (config.json, model.safetensors, preprocessor_config.json) of a
  backbone state_dict with the release's names; returns its state_dict (transformers' names)."""
  out_dir = paths.path(output)
  paths.write_json(out_dir / "config.json", hf.hf_config(**shape))
  paths.write_json(out_dir / "preprocessor_config.json", hf.preprocessor_config(shape["img_size"]))
  sd = hf.release_to_hf(sd)
  _safetensors_save(sd, out_dir / "model.safetensors", {"format": "pt"})
  return sd


def export(workdir: str, output: str, *, which: str = "teacher", with_head: bool = False,
           fmt: str = "pth", step: int | None = None) -> dict[str, Any]:
  """Writes `output` in format `fmt`; returns {'path', 'format', 'step', 'keys'}."""
  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r}: expected one of {FORMATS}")
  if which not in ("teacher", "student"):
    raise ValueError(f"which={which!r}: expected 'teacher' or 'student'")
  if fmt in ("hf", "onnx") and with_head:
    raise ValueError(f"--format {fmt} holds the backbone only (transformers.ViTModel has no DINO "
                     "head); export the head with --format pth or safetensors --with_head")
  paths.check(output)
  config, state, step = load_state(workdir, step)
  resnet = config.model.arch in STAGES
  if resnet and fmt in ("hf", "onnx"):
    raise ValueError(f"--format {fmt} is a transformers.ViTModel; a {config.model.arch} exports as "
                     "pth or safetensors (torchvision's names)")
  if fmt == "full" and config.optimizer != "adamw":
    raise ValueError(f"--format full holds the release's AdamW state; this run's optimizer is "
                     f"{config.optimizer!r}: export the networks with pth --with_head")
  shape = None if resnet else backbone_shape(config)
  if fmt == "full":
    torch = torch_extra("torch")
    bn = config.model.use_bn_in_head
    obj = {
        "student": _tensors(flax_to_torch(state.params, state.batch_stats, prefix="module.",
                                          num_batches_tracked=step)),
        # The release wraps the teacher in DDP only when the head has BatchNorm.
        "teacher": _tensors(flax_to_torch(state.teacher_params, state.teacher_batch_stats,
                                          prefix="module." if bn else "",
                                          num_batches_tracked=step)),
        "optimizer": optimizer.optimizer_to_torch(state.opt_state, state.params,
                                                  norm_last_layer=config.model.norm_last_layer),
        "epoch": _completed_epochs(workdir, config, step),
        "args": files.release_args(config),
        "dino_loss": {"center": torch.from_numpy(np.array(state.center))},
    }
    _torch_save(obj, output)
    keys = list(obj)
  else:
    params = state.teacher_params if which == "teacher" else state.params
    stats = state.teacher_batch_stats if which == "teacher" else state.batch_stats
    if with_head:
      sd = flax_to_torch(params, stats, num_batches_tracked=step)
    else:  # a ResNet's BatchNorm statistics are part of its backbone
      sd = flax_to_torch(params["backbone"], stats.get("backbone"), num_batches_tracked=step)
    if fmt == "pth":
      _torch_save(_tensors(sd), output)
    elif fmt == "safetensors":
      vit = {"patch_size": str(shape["patch_size"]), "num_heads": str(shape["num_heads"])
             } if shape else {}
      meta = {"format": "pt", "arch": config.model.arch, **vit, "which": which, "step": str(step)}
      _safetensors_save(sd, output, meta)
    elif fmt == "onnx":  # through the hf directory's ViTModel
      with tempfile.TemporaryDirectory() as hf_dir:
        _hf_save(sd, shape, hf_dir)
        paths.write_bytes(output, onnx_export.backbone_onnx(hf_dir))
    else:
      sd = _hf_save(sd, shape, output)
    keys = list(sd)
  logging.info("wrote %s (%s, %s, step %d)", output, fmt, "full" if fmt == "full" else which, step)
  return {"path": output, "format": fmt, "step": step, "keys": keys}
