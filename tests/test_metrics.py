"""metrics.Writer on hand-written logs: a resume drops the rows past its step and keeps the others,
appends keep every row (appended locally, the whole file rewritten at a URI), and TensorBoard's
event file at a URI is written whole at each flush. The bucket itself: test_gcs."""
import json
import struct

import pytest

from dino_jax import metrics


def _write(path, steps):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in steps))


def _steps(path):
  return [json.loads(r)["step"] for r in path.read_text().splitlines()]


@pytest.mark.parametrize("uri", [False, True], ids=["local", "whole_file"])
def test_resume_drops_later_rows_and_appends_keep_every_row(tmp_path, monkeypatch, uri):
  if uri:  # the object-store branch, on a local directory
    monkeypatch.setattr(metrics.paths, "is_uri", lambda p: True)
  train, progress = tmp_path / metrics.TRAIN_LOG, tmp_path / metrics.EVAL_LOG
  _write(train, [2, 4, 6, 8])
  _write(progress, [4, 8])
  train.write_text(train.read_text() + "\n")  # a blank line is no row

  writer = metrics.Writer(str(tmp_path), start_step=4)
  assert _steps(train) == [2, 4] and _steps(progress) == [4]
  for step in (6, 8, 10):
    writer.append(metrics.TRAIN_LOG, {"step": step, "loss": 0.5})
    assert _steps(train) == [2, 4] + list(range(6, step + 1, 2))
  writer.append(metrics.EVAL_LOG, {"step": 8, "knn_top1": {"20": 50.0}})
  assert writer.read(metrics.EVAL_LOG) == [{"step": 4, "loss": 0.4},
                                           {"step": 8, "knn_top1": {"20": 50.0}}]
  assert [r["step"] for r in writer.read(metrics.TRAIN_LOG)] == [2, 4, 6, 8, 10]
  writer.close()

  # Resumed at the last step: nothing dropped, nothing repeated.
  writer = metrics.Writer(str(tmp_path), start_step=10)
  writer.append(metrics.TRAIN_LOG, {"step": 12, "loss": 0.5})
  writer.close()
  assert _steps(train) == [2, 4, 6, 8, 10, 12] and _steps(progress) == [4, 8]


def test_fresh_workdir_gets_its_logs(tmp_path):
  writer = metrics.Writer(str(tmp_path / "new"), start_step=0)
  assert writer.read(metrics.TRAIN_LOG) == []
  writer.append(metrics.EVAL_LOG, {"step": 2})
  writer.close()
  assert _steps(tmp_path / "new" / metrics.EVAL_LOG) == [2]
  assert list((tmp_path / "new").glob("events.out.tfevents.*"))


def test_event_records_at_a_uri_are_written_whole_at_each_flush(tmp_path):
  path = tmp_path / "run" / "events.out.tfevents.1"
  records = metrics._WholeFileRecordsFactory().open(str(path))  # pylint: disable=protected-access
  records.write(b"ab")
  assert not path.exists()  # nothing until a flush
  records.flush()
  assert path.read_bytes() == b"ab"
  records.write(struct.pack("<Q", 7))
  records.close()
  assert path.read_bytes() == b"ab" + struct.pack("<Q", 7)
