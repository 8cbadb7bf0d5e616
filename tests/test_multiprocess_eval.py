"""Evaluation on several processes: 2 processes x 2 devices (jax.distributed on localhost) give the
figures of 1 process x 4 devices, with the same 4-way mesh and per-device batches.

- the trainer with its evaluations during (eval.every_steps) and after training (k-NN, attention,
  trained vs random init): the same losses and eval/ files, and only process 0 logs INFO lines;
- eval_knn, eval_linear and visualize_attention (the eval split's attention) on one workdir;
- features.extract itself: each process feeds its share, each gets every image once, in order.

One trained pair of workdirs serves every test, also across pytest-xdist workers (made once,
under a file lock).
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import helpers
import numpy as np
import portpicker
import pytest
import runs
from filelock import FileLock

from dino_jax.data.sources import make_source

# 2 epochs of 4 steps (64 images, batch 16), an evaluation after each epoch and after training.
# Evaluation batches of 16 and k-NN banks of 64: 4 rows a device on either launch.
FLAGS = helpers.tiny_flags(
    data__shapes_train_size=64, data__shapes_eval_size=24, total_steps=8, log_every_steps=2,
    checkpoint_every_steps=8, warmup_epochs=0.5, freeze_last_layer=0.5,
    model__use_bn_in_head=False, eval__after_training=True, eval__compare_random_init=True,
    eval__every_steps=4, eval__batch_size=16, eval__nb_knn="(5,10)", eval__attention_images=3,
    eval__linear_epochs=2, eval__linear_batch_size=16, eval__linear_lr=0.01)
DEVICES = 4
# absl's INFO lines: "I1206 12:00:00.000000 140000 train.py:229] ...".
INFO_LINE = re.compile(r"^I\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\]", re.M)
OWN_FILES = {os.path.basename(p) for p in glob.glob(
    os.path.join(runs.REPO, "dino_jax", "**", "*.py"), recursive=True)}


# features.extract on this process's share of the eval split (21 images: padded batches), with
# params from the host and from this process's first device; every process saves what it got.
EXTRACT_SCRIPT = """
import sys
import jax, numpy as np
from absl import app, flags
from dino_jax import cli, sharding
from dino_jax.data import pipeline
from dino_jax.evaluate import features
sys.path.insert(0, "tests")
import helpers

flags.DEFINE_string("out", None, "")
cli.define_distributed_flags()

def main(argv):
  cli.initialize_distributed()
  config = helpers.tiny_config(data__shapes_eval_size=21)
  mesh = sharding.make_mesh()
  pi, pc = jax.process_index(), jax.process_count()
  batches = pipeline.eval_batches(config, "val", features.local_batch_size(8, mesh),
                                  process_index=pi, process_count=pc)
  params = {"host": np.float32(2), "local": jax.device_put(np.float32(3), jax.local_devices()[0])}
  fn = lambda p, b: {"sum": b["image"].astype(np.float32).sum((1, 2, 3)) * p["host"] + p["local"]}
  out, stats = features.extract(fn, params, batches, mesh)
  np.savez(f"{flags.FLAGS.out}/{pi}.npz", examples=stats["examples"], **out)

app.run(main)
"""


def _launch(launches: list[tuple[list[str], int]], timeout: int = 600) -> list[list[str]]:
  """Starts every (args, processes) launch of `python <args>` at once, on DEVICES devices in
  all; returns each launch's stderr per process. Raises if a process fails. (stderr goes to
  files: a full pipe would stall a process while its peers wait on it in a collective.)"""
  procs = []
  for args, n in launches:
    if n == 1:
      cmds = [[sys.executable, *args]]
    else:
      port = portpicker.pick_unused_port()
      cmds = [[sys.executable, *args, f"--coordinator_address=localhost:{port}",
               f"--num_processes={n}", f"--process_id={i}"] for i in range(n)]
    procs.append([(subprocess.Popen(c, env=runs.env(DEVICES // n), cwd=runs.REPO,
                                    stdout=subprocess.DEVNULL, stderr=err), err)
                  for c in cmds for err in [tempfile.TemporaryFile("w+")]])
  try:
    for launch in procs:
      for p, _ in launch:
        p.wait(timeout=timeout)
  finally:  # a failed or stuck launch leaves no process behind
    for p, _ in sum(procs, []):
      if p.poll() is None:
        p.kill()
        p.wait()
  errs = []
  for launch in procs:
    errs.append([])
    for p, f in launch:
      f.seek(0)
      errs[-1].append(f.read())
      f.close()
      assert p.returncode == 0, f"{p.args}:\n{errs[-1][-1][-3000:]}"
  return errs


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _assert_nested_close(got, want, atol: float, what: str = ""):
  """Equal structure and non-float values; floats within atol."""
  if isinstance(want, dict):
    assert set(got) == set(want), what
    for k in want:
      _assert_nested_close(got[k], want[k], atol, f"{what}.{k}")
  elif isinstance(want, list):
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
      _assert_nested_close(g, w, atol, f"{what}[{i}]")
  elif isinstance(want, float):
    assert abs(got - want) <= atol, f"{what}: {got} vs {want}"
  else:
    assert got == want, what


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A directory with the workdirs one/ (1 process x 4 devices) and two/ (2 processes x 2
  devices) of the same run, and the stderr of each process: one.stderr, two_0/1.stderr."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # the session's directory, which every worker shares
    base = base.parent
  root = base / "multiprocess_eval"
  with FileLock(str(root) + ".lock"):
    if not (root / "done").exists():
      shutil.rmtree(root, ignore_errors=True)
      root.mkdir()
      cmd = lambda wd: ["-m", "dino_jax.train", "--config", runs.DEFAULT_CONFIG, "--workdir",
                        str(wd), *FLAGS]
      errs = _launch([(cmd(root / "one"), 1), (cmd(root / "two"), 2)])
      for name, err in zip(("one", "two_0", "two_1"), errs[0] + errs[1]):
        (root / f"{name}.stderr").write_text(err)
      (root / "done").write_text("")
  return root


def test_extract_on_two_processes_returns_every_image_once_in_order(tmp_path):
  _launch([(["-c", EXTRACT_SCRIPT, f"--out={tmp_path}"], 2)])
  config = helpers.tiny_config(data__shapes_eval_size=21)
  source = make_source(config, "val")
  want = np.array([source[i]["image"].astype(np.float32).sum() * 2 + 3 for i in range(21)])
  labels = np.array([source[i]["label"] for i in range(21)])
  for i in range(2):  # each process holds all of it
    got = np.load(tmp_path / f"{i}.npz")
    assert got["examples"] == 21
    np.testing.assert_array_equal(got["sum"], want)
    np.testing.assert_array_equal(got["label"], labels)


def _copy_workdir(src, dst):
  """A workdir's config and checkpoints, without the evaluations the trainer wrote."""
  os.makedirs(dst)
  shutil.copy(os.path.join(src, "config.json"), dst)
  shutil.copytree(os.path.join(src, "checkpoints"), os.path.join(dst, "checkpoints"))
  return str(dst)


def test_trainer_with_evaluations_two_processes_equal_one(trained):
  one, two = trained / "one", trained / "two"
  got, want = runs.metrics(two), runs.metrics(one)
  assert [r["step"] for r in got] == [r["step"] for r in want] == [2, 4, 6, 8]
  for g, w in zip(got, want):
    assert set(g) == set(w)
    np.testing.assert_allclose([g[k] for k in sorted(w)], [w[k] for k in sorted(w)], rtol=1e-5)
  knn = _read_json(one / "eval" / "knn.json")
  assert set(knn) == {"top1", "top5", "random_init"} and set(knn["top1"]) == {"5", "10"}
  assert _read_json(two / "eval" / "knn.json") == knn
  att = _read_json(one / "eval" / "attention.json")
  assert "random_init" in att and len(att["per_head"]) == 2
  _assert_nested_close(_read_json(two / "eval" / "attention.json"), att, 1e-6, "attention")
  assert (two / "eval" / "attention.png").exists()
  rows = [json.loads(line) for line in (one / "eval" / "progress.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [4, 8] and "knn_top1" in rows[0] and "jaccard" in rows[0]
  got = [json.loads(line) for line in (two / "eval" / "progress.jsonl").read_text().splitlines()]
  _assert_nested_close(got, rows, 1e-6, "progress")

  # Only process 0 logs dino_jax's INFO lines (jax's own lines at start-up aside).
  own_info = lambda err: [f for f in INFO_LINE.findall(err) if f in OWN_FILES]
  assert "train.py" in own_info((trained / "two_0.stderr").read_text())
  assert "report.py" in own_info((trained / "two_0.stderr").read_text())
  assert not own_info((trained / "two_1.stderr").read_text())


def test_eval_knn_two_processes_equal_one(trained, tmp_path):
  one = _copy_workdir(trained / "one", tmp_path / "one")
  two = _copy_workdir(trained / "one", tmp_path / "two")
  args = lambda wd: ["-m", "dino_jax.eval_knn", "--workdir", wd, "--nb_knn", "3", "7"]
  _launch([(args(one), 1), (args(two), 2)])
  want = _read_json(os.path.join(one, "eval", "knn.json"))
  assert set(want["top1"]) == {"3", "7"}
  assert _read_json(os.path.join(two, "eval", "knn.json")) == want


def test_eval_linear_two_processes_equal_one(trained, tmp_path):
  one = _copy_workdir(trained / "one", tmp_path / "one")
  two = _copy_workdir(trained / "one", tmp_path / "two")
  args = lambda wd: ["-m", "dino_jax.eval_linear", "--workdir", wd]
  _launch([(args(one), 1), (args(two), 2)])
  want = _read_json(os.path.join(one, "eval", "linear.json"))
  assert [r["epoch"] for r in want["per_epoch"]] == [0, 1]
  _assert_nested_close(_read_json(os.path.join(two, "eval", "linear.json")), want, 1e-5,
                       "linear")
  assert os.path.isdir(os.path.join(two, "eval", "linear_checkpoints_teacher", "2"))


def test_visualize_attention_of_the_split_two_processes_equal_one(trained, tmp_path):
  one = _copy_workdir(trained / "one", tmp_path / "one")
  two = _copy_workdir(trained / "one", tmp_path / "two")
  args = lambda wd: ["-m", "dino_jax.visualize_attention", "--workdir", wd, "--output", f"{wd}/out"]
  _launch([(args(one), 1), (args(two), 2)])
  want = _read_json(os.path.join(one, "eval", "attention.json"))
  _assert_nested_close(_read_json(os.path.join(two, "eval", "attention.json")), want, 1e-6,
                       "attention")
  # The trainer's closing figures of the same teacher, from the same images.
  trainer = _read_json(trained / "one" / "eval" / "attention.json")
  _assert_nested_close({k: trainer[k] for k in want}, want, 1e-6, "trainer")
  assert os.path.exists(os.path.join(two, "out", "attention.png"))
