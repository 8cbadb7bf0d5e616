"""Flax modules: the ViT and ResNet backbones and the DINO head; build.py makes them from a
training config."""
from dino_jax.models.build import build_models, crop_shapes, init_variables
from dino_jax.models.head import DINOHead, MultiCropWrapper
from dino_jax.models.resnet import ResNet, build_resnet, merge_stats
from dino_jax.models.vit import (SIZES, VisionTransformer, build_vit, resize_pos_embed, vit_base,
                                 vit_large, vit_small, vit_tiny)

__all__ = ["DINOHead", "MultiCropWrapper", "ResNet", "SIZES", "VisionTransformer", "build_models",
           "build_resnet", "build_vit", "crop_shapes", "init_variables", "merge_stats",
           "resize_pos_embed", "vit_base", "vit_large", "vit_small", "vit_tiny"]
