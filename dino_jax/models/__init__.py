"""Flax modules: the ViT backbone and the DINO head."""
from dino_jax.models.head import DINOHead, MultiCropWrapper
from dino_jax.models.vit import (SIZES, VisionTransformer, build_vit, resize_pos_embed, vit_base,
                                 vit_large, vit_small, vit_tiny)
