"""Hugging Face transformers.ViTModel names, config.json and preprocessor_config.json for the
release's ViT backbone.

transformers splits the release's fused qkv (3D, D) into attention.attention.{query, key, value}
(D, D) each and renames the rest (embeddings.*, encoder.layer.{i}.*, layernorm.*); the tensors are
otherwise the same (torch layouts), so both directions are copies and a split / concatenation.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from absl import logging
from PIL import Image

from dino_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD

# DINO's ViT LayerNorm eps (models/vit.py). transformers' ViTConfig defaults to 1e-12, and its
# DINO conversion (the Hub's facebook/dino-vit*) keeps that default.
DINO_LAYER_NORM_EPS = 1e-6

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


def check_config(cfg: Mapping[str, Any], where: str) -> None:
  """Raises ValueError unless a transformers config.json describes DINO's ViT block: exact GELU and
  layer_norm_eps <= 1e-6. A smaller eps (1e-12: the Hub's facebook/dino-vit* directories) is
  accepted with a logged note: the weights are DINO's, dino_jax runs them with eps 1e-6, and a
  LayerNorm's output moves by a relative eps / (2 var) at most, var being the variance of its input
  over a token's D channels (tests/test_hf.py measures the features' difference)."""
  act, eps = cfg.get("hidden_act", "gelu"), cfg.get("layer_norm_eps", DINO_LAYER_NORM_EPS)
  if act != "gelu":
    raise ValueError(f"{where}: hidden_act {act!r} differs from DINO's ViT (exact GELU, 'gelu')")
  if not 0 <= eps <= DINO_LAYER_NORM_EPS:
    raise ValueError(f"{where}: layer_norm_eps {eps} differs from DINO's ViT "
                     f"({DINO_LAYER_NORM_EPS}); only a smaller eps is read as DINO's")
  if eps != DINO_LAYER_NORM_EPS:
    logging.info("%s: layer_norm_eps %g (transformers' default, as its DINO conversion writes); "
                 "the weights are DINO's ViT, run with DINO's eps %g (features differ negligibly)",
                 where, eps, DINO_LAYER_NORM_EPS)


def hf_config(*, embed_dim: int, depth: int, num_heads: int, mlp_dim: int, patch_size: int,
              img_size: int) -> dict[str, Any]:
  """config.json of a transformers.ViTModel equal to the release's ViT (exact GELU, eps 1e-6)."""
  return {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": embed_dim,
          "num_hidden_layers": depth, "num_attention_heads": num_heads,
          "intermediate_size": mlp_dim, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
          "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
          "layer_norm_eps": DINO_LAYER_NORM_EPS, "image_size": img_size, "patch_size": patch_size,
          "num_channels": 3, "qkv_bias": True, "encoder_stride": patch_size,
          "torch_dtype": "float32"}


def preprocessor_config(img_size: int) -> dict[str, Any]:
  """preprocessor_config.json of a transformers.ViTImageProcessor, as the Hub's DINO directories
  hold: the image resized to img_size x img_size (bicubic, DINO's resample), /255, ImageNet
  mean / std (DINO's normalisation). AutoImageProcessor and pipeline('image-feature-extraction')
  read it."""
  return {"image_processor_type": "ViTImageProcessor", "do_resize": True,
          "size": {"height": img_size, "width": img_size}, "resample": int(Image.BICUBIC),
          "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
          "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}
