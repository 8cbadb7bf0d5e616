"""Exports a workdir's weights to the formats PyTorch users exchange.

  python -m dino_jax.export_torch --workdir DIR --output FILE [--which teacher|student] \\
      [--with_head] [--format pth|safetensors|hf|onnx|full] [--step N]

Formats:
  pth          the backbone state_dict with the release's key names (its "pretrain" files); loads
               with strict=True into the release's vision_transformer and timm's
               VisionTransformer (num_classes=0). With --with_head: the release's MultiCropWrapper
               layout, keys 'backbone.*' and 'head.*' (last_layer.weight_g / weight_v).
  safetensors  the same tensors in a .safetensors file (metadata: arch, patch size, heads, step).
  hf           a directory in the Hub's layout (config.json, model.safetensors,
               preprocessor_config.json): AutoModel.from_pretrained(DIR), AutoImageProcessor
               and pipeline("image-feature-extraction", model=DIR) load it (the processor:
               bicubic resize to the model's image size, ImageNet mean / std); backbone only, no
               pooler (AutoModel adds an unused random one: ViTModel.from_pretrained(DIR,
               add_pooling_layer=False) does not). Key names of transformers 4.x and the Hub
               (transformers 5 renames them as it loads).
  onnx         the backbone as an ONNX graph (needs the 'onnx' extra): input pixel_values
               (batch, 3, S, S), normalised with ImageNet mean / std, S the model's image size;
               outputs features (batch, D), the final-LN [CLS] (what dino_jax's model.apply
               returns), and tokens (batch, 1 + N, D), every final-LN token. The batch axis is
               dynamic. onnxruntime.InferenceSession(FILE).run(None, {"pixel_values": x}).
  full         the release's full training checkpoint: 'student' ('module.backbone.*',
               'module.head.*'), 'teacher', 'optimizer' (torch AdamW state, the release's two
               param groups), 'epoch', 'args', 'dino_loss' {'center'}. main_dino.py resumes from
               it; eval_knn.py / eval_linear.py read its 'teacher'. 'args' is a plain dict of the
               release's argument names (plus this run's config as 'dino_jax_config'), not an
               argparse.Namespace, so torch.load(weights_only=True) reads the file. --which and
               --with_head do not apply (both networks and heads are in it).

The library: dino_jax.convert.exporting (export, load_state, backbone_shape).
"""
from __future__ import annotations

import json
import sys

from absl import flags

from dino_jax import cli
from dino_jax.convert import exporting


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A dino_jax workdir (train or import_torch wrote it).")
  flags.DEFINE_string("output", None, "File to write (a directory for --format hf).")
  flags.DEFINE_enum("which", "teacher", ["teacher", "student"], "Network to export (the release "
                    "publishes the teacher).")
  flags.DEFINE_bool("with_head", False, "Also export the DINO head (keys 'backbone.*', 'head.*').")
  flags.DEFINE_enum("format", None, list(exporting.FORMATS), "pth | safetensors | hf | onnx | "
                    "full. Default: safetensors / onnx for an --output ending in .safetensors / "
                    ".onnx, else pth.")
  cli.define_step_flag()
  flags.mark_flags_as_required(["workdir", "output"])


def main(argv) -> None:
  del argv
  cli.quiet_library_logs()
  f = flags.FLAGS
  fmt = f.format or next((x for x in ("safetensors", "onnx") if f.output.endswith(f".{x}")),
                         "pth")
  try:
    out = exporting.export(f.workdir, f.output, which=f.which, with_head=f.with_head, fmt=fmt,
                           step=f.step)
  except (ValueError, FileNotFoundError, ImportError) as e:  # one clear line, no traceback
    sys.exit(f"export_torch: {e}")
  print(json.dumps({k: v for k, v in out.items() if k != "keys"}))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
