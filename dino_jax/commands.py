"""The installed commands: `dino-jax-train ARGS` is `python -m dino_jax.train ARGS`, and so on for
each command line module. The process is replaced by the module's own (same flags, --help, exit
codes); this module imports nothing heavy, so the command starts as fast as `python -m`.
"""
from __future__ import annotations

import os
import sys

COMMANDS = ("train", "eval_knn", "eval_linear", "eval_video_segmentation", "eval_image_retrieval",
            "eval_copy_detection", "visualize_attention", "export_torch", "import_torch")


def main() -> None:
  """Runs the command named by this executable: dino-jax-eval-knn -> dino_jax.eval_knn."""
  name = os.path.basename(sys.argv[0]).removeprefix("dino-jax-").replace("-", "_")
  if name not in COMMANDS:
    sys.exit(f"{sys.argv[0]}: not a dino_jax command; expected dino-jax-<{'|'.join(COMMANDS)}>")
  os.execv(sys.executable, [sys.executable, "-m", f"dino_jax.{name}", *sys.argv[1:]])
