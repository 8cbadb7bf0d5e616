"""Flax <-> PyTorch DINO weights, one concept per module; each imports only those above it:

  hf           transformers.ViTModel names and config.json (release_to_hf, hf_to_release).
  state_dicts  the release's / timm's key tables and layouts: torch_to_flax, flax_to_torch.
  optimizer    the release's torch AdamW state <-> dino_jax's optax state.
  files        reading .pth / .safetensors files and transformers directories; the release's
               training `args`.
  importing    weights -> (config, TrainState): load_state, load_backbone, import_weights.
  onnx_export  the backbone as an ONNX graph (through transformers.ViTModel and torch.onnx).
  exporting    a workdir -> files: export, load_state, backbone_shape.

The CLIs dino_jax.import_torch and dino_jax.export_torch call importing and exporting.
"""
from __future__ import annotations

from dino_jax.convert.state_dicts import flax_to_torch, strip_prefix, torch_to_flax

__all__ = ["flax_to_torch", "strip_prefix", "torch_to_flax"]
