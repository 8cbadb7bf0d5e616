"""Linear probe of a workdir's frozen teacher (or student), the release's protocol.

  python -m dino_jax.eval_linear --workdir DIR [--data_path FOLDER] [--which teacher|student] \
      [--epochs 100] [--lr 0.001] [--batch_size 1024] [--n_last_blocks 4] \
      [--avgpool_patchtokens] [--distributed | --coordinator_address HOST:PORT ...]

Settings default to the workdir config's eval.linear_* keys (dino_jax.evaluate.linear). The
workdir's data, or with --data_path another image folder (FOLDER/train/<class>/,
FOLDER/val/<class>/, as the release's --data_path; config.json is left as it is).
Checkpoints go to DIR/eval/linear_checkpoints_<which>/ after every epoch; rerunning the command
resumes, if its settings (data, lr, batch size, epochs, blocks) are those of the checkpoints:
otherwise it stops naming what differs. Prints a table and writes DIR/eval/linear.json ({"top1",
"top5", "best_top1", "per_epoch": [..], "which", "step"}), or DIR/eval/linear_student.json for
--which student.
On several processes (the launch flags of train.py) each feeds its share of every batch;
process 0 prints and writes.
"""
from __future__ import annotations

import sys

import jax
from absl import flags

from dino_jax import checkpoint
from dino_jax import cli
from dino_jax.evaluate import linear

# flag name -> config.eval key
OVERRIDES = {"epochs": "linear_epochs", "lr": "linear_lr", "batch_size": "linear_batch_size",
             "n_last_blocks": "linear_n_last_blocks",
             "avgpool_patchtokens": "linear_avgpool_patchtokens"}


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A dino_jax workdir (train or import_torch wrote it).")
  cli.define_data_path_flag()
  flags.DEFINE_enum("which", "teacher", ["teacher", "student"], "Network to probe.")
  flags.DEFINE_integer("epochs", None, "Training epochs (default eval.linear_epochs, 100).")
  flags.DEFINE_float("lr", None, "Base lr for a batch of 256, scaled linearly (default "
                     "eval.linear_lr, 0.001).")
  flags.DEFINE_integer("batch_size", None, "Global batch (default eval.linear_batch_size, 1024).")
  flags.DEFINE_integer("n_last_blocks", None, "[CLS] tokens of this many last blocks "
                       "(default eval.linear_n_last_blocks: 4, the release's ViT-S setting).")
  flags.DEFINE_bool("avgpool_patchtokens", None, "Add the mean patch token (the release's ViT-B "
                    "setting, with --n_last_blocks 1).")
  cli.define_step_flag()
  cli.define_distributed_flags()
  flags.mark_flags_as_required(["workdir"])


def main(argv) -> None:
  del argv
  cli.initialize_distributed()
  cli.quiet_library_logs()
  f = flags.FLAGS
  try:
    config = checkpoint.load_config(f.workdir)
    cli.use_data_path(config, f.data_path)
    with config.unlocked():
      for flag, key in OVERRIDES.items():
        if f[flag].value is not None:
          config.eval[key] = f[flag].value
    result = linear.run(config, f.workdir, f.which, f.step)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"eval_linear: {e}")
  if jax.process_index() != 0:
    return
  print(f"linear probe, {f.which} at step {result['step']}")
  print(f"{'epoch':>5}  {'loss':>8}  {'lr':>9}  {'top-1':>6}  {'top-5':>6}")
  for r in result["per_epoch"]:
    acc = f"{r['top1']:6.1f}  {r['top5']:6.1f}" if "top1" in r else ""
    print(f"{r['epoch'] + 1:>5}  {r['loss']:8.4f}  {r['lr']:9.2e}  {acc}")
  print(f"top-1 {result['top1']:.1f}%  top-5 {result['top5']:.1f}%  (best top-1 "
        f"{result['best_top1']:.1f}%, the release's figure)")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
