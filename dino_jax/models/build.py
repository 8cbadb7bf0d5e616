"""The student and teacher networks a training config describes, and their initial variables.

Shapes: B batch, n crops of one resolution, H x W crop side.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc

from dino_jax.models.head import DINOHead, MultiCropWrapper
from dino_jax.models.resnet import STAGES, build_resnet
from dino_jax.models.vit import build_vit


def build_models(config: mlc.ConfigDict) -> tuple[MultiCropWrapper, MultiCropWrapper]:
  """(student, teacher): the same architecture; only the student has drop path (a ViT's; the
  release's ResNets have none)."""
  m = config.model
  sizes = {k: m[k] for k in ("embed_dim", "depth", "num_heads") if m[k] > 0}
  vit_kw = dict(img_size=m.img_size or config.global_crops_size, dtype=jnp.dtype(m.dtype),
                attention=m.attention, remat=m.remat, **sizes)

  def wrapper(drop_path_rate):
    if m.arch in STAGES:
      backbone = build_resnet(m.arch, dtype=jnp.dtype(m.dtype))
    else:
      backbone = build_vit(m.arch, m.patch_size, drop_path_rate=drop_path_rate, **vit_kw)
    # The head computes in float32 whatever the backbone's dtype: the teacher's softmax at
    # temperature 0.04 needs its precision (docs/notes/models.md, "Head precision").
    head = DINOHead(config.out_dim, use_bn=m.use_bn_in_head, norm_last_layer=m.norm_last_layer,
                    nlayers=m.head_nlayers, hidden_dim=m.head_hidden_dim,
                    bottleneck_dim=m.head_bottleneck_dim, dtype=jnp.float32)
    return MultiCropWrapper(backbone, head)

  return wrapper(m.drop_path_rate), wrapper(0.0)


def crop_shapes(config: mlc.ConfigDict) -> list[tuple[int, int, int, int]]:
  """(n, H, W, 3) of each crop resolution a training step feeds the student: globals, locals."""
  g, l = config.global_crops_size, config.local_crops_size
  return [(2, g, g, 3)] + ([(config.local_crops_number, l, l, 3)]
                           if config.local_crops_number else [])


def init_variables(student: MultiCropWrapper, rng: jax.Array,
                   shapes: Sequence[Sequence[int]]) -> dict[str, Any]:
  """The student's initial {'params', 'batch_stats'?}; one image of each crop shape is traced."""
  crops = [jnp.zeros((1,) + tuple(s), jnp.float32) for s in shapes]
  return student.init({"params": rng, "drop_path": rng}, crops)
