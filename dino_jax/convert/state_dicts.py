"""Flax params <-> PyTorch state_dicts with the release's (and timm's, torchvision's) key names and
layouts. ResNet keys: convert.resnet_keys.

Backbone keys: cls_token (1, 1, D), pos_embed (1, T, D), patch_embed.proj.{weight (D, 3, p, p),
bias}, blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight, bias},
norm.{weight, bias}. Head keys: mlp.{i}.* (linears; BatchNorm1d with running stats when the head
has BN; plain `mlp.*` for a 1-layer head) and last_layer.weight_g (K, 1) / weight_v (K, in).
PyTorch linears are (out, in), flax kernels (in, out); the patch conv is (D, 3, p, p) in PyTorch
and (p, p, 3, D) in flax. The qkv rows (q, k, v; heads contiguous) need only a transpose.

Every conversion is a transpose or a copy, so round trips are bitwise. torch_to_flax also reads
transformers.ViTModel names (convert.hf). The key tables and layouts (Entry, spec_from_params,
to_torch_layout, ...) are shared with convert.optimizer.
"""
from __future__ import annotations

import importlib
import re
from typing import Any, Mapping

import numpy as np

from dino_jax.convert.entries import Entry, batchnorm as _batchnorm, layernorm as _layernorm
from dino_jax.convert.entries import linear as _linear
from dino_jax.convert.hf import hf_to_release
from dino_jax.convert.resnet_keys import resnet_spec, resnet_torch_shapes, stages_of

# ----------------------------------------------------------------------------------------------
# Key tables.
# ----------------------------------------------------------------------------------------------


def _backbone_spec(depth: int) -> list[Entry]:
  """The release's state_dict order (also its named_parameters order)."""
  spec = [Entry("cls_token", ("cls_token",), "same", "params"),
          Entry("pos_embed", ("pos_embed",), "same", "params"),
          Entry("patch_embed.proj.weight", ("patch_embed", "kernel"), "conv", "params"),
          Entry("patch_embed.proj.bias", ("patch_embed", "bias"), "same", "params")]
  for i in range(depth):
    t, f = f"blocks.{i}", (f"blocks_{i}",)
    spec += (_layernorm(f"{t}.norm1", f + ("norm1",))
             + _linear(f"{t}.attn.qkv", f + ("attn", "qkv"))
             + _linear(f"{t}.attn.proj", f + ("attn", "proj"))
             + _layernorm(f"{t}.norm2", f + ("norm2",))
             + _linear(f"{t}.mlp.fc1", f + ("mlp", "fc1"))
             + _linear(f"{t}.mlp.fc2", f + ("mlp", "fc2")))
  return spec + _layernorm("norm", ("norm",))


def _head_spec(layers: list[tuple[int, str]]) -> list[Entry]:
  """layers: (index in the release's nn.Sequential, 'linear' | 'bn'), in order."""
  spec = []
  single = layers == [(0, "linear")]  # nlayers=1: the release's mlp is a bare nn.Linear
  for i, kind in layers:
    key = "mlp" if single else f"mlp.{i}"
    spec += (_linear if kind == "linear" else _batchnorm)(key, (f"mlp_{i}",))
  return spec + [Entry("last_layer.weight_g", ("last_layer", "kernel_g"), "T", "params"),
                 Entry("last_layer.weight_v", ("last_layer", "kernel_v"), "T", "params")]


def spec_from_params(params: Mapping[str, Any]) -> list[Entry]:
  """The key table of a flax backbone or head tree, in the release's state_dict order."""
  if "layer1_0" in params:
    return resnet_spec(stages_of(params))
  if "cls_token" in params:
    depth = sum(1 for k in params if re.fullmatch(r"blocks_\d+", k))
    return _backbone_spec(depth)
  if "last_layer" in params:
    idx = sorted(int(k[4:]) for k in params if re.fullmatch(r"mlp_\d+", k))
    return _head_spec([(i, "linear" if "kernel" in params[f"mlp_{i}"] else "bn") for i in idx])
  raise ValueError(f"neither a ViT backbone (cls_token, ...), a ResNet (conv1, layer1_0, ...) nor "
                   f"a DINO head (last_layer, ...): top-level keys {sorted(params)}")


def _spec_from_keys(keys: list[str], kind: str) -> list[Entry]:
  """The key table a torch backbone / head state_dict with these keys should follow."""
  if kind == "resnet":
    return resnet_spec(stages_of(keys))
  if kind == "backbone":
    blocks = [int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))]
    return _backbone_spec(max(blocks) + 1 if blocks else 0)
  if "mlp.weight" in keys:
    return _head_spec([(0, "linear")])
  layers = {}
  for k in keys:
    if m := re.match(r"mlp\.(\d+)\.(\w+)$", k):
      i = int(m.group(1))
      layers[i] = "bn" if m.group(2) == "running_mean" or layers.get(i) == "bn" else "linear"
  return _head_spec(sorted(layers.items()))


# ----------------------------------------------------------------------------------------------
# Layouts and helpers.
# ----------------------------------------------------------------------------------------------
def to_torch_layout(x: np.ndarray, layout: str) -> np.ndarray:
  """A flax array in an Entry's layout -> PyTorch's (contiguous)."""
  if layout == "T":
    return np.ascontiguousarray(x.T)
  if layout == "conv":
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
  return np.ascontiguousarray(x)


def to_flax_layout(x: np.ndarray, layout: str) -> np.ndarray:
  """A PyTorch array in an Entry's layout -> flax's (contiguous)."""
  if layout == "T":
    return np.ascontiguousarray(x.T)
  if layout == "conv":
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
  return np.ascontiguousarray(x)


def torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  """The PyTorch shape of a flax shape in an Entry's layout."""
  if layout == "T":
    return tuple(reversed(shape))
  if layout == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


_EXTRAS = {"torch": ("PyTorch weight exchange", "torch safetensors"),  # extra: (for, packages)
           "onnx": ("ONNX export", "torch safetensors transformers onnx onnxscript onnxruntime")}


def torch_extra(module: str, extra: str = "torch") -> Any:
  """Imports a module of an extra (_EXTRAS), or says in one line how to install it."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    what, packages = _EXTRAS[extra]
    raise ImportError(f"{module} is not installed: {what} needs the '{extra}' extra "
                      f"(pip install -e '.[{extra}]', or pip install {packages})") from e


def to_numpy(x: Any) -> np.ndarray:
  """A torch tensor (any device, bf16 included, bits kept), jax array or array-like -> numpy."""
  if hasattr(x, "detach"):  # torch.Tensor, without importing torch
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      import ml_dtypes  # pylint: disable=g-import-not-at-top
      import torch  # pylint: disable=g-import-not-at-top
      return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()
  return np.asarray(x)


def shape_of(x: Any) -> tuple[int, ...]:
  """Shape of an array, a jax.ShapeDtypeStruct or an array-like."""
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  """tree[path[0]][path[1]]...; None where a key is missing."""
  for k in path:
    if not isinstance(tree, Mapping) or k not in tree:
      return None
    tree = tree[k]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _flat_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
  out = []
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out += _flat_paths(v, prefix + (k,))
    else:
      out.append(prefix + (k,))
  return out


def fmt_shape(shape: Any) -> str:
  """A shape as error messages print it: '(48, 3, 16, 16)'."""
  return str(tuple(int(s) for s in shape))


def _raise(problems: list[str], what: str) -> None:
  if problems:
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    raise ValueError(f"{what}:\n  " + "\n  ".join(shown))


# ----------------------------------------------------------------------------------------------
# Flax -> torch.
# ----------------------------------------------------------------------------------------------
def flax_to_torch(params: Mapping[str, Any], batch_stats: Mapping[str, Any] | None = None, *,
                  prefix: str = "", num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
  """Flax params -> a PyTorch state_dict (numpy arrays) with the release's names and layouts.

  Args:
    params: a VisionTransformer's params, a ResNet's, a DINOHead's, or a MultiCropWrapper's
      {'backbone': ..., 'head': ...} (keys then start with 'backbone.' / 'head.', the layout of the
      release's teacher state_dict).
    batch_stats: the BatchNorm statistics of a head with BN ({'mlp_1': {'mean', 'var'}, ...}) or
      of a ResNet, under 'head' / 'backbone' for a wrapper; required where there is BN.
    prefix: prepended to every key (e.g. 'module.' for the release's DDP student).
    num_batches_tracked: the value of BatchNorm's num_batches_tracked buffers.
  Returns:
    {key: contiguous numpy array}, in the release's state_dict order; loads with strict=True into
    the release's / timm's VisionTransformer (num_classes=0) or the release's DINOHead.
  """
  if set(params) == {"backbone", "head"}:
    bs = batch_stats or {}
    return {**flax_to_torch(params["backbone"], bs.get("backbone"), prefix=prefix + "backbone.",
                            num_batches_tracked=num_batches_tracked),
            **flax_to_torch(params["head"], bs.get("head"), prefix=prefix + "head.",
                            num_batches_tracked=num_batches_tracked)}
  spec = spec_from_params(params)
  known = {e.path for e in spec if e.collection == "params"}
  _raise([f"{'.'.join(p)}: not a parameter of the release's modules"
          for p in _flat_paths(params) if p not in known], "unknown flax parameters")
  has_bn = any(e.collection == "batch_stats" for e in spec)
  if has_bn and batch_stats is None:
    raise ValueError("the network has BatchNorm layers: pass its batch_stats (the release's "
                     "state_dict holds running_mean / running_var)")
  out = {}
  for e in spec:
    if e.collection == "buffer":
      out[prefix + e.key] = np.asarray(num_batches_tracked, np.int64)
      continue
    x = get_path(params if e.collection == "params" else batch_stats, e.path)
    if x is None:
      raise ValueError(f"{'.'.join(e.path)} ({e.collection}) is missing: needed for {e.key}")
    out[prefix + e.key] = to_torch_layout(to_numpy(x), e.layout)
  return out


# ----------------------------------------------------------------------------------------------
# Torch -> flax.
# ----------------------------------------------------------------------------------------------
_AUTO_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
# torch.nn.utils.parametrizations.weight_norm names: original0 = g, original1 = v.
_PARAMETRIZED = {"last_layer.parametrizations.weight.original0": "last_layer.weight_g",
                 "last_layer.parametrizations.weight.original1": "last_layer.weight_v"}


_BACKBONE_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")


def _kind_of(keys: list[str]) -> str:
  if "conv1.weight" in keys or any(k.startswith("layer1.") for k in keys):
    return "resnet"
  if any(k in keys for k in _BACKBONE_KEYS) or any(k.startswith("blocks.") for k in keys):
    return "backbone"
  if any(k.startswith(("last_layer.", "mlp.")) for k in keys):
    return "head"
  more = " ..." if len(keys) > 8 else ""
  raise ValueError(f"neither a ViT backbone (cls_token, pos_embed, blocks.*), a torchvision "
                   f"ResNet (conv1.weight, layer1.*) nor a DINO head (mlp.*, last_layer.*): "
                   f"keys {sorted(keys)[:8]}{more}")


def _inferred_shapes(sd: Mapping[str, np.ndarray], spec: list[Entry], kind: str
                     ) -> dict[str, tuple[int, ...]]:
  """The torch shapes the state_dict's own anchors imply for every key (catches mixed files)."""
  shape = lambda k: tuple(sd[k].shape) if k in sd else None
  if kind == "resnet":
    return resnet_torch_shapes(stages_of(sd))
  if kind == "backbone":
    d = next((s[-1] for s in map(shape, ("cls_token", "norm.weight", "pos_embed")) if s), None)
    conv = shape("patch_embed.proj.weight")
    fc1 = shape("blocks.0.mlp.fc1.weight")
    pos = shape("pos_embed")
    if d is None:
      return {}
    h = fc1[0] if fc1 else 4 * d
    out = {"cls_token": (1, 1, d), "pos_embed": (1, pos[1] if pos else 0, d),
           "patch_embed.proj.weight": (d, 3) + (conv[2:] if conv else (0, 0)),
           "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
    dims = {"norm1": (d,), "norm2": (d,), "attn.qkv": (3 * d, d), "attn.proj": (d, d),
            "mlp.fc1": (h, d), "mlp.fc2": (d, h)}
    for e in spec:
      if m := re.match(r"blocks\.\d+\.(.+)\.(weight|bias)$", e.key):
        w = dims[m.group(1)]
        out[e.key] = w if m.group(2) == "weight" else w[:1]
    return out
  out, width = {}, None
  for e in spec:
    m = re.match(r"(.+)\.(weight|bias|running_mean|running_var|weight_g|weight_v)$", e.key)
    if e.collection == "buffer" or not m or e.key not in sd:
      continue
    got = tuple(sd[e.key].shape)
    if e.layout == "T" and m.group(2) in ("weight", "weight_v"):  # (out, in), in = previous width
      out[e.key] = got[:1] + ((width,) if width is not None else got[1:2])
      width = got[0]
      if m.group(2) == "weight_v":
        out["last_layer.weight_g"] = (got[0], 1)
    elif m.group(2) != "weight_g":
      out[e.key] = (width,) if width is not None else got
  return out


def _convert_one(sd: dict[str, np.ndarray], kind: str, target: Any, with_batch_stats: bool,
                 where: str) -> Any:
  if kind == "head":
    sd = {_PARAMETRIZED.get(k, k): v for k, v in sd.items()}
  if target is not None:
    spec = spec_from_params(target)
    expected = {e.key: torch_shape(shape_of(get_path(target, e.path if e.collection == "params"
                                                else e.path[:-1] + ("scale",))), e.layout)
                for e in spec if e.collection != "buffer"}
  else:
    spec = _spec_from_keys(list(sd), kind)
    expected = _inferred_shapes(sd, spec, kind)
  keys = {e.key for e in spec}
  _raise([f"{where}{k}: unknown key, shape {fmt_shape(sd[k].shape)} (the model has no such tensor)"
          for k in sd if k not in keys], "state_dict keys the model does not have")
  _raise([f"{where}{e.key}: missing" + (f", the model expects shape {fmt_shape(expected[e.key])}"
                                        if e.key in expected else "")
          for e in spec if e.key not in sd], "state_dict keys missing")
  problems = [f"{where}{k}: shape {fmt_shape(sd[k].shape)} in the state_dict, the model expects "
              f"{fmt_shape(s)}" for k, s in expected.items() if tuple(sd[k].shape) != tuple(s)]
  if kind == "backbone" and target is None and "pos_embed" in sd:
    n = sd["pos_embed"].shape[1] - 1
    if int(round(n ** 0.5)) ** 2 != n:
      problems.append(f"{where}pos_embed: shape {fmt_shape(sd['pos_embed'].shape)} holds {n} patch "
                      "positions, not a square grid")
  _raise(problems, "state_dict shapes do not fit")
  params, stats = {}, {}
  for e in spec:
    if e.collection != "buffer":
      _set(params if e.collection == "params" else stats, e.path,
           to_flax_layout(sd[e.key], e.layout))
  return (params, stats) if with_batch_stats else params


def strip_prefix(state_dict: Mapping[str, Any], prefix: str | None = None) -> dict[str, Any]:
  """Keys starting with `prefix`, with it removed; prefix None strips 'module.' / '_orig_mod.'."""
  if prefix is not None:
    out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
      raise ValueError(f"no key starts with prefix {prefix!r}; keys: {sorted(state_dict)[:8]}")
    return out
  out = dict(state_dict)
  for p in _AUTO_PREFIXES:
    if out and all(k.startswith(p) for k in out):
      out = {k[len(p):]: v for k, v in out.items()}
  return out


def torch_to_flax(state_dict: Mapping[str, Any], *, prefix: str | None = None, target: Any = None,
                  with_batch_stats: bool = False) -> Any:
  """A PyTorch state_dict (torch tensors or numpy arrays) -> flax params (numpy arrays).

  Holds a backbone (release / timm names, or transformers.ViTModel names), a head, or both (keys
  'backbone.*' and 'head.*', as the release's MultiCropWrapper: returns {'backbone', 'head'}); told
  apart by the keys.

  Args:
    state_dict: {key: tensor}.
    prefix: keep only the keys starting with it, and strip it (e.g. 'module.backbone.'). None: strip
      'module.' (DDP) and '_orig_mod.' (torch.compile) when every key has them.
    target: optional params tree (arrays or jax.ShapeDtypeStruct, e.g. from jax.eval_shape) of the
      model that will use the weights; keys and shapes are checked against it. Without it they are
      checked against the state_dict's own width, patch size, depth and head dims.
    with_batch_stats: return (params, batch_stats): the running statistics of a BatchNorm head
      ({'mlp_1': {'mean', 'var'}, ...}) or ResNet, under 'head' / 'backbone' for both networks
      (only those with BN); {} without BN. Without
      it they are left out (num_batches_tracked always is: flax keeps no such count).
  Raises:
    ValueError naming each unknown key, missing key, and key whose shape differs (with both shapes).
  """
  sd = strip_prefix(state_dict, prefix)
  not_tensors = [k for k, v in sd.items() if not hasattr(v, "shape")]
  if not_tensors:
    raise ValueError(f"not a state_dict: {not_tensors[:6]} hold no tensors (a training checkpoint? "
                     "pass one of its networks, e.g. checkpoint['teacher'])")
  sd = {k: to_numpy(v) for k, v in sd.items()}
  if any(re.match(r"(vit\.)?(embeddings|encoder\.layer|layers|layernorm)\.", k) for k in sd):
    sd = hf_to_release(sd)
  if prefix is None and sd and all(k.startswith(("backbone.", "head.")) for k in sd):
    parts = {p: strip_prefix(sd, p + ".") for p in ("backbone", "head")
             if any(k.startswith(p + ".") for k in sd)}
    if len(parts) == 1:  # a lone 'backbone.' or 'head.' prefix is stripped
      (name, part), = parts.items()
      return _convert_one(part, _kind_of(list(part)), target, with_batch_stats, f"{name}.")
    out = {p: _convert_one(v, _kind_of(list(v)) if p == "backbone" else p,
                           None if target is None else target[p], True, f"{p}.")
           for p, v in parts.items()}
    if not with_batch_stats:
      return {p: v[0] for p, v in out.items()}
    # Statistics only where there is BatchNorm: a ViT's state has none for its backbone.
    return {p: v[0] for p, v in out.items()}, {p: v[1] for p, v in out.items() if v[1]}
  return _convert_one(sd, _kind_of(list(sd)), target, with_batch_stats, "")
