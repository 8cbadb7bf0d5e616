"""A workdir's logs of a training run: metrics.jsonl (one JSON object per logged step),
eval/progress.jsonl (one per evaluation during training) and TensorBoard scalars.

Process 0 writes them; on the others a Writer writes nothing. A run resumed from step s first
drops the rows past s, which it will log again.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax

TRAIN_LOG = "metrics.jsonl"
EVAL_LOG = os.path.join("eval", "progress.jsonl")


class Writer:
  """Appends rows to a workdir's logs and scalars to its TensorBoard events."""

  def __init__(self, workdir: str, start_step: int):
    self.workdir = workdir
    self.enabled = jax.process_index() == 0
    self._tensorboard = None
    if self.enabled:
      for log in (TRAIN_LOG, EVAL_LOG):
        _truncate(os.path.join(workdir, log), start_step)
      import tensorboardX  # pylint: disable=g-import-not-at-top  (it imports torch: seconds)
      self._tensorboard = tensorboardX.SummaryWriter(workdir)

  def append(self, log: str, row: dict[str, Any]) -> None:
    """One JSON line {"step": ..., ...} at the end of workdir/log."""
    if not self.enabled:
      return
    path = os.path.join(self.workdir, log)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def read(self, log: str) -> list[dict[str, Any]]:
    """The rows of workdir/log so far."""
    path = os.path.join(self.workdir, log)
    if not os.path.exists(path):
      return []
    with open(path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
    """TensorBoard scalars prefix/name at step."""
    if self.enabled:
      for name, value in values.items():
        self._tensorboard.add_scalar(f"{prefix}/{name}", value, step)

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def _truncate(path: str, step: int) -> None:
  """Drops the rows of a log past `step`."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [r for r in f if r.strip() and json.loads(r)["step"] <= step]
  with open(path, "w") as f:
    f.writelines(rows)
