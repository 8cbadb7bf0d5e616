"""Flax params <-> PyTorch state_dicts with the release's (and timm's) key names and layouts.

Backbone keys: cls_token (1, 1, D), pos_embed (1, T, D), patch_embed.proj.{weight (D, 3, p, p),
bias}, blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight, bias},
norm.{weight, bias}. Head keys: mlp.{i}.* (linears; BatchNorm1d with running stats when the head
has BN; plain `mlp.*` for a 1-layer head) and last_layer.weight_g (K, 1) / weight_v (K, in).
PyTorch linears are (out, in), flax kernels (in, out); the patch conv is (D, 3, p, p) in PyTorch
and (p, p, 3, D) in flax. The qkv rows (q, k, v; heads contiguous) need only a transpose.

Also here: the Hugging Face `transformers.ViTModel` names (`release_to_hf` / `hf_to_release`) and
the release's AdamW state (`optimizer_to_torch` / `optimizer_from_torch`) for full training
checkpoints. Every conversion is a transpose or a copy, so round trips are bitwise.
"""
from __future__ import annotations

import importlib
import re
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
import optax

# ----------------------------------------------------------------------------------------------
# Key tables.
# ----------------------------------------------------------------------------------------------


class _Entry(NamedTuple):
  key: str  # torch key (without prefix)
  path: tuple[str, ...] | None  # flax path (None: a torch-only buffer, num_batches_tracked)
  layout: str  # 'same' | 'T' (2-D transpose) | 'conv' (OIHW <-> HWIO)
  collection: str  # 'params' | 'batch_stats' | 'buffer'


def _linear(key: str, path: tuple[str, ...]) -> list[_Entry]:
  return [_Entry(f"{key}.weight", path + ("kernel",), "T", "params"),
          _Entry(f"{key}.bias", path + ("bias",), "same", "params")]


def _layernorm(key: str, path: tuple[str, ...]) -> list[_Entry]:
  return [_Entry(f"{key}.weight", path + ("scale",), "same", "params"),
          _Entry(f"{key}.bias", path + ("bias",), "same", "params")]


def _batchnorm(key: str, path: tuple[str, ...]) -> list[_Entry]:
  return _layernorm(key, path) + [
      _Entry(f"{key}.running_mean", path + ("mean",), "same", "batch_stats"),
      _Entry(f"{key}.running_var", path + ("var",), "same", "batch_stats"),
      _Entry(f"{key}.num_batches_tracked", None, "same", "buffer")]


def _backbone_spec(depth: int) -> list[_Entry]:
  """The release's state_dict order (also its named_parameters order)."""
  spec = [_Entry("cls_token", ("cls_token",), "same", "params"),
          _Entry("pos_embed", ("pos_embed",), "same", "params"),
          _Entry("patch_embed.proj.weight", ("patch_embed", "kernel"), "conv", "params"),
          _Entry("patch_embed.proj.bias", ("patch_embed", "bias"), "same", "params")]
  for i in range(depth):
    t, f = f"blocks.{i}", (f"blocks_{i}",)
    spec += (_layernorm(f"{t}.norm1", f + ("norm1",))
             + _linear(f"{t}.attn.qkv", f + ("attn", "qkv"))
             + _linear(f"{t}.attn.proj", f + ("attn", "proj"))
             + _layernorm(f"{t}.norm2", f + ("norm2",))
             + _linear(f"{t}.mlp.fc1", f + ("mlp", "fc1"))
             + _linear(f"{t}.mlp.fc2", f + ("mlp", "fc2")))
  return spec + _layernorm("norm", ("norm",))


def _head_spec(layers: list[tuple[int, str]]) -> list[_Entry]:
  """layers: (index in the release's nn.Sequential, 'linear' | 'bn'), in order."""
  spec = []
  single = layers == [(0, "linear")]  # nlayers=1: the release's mlp is a bare nn.Linear
  for i, kind in layers:
    key = "mlp" if single else f"mlp.{i}"
    spec += (_linear if kind == "linear" else _batchnorm)(key, (f"mlp_{i}",))
  return spec + [_Entry("last_layer.weight_g", ("last_layer", "kernel_g"), "T", "params"),
                 _Entry("last_layer.weight_v", ("last_layer", "kernel_v"), "T", "params")]


def _spec_from_params(params: Mapping[str, Any]) -> list[_Entry]:
  """The key table of a flax backbone or head tree."""
  if "cls_token" in params:
    depth = sum(1 for k in params if re.fullmatch(r"blocks_\d+", k))
    return _backbone_spec(depth)
  if "last_layer" in params:
    idx = sorted(int(k[4:]) for k in params if re.fullmatch(r"mlp_\d+", k))
    return _head_spec([(i, "linear" if "kernel" in params[f"mlp_{i}"] else "bn") for i in idx])
  raise ValueError(f"neither a ViT backbone (cls_token, ...) nor a DINO head (last_layer, ...): "
                   f"top-level keys {sorted(params)}")


def _spec_from_keys(keys: list[str], kind: str) -> list[_Entry]:
  """The key table a torch backbone / head state_dict with these keys should follow."""
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
def _to_torch_layout(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "T":
    return np.ascontiguousarray(x.T)
  if layout == "conv":
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
  return np.ascontiguousarray(x)


def _to_flax_layout(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "T":
    return np.ascontiguousarray(x.T)
  if layout == "conv":
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
  return np.ascontiguousarray(x)


def _torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  if layout == "T":
    return tuple(reversed(shape))
  if layout == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def torch_extra(module: str) -> Any:
  """Imports a module of the 'torch' extra (torch, safetensors), or says how to install it."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(f"{module} is not installed: PyTorch weight exchange needs the 'torch' "
                      "extra (pip install -e '.[torch]', or pip install torch safetensors)") from e


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


def _shape(x: Any) -> tuple[int, ...]:
  """Shape of an array, a jax.ShapeDtypeStruct or an array-like."""
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
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


def _fmt(shape) -> str:
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
    params: a VisionTransformer's params, a DINOHead's, or a MultiCropWrapper's
      {'backbone': ..., 'head': ...} (keys then start with 'backbone.' / 'head.', the layout of the
      release's teacher state_dict).
    batch_stats: the BatchNorm statistics of a head with BN ({'mlp_1': {'mean', 'var'}, ...}, under
      'head' for a wrapper); required when the head has BN layers.
    prefix: prepended to every key (e.g. 'module.' for the release's DDP student).
    num_batches_tracked: the value of BatchNorm's num_batches_tracked buffers.
  Returns:
    {key: contiguous numpy array}, in the release's state_dict order; loads with strict=True into
    the release's / timm's VisionTransformer (num_classes=0) or the release's DINOHead.
  """
  if set(params) == {"backbone", "head"}:
    bs = (batch_stats or {}).get("head")
    return {**flax_to_torch(params["backbone"], prefix=prefix + "backbone."),
            **flax_to_torch(params["head"], bs, prefix=prefix + "head.",
                            num_batches_tracked=num_batches_tracked)}
  spec = _spec_from_params(params)
  known = {e.path for e in spec if e.collection == "params"}
  _raise([f"{'.'.join(p)}: not a parameter of the release's modules"
          for p in _flat_paths(params) if p not in known], "unknown flax parameters")
  has_bn = any(e.collection == "batch_stats" for e in spec)
  if has_bn and batch_stats is None:
    raise ValueError("the head has BatchNorm layers: pass its batch_stats (the release's "
                     "state_dict holds running_mean / running_var)")
  out = {}
  for e in spec:
    if e.collection == "buffer":
      out[prefix + e.key] = np.asarray(num_batches_tracked, np.int64)
      continue
    x = _get(params if e.collection == "params" else batch_stats, e.path)
    if x is None:
      raise ValueError(f"{'.'.join(e.path)} ({e.collection}) is missing: needed for {e.key}")
    out[prefix + e.key] = _to_torch_layout(to_numpy(x), e.layout)
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
  if any(k in keys for k in _BACKBONE_KEYS) or any(k.startswith("blocks.") for k in keys):
    return "backbone"
  if any(k.startswith(("last_layer.", "mlp.")) for k in keys):
    return "head"
  more = " ..." if len(keys) > 8 else ""
  raise ValueError(f"neither a ViT backbone (cls_token, pos_embed, blocks.*) nor a DINO head "
                   f"(mlp.*, last_layer.*): keys {sorted(keys)[:8]}{more}")


def _inferred_shapes(sd: Mapping[str, np.ndarray], spec: list[_Entry], kind: str
                     ) -> dict[str, tuple[int, ...]]:
  """The torch shapes the state_dict's own anchors imply for every key (catches mixed files)."""
  shape = lambda k: tuple(sd[k].shape) if k in sd else None
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
    spec = _spec_from_params(target)
    expected = {e.key: _torch_shape(_shape(_get(target, e.path if e.collection == "params"
                                                else e.path[:-1] + ("scale",))), e.layout)
                for e in spec if e.collection != "buffer"}
  else:
    spec = _spec_from_keys(list(sd), kind)
    expected = _inferred_shapes(sd, spec, kind)
  keys = {e.key for e in spec}
  _raise([f"{where}{k}: unknown key, shape {_fmt(sd[k].shape)} (the model has no such tensor)"
          for k in sd if k not in keys], "state_dict keys the model does not have")
  _raise([f"{where}{e.key}: missing" + (f", the model expects shape {_fmt(expected[e.key])}"
                                        if e.key in expected else "")
          for e in spec if e.key not in sd], "state_dict keys missing")
  problems = [f"{where}{k}: shape {_fmt(sd[k].shape)} in the state_dict, the model expects "
              f"{_fmt(s)}" for k, s in expected.items() if tuple(sd[k].shape) != tuple(s)]
  if kind == "backbone" and target is None and "pos_embed" in sd:
    n = sd["pos_embed"].shape[1] - 1
    if int(round(n ** 0.5)) ** 2 != n:
      problems.append(f"{where}pos_embed: shape {_fmt(sd['pos_embed'].shape)} holds {n} patch "
                      "positions, not a square grid")
  _raise(problems, "state_dict shapes do not fit")
  params, stats = {}, {}
  for e in spec:
    if e.collection != "buffer":
      _set(params if e.collection == "params" else stats, e.path,
           _to_flax_layout(sd[e.key], e.layout))
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
    with_batch_stats: return (params, batch_stats): a BatchNorm head's running statistics
      ({'mlp_1': {'mean', 'var'}, ...}, under 'head' for both networks; {} without BN). Without
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
    out = {p: _convert_one(v, p, None if target is None else target[p],
                           with_batch_stats and p == "head", f"{p}.") for p, v in parts.items()}
    if not with_batch_stats:
      return out
    return {"backbone": out["backbone"], "head": out["head"][0]}, {"head": out["head"][1]}
  return _convert_one(sd, _kind_of(list(sd)), target, with_batch_stats, "")


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers.ViTModel names.
# ----------------------------------------------------------------------------------------------
# The names of transformers 4.x and of the Hub's ViT checkpoints (transformers 5 renames them on
# load); hf_to_release also reads transformers 5's own names.
_HF_BLOCK = [("norm1", "layernorm_before"), ("attn.proj", "attention.output.dense"),
             ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"),
             ("mlp.fc2", "output.dense")]
_HF5_BLOCK = {"attention.q_proj": "attention.attention.query",
              "attention.k_proj": "attention.attention.key",
              "attention.v_proj": "attention.attention.value",
              "attention.o_proj": "attention.output.dense",
              "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}


def release_to_hf(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Release backbone names -> transformers.ViTModel's (qkv split into query / key / value)."""
  sd = dict(state_dict)
  out = {"embeddings.cls_token": sd.pop("cls_token"),
         "embeddings.position_embeddings": sd.pop("pos_embed"),
         "embeddings.patch_embeddings.projection.weight": sd.pop("patch_embed.proj.weight"),
         "embeddings.patch_embeddings.projection.bias": sd.pop("patch_embed.proj.bias")}
  depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
  for i in range(depth):
    b, h = f"blocks.{i}.", f"encoder.layer.{i}."
    for part in ("weight", "bias"):
      q, k, v = np.split(sd.pop(f"{b}attn.qkv.{part}"), 3, axis=0)
      for name, x in (("query", q), ("key", k), ("value", v)):
        out[f"{h}attention.attention.{name}.{part}"] = np.ascontiguousarray(x)
    for ours, theirs in _HF_BLOCK:
      for part in ("weight", "bias"):
        out[f"{h}{theirs}.{part}"] = sd.pop(f"{b}{ours}.{part}")
  out["layernorm.weight"] = sd.pop("norm.weight")
  out["layernorm.bias"] = sd.pop("norm.bias")
  if sd:
    raise ValueError(f"keys without a transformers.ViTModel counterpart: {sorted(sd)}")
  return out


def _hf5_to_hf4(key: str) -> str:
  m = re.match(r"layers\.(\d+)\.(.+)\.(weight|bias)$", key)
  if not m:
    return key
  return f"encoder.layer.{m.group(1)}.{_HF5_BLOCK.get(m.group(2), m.group(2))}.{m.group(3)}"


def hf_to_release(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """transformers.ViTModel names (4.x / Hub, or 5.x; optional 'vit.' prefix) -> release names.

  Keys with no release counterpart (e.g. the pooler) are kept, so the caller reports them.
  """
  sd = {k[4:] if k.startswith("vit.") else k: v for k, v in state_dict.items()}
  sd = {_hf5_to_hf4(k): v for k, v in sd.items()}
  out = {}
  simple = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
            "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
            "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
            "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
  for k, v in sd.items():
    if k in simple:
      out[simple[k]] = v
  blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
  used = set(simple)
  for i in blocks:
    h, b = f"encoder.layer.{i}.", f"blocks.{i}."
    for part in ("weight", "bias"):
      names = [f"{h}attention.attention.{n}.{part}" for n in ("query", "key", "value")]
      if all(n in sd for n in names):
        out[f"{b}attn.qkv.{part}"] = np.concatenate([sd[n] for n in names], 0)
        used.update(names)
      for ours, theirs in _HF_BLOCK:
        if f"{h}{theirs}.{part}" in sd:
          out[f"{b}{ours}.{part}"] = sd[f"{h}{theirs}.{part}"]
          used.add(f"{h}{theirs}.{part}")
  out.update({k: v for k, v in sd.items() if k not in used})
  return out


def hf_config(*, embed_dim: int, depth: int, num_heads: int, mlp_dim: int, patch_size: int,
              img_size: int) -> dict[str, Any]:
  """config.json of a transformers.ViTModel equal to the release's ViT (exact GELU, eps 1e-6)."""
  return {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": embed_dim,
          "num_hidden_layers": depth, "num_attention_heads": num_heads,
          "intermediate_size": mlp_dim, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
          "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
          "layer_norm_eps": 1e-6, "image_size": img_size, "patch_size": patch_size,
          "num_channels": 3, "qkv_bias": True, "encoder_stride": patch_size,
          "torch_dtype": "float32"}


# ----------------------------------------------------------------------------------------------
# The release's AdamW state (full training checkpoints).
# ----------------------------------------------------------------------------------------------
def _param_groups(params: Mapping[str, Any], norm_last_layer: bool, prefix: str
                  ) -> tuple[list[_Entry], list[_Entry]]:
  """The release's get_params_groups(student): (regularized, not_regularized) in named_parameters
  order, skipping the frozen weight_g (requires_grad False when norm_last_layer)."""
  entries = []
  for part in ("backbone", "head"):
    for e in _spec_from_params(params[part]):
      if e.collection == "params":
        entries.append(e._replace(key=f"{prefix}{part}.{e.key}", path=(part,) + e.path))
  trainable = [e for e in entries
               if not (norm_last_layer and e.key.endswith("last_layer.weight_g"))]
  not_reg = lambda e: e.key.endswith(".bias") or len(_shape(_get(params, e.path))) == 1
  return ([e for e in trainable if not not_reg(e)], [e for e in trainable if not_reg(e)])


def _is_adam(x: Any) -> bool:
  return isinstance(x, optax.ScaleByAdamState)


def _path_keys(path) -> tuple[str, ...]:
  return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def _hyperparams(opt_state: Any) -> dict[str, Any]:
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "hyperparams"))
           if hasattr(x, "hyperparams")]
  return dict(found[0].hyperparams) if found else {}


def optimizer_to_torch(opt_state: Any, params: Mapping[str, Any], *, norm_last_layer: bool,
                       prefix: str = "module.") -> dict[str, Any]:
  """dino_jax's optax state -> the release's torch.optim.AdamW state_dict (torch tensors).

  params: the student {'backbone', 'head'}. Parameters are numbered as the release's two param
  groups (regularized, then biases / 1-D) over the student's named_parameters; each holds its
  own Adam step, so the last layer's count starts when its freeze ends, as in PyTorch. lr and
  weight_decay are this step's values, as the release leaves them in its param groups.
  """
  torch = torch_extra("torch")
  reg, not_reg = _param_groups(params, norm_last_layer, prefix)
  index = {e.path: (i, e.layout) for i, e in enumerate(reg + not_reg)}
  state = {}
  for adam in jax.tree.leaves(opt_state, is_leaf=_is_adam):
    if not _is_adam(adam) or int(adam.count) == 0:
      continue  # torch creates a parameter's state at its first update
    mus = jax.tree_util.tree_flatten_with_path(adam.mu)[0]
    nus = dict(jax.tree_util.tree_flatten_with_path(adam.nu)[0])
    for path, mu in mus:
      keys = _path_keys(path)
      if keys not in index:
        raise ValueError(f"optimizer state for {'.'.join(keys)}, which is not a trainable "
                         "parameter of the release's student")
      i, layout = index[keys]
      tensor = lambda x: torch.from_numpy(np.array(_to_torch_layout(to_numpy(x), layout)))
      state[i] = {"step": torch.tensor(float(int(adam.count)), dtype=torch.float32),
                  "exp_avg": tensor(mu), "exp_avg_sq": tensor(nus[path])}
  hp = _hyperparams(opt_state)
  lr = float(hp.get("learning_rate", 0.0))
  wd = float(hp.get("weight_decay", 0.0))
  defaults = torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults
  groups = [{**defaults, "lr": lr, "weight_decay": wd, "params": list(range(len(reg)))},
            {**defaults, "lr": lr, "weight_decay": 0.0,
             "params": list(range(len(reg), len(reg) + len(not_reg)))}]
  return {"state": state, "param_groups": groups}


def optimizer_from_torch(torch_state: Mapping[str, Any], opt_state: Any, params: Mapping[str, Any],
                         *, norm_last_layer: bool) -> tuple[Any, int]:
  """The release's AdamW state_dict -> (opt_state, step), filling a template optax state.

  opt_state: dino_jax's optimizer state for `params` (e.g. a fresh one: its structure is all that
  is used). Moments of parameters without torch state (never updated) are zero. Returns the
  optimizer step: the largest Adam step held (the backbone's, which is never frozen).
  """
  reg, not_reg = _param_groups(params, norm_last_layer, "")
  groups = torch_state["param_groups"]
  sizes = [len(g["params"]) for g in groups]
  if sizes != [len(reg), len(not_reg)]:
    raise ValueError(f"optimizer param groups hold {sizes} parameters; this model's release-style "
                     f"groups (regularized, not regularized) hold {[len(reg), len(not_reg)]}: the "
                     "checkpoint's head or backbone differs (norm_last_layer?)")
  ids = [i for g in groups for i in g["params"]]
  by_path = {}
  for pid, e in zip(ids, reg + not_reg):
    if pid in torch_state["state"]:
      s = torch_state["state"][pid]
      shape = _torch_shape(_shape(_get(params, e.path)), e.layout)
      for name in ("exp_avg", "exp_avg_sq"):
        if tuple(s[name].shape) != shape:
          raise ValueError(f"optimizer {name} of {e.key}: shape {_fmt(s[name].shape)}, the model "
                           f"expects {_fmt(shape)}")
      flax = lambda x: _to_flax_layout(to_numpy(x), e.layout)  # pylint: disable=cell-var-from-loop
      by_path[e.path] = (int(to_numpy(s["step"])), flax(s["exp_avg"]), flax(s["exp_avg_sq"]))

  def fill(adam):
    if not _is_adam(adam):
      return adam
    counts = []

    def moment(i):
      def f(path, x):
        got = by_path.get(_path_keys(path))
        if got is None:
          return np.zeros(x.shape, x.dtype)
        counts.append(got[0])
        return got[i].astype(x.dtype)
      return f

    mu = jax.tree_util.tree_map_with_path(moment(1), adam.mu)
    nu = jax.tree_util.tree_map_with_path(moment(2), adam.nu)
    count = max(counts, default=0)
    return adam._replace(count=np.asarray(count, np.asarray(adam.count).dtype), mu=mu, nu=nu)

  opt_state = jax.tree.map(fill, opt_state, is_leaf=_is_adam)
  step = max((int(a.count) for a in jax.tree.leaves(opt_state, is_leaf=_is_adam) if _is_adam(a)),
             default=0)
  hp = {"learning_rate": groups[0]["lr"], "weight_decay": groups[0]["weight_decay"]}

  def rest(path, x):
    # Scalars outside the Adam states: inject_hyperparams' count, the schedules' counts and the
    # freeze's step counter count every optimizer step; hyperparams hold this step's lr and wd.
    if m := re.search(r"\.hyperparams\['(\w+)'\]$", jax.tree_util.keystr(path)):
      return np.asarray(hp.get(m.group(1), x), np.asarray(x).dtype)
    if np.ndim(x) == 0 and np.issubdtype(np.asarray(x).dtype, np.integer):
      return np.asarray(step, np.asarray(x).dtype)
    return x

  leaves, treedef = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_is_adam)
  leaves = [x if _is_adam(x) else rest(p, x) for p, x in leaves]
  return jax.tree_util.tree_unflatten(treedef, leaves), step
