"""A workdir's logs of a training run: metrics.jsonl (one JSON object per logged step),
eval/progress.jsonl (one per evaluation during training) and TensorBoard scalars.

Process 0 writes them; on the others a Writer writes nothing. A run resumed from step s first
drops the rows past s, which it will log again. The workdir may be a URI (gs://bucket/run): the
files go through dino_jax.paths. Object stores have no append (gcsfs overwrites), so the Writer
holds each log's rows and writes the whole file at each row there; a local log is appended to,
so that a crash mid-write cannot take the earlier rows with it. TensorBoard's event files at a URI
are held in memory likewise and written whole at each of tensorboardX's flushes and at close.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

import jax

from dino_jax import paths

TRAIN_LOG = "metrics.jsonl"
EVAL_LOG = "eval/progress.jsonl"


class Writer:
  """Appends rows to a workdir's logs and scalars to its TensorBoard events."""

  def __init__(self, workdir: str, start_step: int):
    self.workdir = workdir
    self.enabled = jax.process_index() == 0
    self._rows: dict[str, list[dict[str, Any]]] = {}  # log -> its rows, as in its file
    self._tensorboard = None
    if self.enabled:
      for log in (TRAIN_LOG, EVAL_LOG):
        rows = _load(self._path(log))
        self._rows[log] = [r for r in rows if r["step"] <= start_step]
        if len(self._rows[log]) < len(rows):
          self._rewrite(log)
      import tensorboardX  # pylint: disable=g-import-not-at-top  (it imports torch: seconds)
      _register_uri_event_files()
      self._tensorboard = tensorboardX.SummaryWriter(str(workdir))

  def _path(self, log: str):
    return paths.path(self.workdir) / log

  def _rewrite(self, log: str) -> None:
    paths.write_text(self._path(log), "".join(json.dumps(r) + "\n" for r in self._rows[log]))

  def append(self, log: str, row: dict[str, Any]) -> None:
    """One JSON line {"step": ..., ...} at the end of workdir/log."""
    if not self.enabled:
      return
    if log not in self._rows:
      self._rows[log] = _load(self._path(log))
    self._rows[log].append(dict(row))
    if paths.is_uri(self.workdir):
      self._rewrite(log)
      return
    path = self._path(log)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
      f.write(json.dumps(row) + "\n")

  def read(self, log: str) -> list[dict[str, Any]]:
    """The rows of workdir/log so far."""
    if log in self._rows:
      return [dict(r) for r in self._rows[log]]
    return _load(self._path(log))

  def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
    """TensorBoard scalars prefix/name at step."""
    if self.enabled:
      for name, value in values.items():
        self._tensorboard.add_scalar(f"{prefix}/{name}", value, step)

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def _load(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The rows of a log file; [] when there is none."""
  if not paths.exists(path):
    return []
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


class _WholeFileRecords:
  """tensorboardX's record file at a URI: the event records in memory, the whole file written
  through dino_jax.paths at each flush (tensorboardX calls write and flush under one lock)."""

  def __init__(self, path: str):
    self.path = path
    self._buffer = io.BytesIO()
    self._dirty = False

  def write(self, data: bytes) -> None:
    self._buffer.write(data)
    self._dirty = True

  def flush(self) -> None:
    if self._dirty:
      paths.write_bytes(self.path, self._buffer.getvalue())
      self._dirty = False

  def close(self) -> None:
    self.flush()


class _WholeFileRecordsFactory:
  """tensorboardX's writer factory for a URI scheme (record_writer.register_writer_factory)."""

  def open(self, path: str) -> _WholeFileRecords:
    return _WholeFileRecords(path)

  def directory_check(self, path: str) -> None:
    del path  # object stores have no directories to create


def _register_uri_event_files() -> None:
  """Event files at every URI scheme dino_jax.paths reads (tensorboardX's own gs:// writer needs
  google-cloud-storage and its credentials; this one uses the same client as every other file)."""
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  for scheme in paths.CLIENTS:
    record_writer.register_writer_factory(scheme, _WholeFileRecordsFactory())
