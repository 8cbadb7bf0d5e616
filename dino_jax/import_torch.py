"""Imports PyTorch DINO weights into a new dino_jax workdir.

  python -m dino_jax.import_torch --weights FILE --arch vit_small --patch_size 16 --output DIR \\
      [--config configs/vit_small_imagenet.py] [--nowith_optimizer]

--weights: a backbone state_dict (release or timm names; the release's "pretrain" files; a
torchvision ResNet-50's, fc removed, for --arch resnet50), a
MultiCropWrapper state_dict ('backbone.*' / 'head.*'), the release's full training checkpoint
('student', 'teacher', 'optimizer', 'dino_loss', 'args', ...), a .safetensors file, or a
directory holding a transformers.ViTModel (config.json + model.safetensors or
pytorch_model.bin; the Hub's facebook/dino-vit* layout, whose layer_norm_eps 1e-12 is read as
DINO's 1e-6 with a logged note). Files are read without executing code (torch.load(weights_only=True),
safetensors).

DIR gets config.json and checkpoints/<step>/: eval_knn, eval_linear, visualize_attention and
export_torch read it; `train --workdir DIR` resumes it; `train --config.init_from=DIR` starts a
new run from its student and teacher. The checkpoint is a TrainState with the structure of
state.init_fn(config)'s init holding the imported student, teacher and centre. A backbone-only
file gives both networks the same backbone and a fresh head (init's, the same for both). From a
full checkpoint the optimizer state comes too (Adam moments, per-parameter steps, lr and wd) and
the checkpoint's step is the optimizer's step, so `train` continues that run;
--nowith_optimizer starts at step 0 with a fresh optimizer instead.

The config is --config (or the release's defaults) with the architecture set from the weights:
--arch / --patch_size are checked against them (and inferred when left out), the head's sizes are
the file's, and model.img_size is the position embedding's grid x patch size (a checkpoint
trained at another resolution keeps its position embedding, the crops stay the config's; the
model resizes the embedding at run time).
Without --config, a full checkpoint's `args` fill the training keys (all of them when dino_jax
wrote it: 'dino_jax_config').

The library: dino_jax.convert.importing (load_state, load_backbone for weights in memory,
import_weights), reading files with dino_jax.convert.files.
"""
from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags

from dino_jax import cli
from dino_jax.convert import importing


def _define_flags() -> None:
  flags.DEFINE_string("weights", None, "A .pth / .safetensors file or a transformers directory.")
  flags.DEFINE_string("output", None, "The workdir to write (must hold no checkpoints yet).")
  flags.DEFINE_string("arch", None, "vit_tiny | vit_small | vit_base | vit_large | vit_custom | "
                      "resnet50; checked against the weights (inferred when left out).")
  flags.DEFINE_integer("patch_size", None, "Checked against the weights (inferred when left out).")
  flags.DEFINE_bool("with_optimizer", True, "From a full checkpoint, also import the optimizer "
                    "state and step (to continue that run).")
  config_flags.DEFINE_config_file("config", None, "Optional config file to start from (e.g. the "
                                  "one you will train with); the model keys come from the weights.")
  flags.mark_flags_as_required(["weights", "output"])


def main(argv) -> None:
  del argv
  cli.quiet_library_logs()
  f = flags.FLAGS
  try:
    state = importing.import_weights(f.weights, f.output, arch=f.arch, patch_size=f.patch_size,
                                     config=f.config, with_optimizer=f.with_optimizer)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:  # one line
    sys.exit(f"import_torch: {e}")
  print(json.dumps({"output": f.output, "step": int(state.step)}))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
