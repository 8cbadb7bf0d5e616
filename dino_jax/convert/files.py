"""What PyTorch DINO files hold: reading them, and the release's training `args`.

Read without executing code: .pth / .pt files with torch.load(weights_only=True) (the release's
argparse.Namespace `args` allowed), .safetensors files with safetensors, and transformers.ViTModel
directories (config.json + model.safetensors or pytorch_model.bin). A full training checkpoint
(the release's main_dino.py) holds 'student', 'teacher', 'optimizer', 'epoch', 'args' and
'dino_loss'; its `args` are main_dino.py's arguments, some of which config shares
(RELEASE_ARGS, RELEASE_MODEL_ARGS): release_args writes them for export, apply_release_args
reads them back for import.

A path may be a URI (gs://bucket/...): its bytes are read through dino_jax.paths and loaded from
memory; local files are loaded from their path (no second copy in memory).
"""
from __future__ import annotations

import argparse
import io
import json
import struct
from typing import Any

import ml_collections as mlc

from dino_jax import config as config_lib
from dino_jax import paths
from dino_jax.convert import hf
from dino_jax.convert.state_dicts import torch_extra

# Config keys with the same name and meaning as the release's main_dino.py arguments.
RELEASE_ARGS = ("out_dim", "momentum_teacher", "teacher_temp", "warmup_teacher_temp",
                "warmup_teacher_temp_epochs", "weight_decay", "weight_decay_end", "clip_grad",
                "epochs", "freeze_last_layer", "lr", "warmup_epochs", "min_lr", "optimizer",
                "local_crops_number", "global_crops_scale", "local_crops_scale", "seed")
RELEASE_MODEL_ARGS = ("arch", "patch_size", "norm_last_layer", "use_bn_in_head", "drop_path_rate")


# ----------------------------------------------------------------------------------------------
# Reading files.
# ----------------------------------------------------------------------------------------------
def _unreadable(path: str, e: Exception) -> ValueError:
  first_line = (str(e).splitlines() or [""])[0]
  return ValueError(f"cannot read {path}: {type(e).__name__}: {first_line} (truncated or corrupt, "
                    "or not a PyTorch / safetensors file?)")


def _safetensors_bytes(data: bytes) -> tuple[dict[str, Any], dict[str, str]]:
  """(name -> torch tensor, metadata) of a safetensors file's bytes."""
  n = struct.unpack("<Q", data[:8])[0]  # the format: u64 header length, JSON header, tensors
  meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
  return torch_extra("safetensors.torch").load(data), meta


def load_file(path: str) -> tuple[Any, dict[str, Any]]:
  """(the stored object, info): a .pth/.pt file's dict, a safetensors file's or an hf directory's
  state_dict. info: what the file says of the architecture (hf config, safetensors metadata)."""
  torch = torch_extra("torch")
  paths.check(path)
  p = paths.path(path)
  if not p.exists():
    raise FileNotFoundError(f"{path} does not exist")
  if p.is_dir():
    cfg_path = p / "config.json"
    if not cfg_path.exists():
      raise FileNotFoundError(f"{path} is a directory without config.json: not a transformers "
                              "model")
    cfg = json.loads(cfg_path.read_text())
    for name in ("model.safetensors", "pytorch_model.bin"):
      if (p / name).exists():
        obj, _ = load_file(f"{str(path).rstrip('/')}/{name}")
        break
    else:
      raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
    # The pooler (ViTModel's default add_pooling_layer) has no DINO counterpart.
    obj = {k: v for k, v in obj.items() if not k.startswith(("pooler.", "vit.pooler."))}
    info = {"num_heads": cfg.get("num_attention_heads")}
    hf.check_config(cfg, str(cfg_path))
    return obj, info
  if str(path).endswith(".safetensors"):
    try:
      if paths.is_uri(path):
        obj, meta = _safetensors_bytes(p.read_bytes())
      else:
        with torch_extra("safetensors").safe_open(path, "pt") as f:
          meta = f.metadata() or {}
          obj = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # pylint: disable=broad-except
      raise _unreadable(path, e) from e
    info = {"num_heads": int(meta["num_heads"])} if "num_heads" in meta else {}
    return obj, info
  source = io.BytesIO(p.read_bytes()) if paths.is_uri(path) else path
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):  # the release's `args`
      obj = torch.load(source, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(path, e) from e
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict or checkpoint dict")
  return obj, {}


def is_full_checkpoint(obj: dict[str, Any]) -> bool:
  """Whether load_file's object is the release's full training checkpoint."""
  return any(isinstance(obj.get(k), dict) for k in ("teacher", "student"))


def state_dict_in(obj: dict[str, Any], path: str) -> dict[str, Any]:
  """The state_dict inside a non-full checkpoint ('state_dict' / 'model' wrappers unwrapped)."""
  if all(hasattr(v, "shape") for v in obj.values()):
    return obj
  for key in ("state_dict", "model"):
    if isinstance(obj.get(key), dict):
      return obj[key]
  raise ValueError(f"{path}: top-level keys {sorted(obj)[:10]} are neither a state_dict nor the "
                   "release's checkpoint ('student' / 'teacher')")


# ----------------------------------------------------------------------------------------------
# The release's `args`.
# ----------------------------------------------------------------------------------------------
def release_args(config: mlc.ConfigDict) -> dict[str, Any]:
  """The release's `args`, as a plain dict (loads with torch.load(weights_only=True))."""
  args = {k: config[k] for k in RELEASE_ARGS}
  args.update({k: config.model[k] for k in RELEASE_MODEL_ARGS})
  args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
  args["use_fp16"] = False
  args["dino_jax_config"] = config_lib.to_json(config)
  return args


def args_dict(args: Any) -> dict[str, Any]:
  """A checkpoint's `args` (an argparse.Namespace, a dict or None) as a dict."""
  return dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args or {})


def apply_release_args(config: mlc.ConfigDict, args: dict[str, Any]) -> mlc.ConfigDict:
  """The release's main_dino.py arguments that config shares, written over it; dino_jax's own
  config when it wrote the file ('dino_jax_config')."""
  if "dino_jax_config" in args:
    return config_lib.from_json(args["dino_jax_config"])
  for key in RELEASE_ARGS + ("drop_path_rate", "norm_last_layer", "use_bn_in_head"):
    if key in args:
      where = config.model if key in config.model else config
      old = where[key]
      value = args[key]
      where[key] = tuple(value) if isinstance(old, tuple) else type(old)(value)
  if "batch_size_per_gpu" in args and "world_size" in args:
    config.batch_size = int(args["batch_size_per_gpu"]) * int(args["world_size"])
  return config
