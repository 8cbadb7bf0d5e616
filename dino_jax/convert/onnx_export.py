"""The ViT backbone as an ONNX graph, through PyTorch: the transformers.ViTModel of a directory
in --format hf's layout (eager attention), exported by torch.onnx.export's dynamo exporter
(torch.export, onnxscript).

The graph (ONNXRuntime and other ONNX runtimes run it; opset: torch's default):
  input   pixel_values  (batch, 3, S, S) float32, normalised as DINO does (ImageNet mean / std), S
                        the model's image size (config.json's image_size; no position-embedding
                        resize in the graph)
  outputs features      (batch, D): the final-LN [CLS] token, what dino_jax's model.apply and the
                        release's forward return
          tokens        (batch, 1 + (S / patch)^2, D): every final-LN token ([CLS] first), HF's
                        last_hidden_state
The batch axis is dynamic.
"""
from __future__ import annotations

from dino_jax.convert.state_dicts import torch_extra

INPUT, OUTPUTS = "pixel_values", ("features", "tokens")


def backbone_onnx(hf_dir: str) -> bytes:
  """The serialised ONNX model (see the module docstring) of the ViTModel in hf_dir (config.json
  + weights, as exporting writes for --format hf)."""
  torch = torch_extra("torch", "onnx")
  transformers = torch_extra("transformers", "onnx")
  torch_extra("onnxscript", "onnx")  # torch.onnx's dynamo exporter translates with it
  vit, info = transformers.ViTModel.from_pretrained(
      hf_dir, add_pooling_layer=False, attn_implementation="eager", output_loading_info=True)
  if any(info.values()):
    raise ValueError(f"{hf_dir} does not load into transformers.ViTModel: {info}")

  class Backbone(torch.nn.Module):
    """pixel_values (B, 3, S, S) -> ([CLS] (B, D), tokens (B, T, D)), all final-LN normed."""

    def __init__(self):
      super().__init__()
      self.vit = vit

    def forward(self, pixel_values):
      tokens = self.vit(pixel_values=pixel_values).last_hidden_state
      return tokens[:, 0], tokens

  size = vit.config.image_size
  program = torch.onnx.export(
      Backbone().eval(), (torch.zeros(2, 3, size, size),), dynamo=True, input_names=[INPUT],
      output_names=list(OUTPUTS), dynamic_shapes={INPUT: {0: torch.export.Dim("batch")}},
      external_data=False, verbose=False)
  return program.model_proto.SerializeToString()
