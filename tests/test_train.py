"""The trainer end to end: config checks, exact resume, meshes and processes, NaN stop.

Runs go through `python -m dino_jax.train` in subprocesses (device count and process count are fixed
when jax starts) on a tiny ViT and the embedded shapes data.
"""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import runs

def test_misspelt_config_key_fails_fast_naming_the_closest_key(tmp_path):
  t = time.time()
  proc = runs.train(tmp_path, "--config.batch_sise=3", check=False)
  assert proc.returncode != 0
  assert "batch_sise" in proc.stderr and "batch_size" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "checkpoints")
  assert time.time() - t < 60


def test_print_config_lists_every_key_with_its_value_and_comment(tmp_path):
  """--print_config: one line per key of the resolved config (overrides applied), with the
  comment base_config() gives it; nothing trained, no workdir needed."""
  from dino_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  proc = subprocess.run([sys.executable, "-m", "dino_jax.train", "--config", runs.DEFAULT_CONFIG,
                         "--print_config", "--config.lr=0.01"], capture_output=True, text=True,
                        cwd=tmp_path, env=runs.env(1), timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = dict(line.split(" = ", 1) for line in proc.stdout.splitlines())
  config = config_lib.from_file(runs.DEFAULT_CONFIG, ["lr=0.01"]).to_dict()
  flat = lambda d, p="": [k for key, v in d.items() for k in (
      flat(v, f"{p}{key}.") if isinstance(v, dict) else [f"{p}{key}"])]
  assert sorted(lines) == sorted(flat(config)) and len(lines) > 90
  assert lines["lr"].startswith("0.01  # for a global batch of 256")
  assert lines["model.depth"] == "3" and lines["model.arch"].startswith("'vit_custom'  # ")
  assert not os.listdir(tmp_path)


def test_config_from_file_equals_the_command_line(monkeypatch):
  """config.from_file (notebooks, scripts) gives what ml_collections' --config flag parsing gives
  the trainer for the same file and overrides; a misspelt key names the closest one."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from dino_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  path = runs.DEFAULT_CONFIG
  overrides = runs.TINY + ["--config.global_crops_scale=(0.3,0.9)", "--config.data.source=folder",
                      "--config.model.remat=true"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", path, flag_values=fv)
  monkeypatch.setattr(sys, "argv", ["train", f"--config={path}", *overrides])  # read by the flag
  fv(sys.argv)
  got = config_lib.from_file(path, overrides)
  assert got.to_dict() == fv.config.to_dict()
  assert got.model.depth == 2 and got.global_crops_scale == (0.3, 0.9) and got.model.remat is True
  with pytest.raises(KeyError, match="model.detph.*'depth'"):
    config_lib.from_file(path, ["model.detph=3"])


@pytest.mark.parametrize("override, needle", [
    ("--config.batch_size=12", "batch_size=12"),  # 12 rows over 8 devices
    ("--config.global_crops_size=18", "global_crops_size=18"),  # patch 4 does not divide 18
    ("--config.local_crops_number=-1", "local_crops_number=-1"),
    ("--config.model.arch=vit_smal", "vit_small"),
    ("--config.data.source=folder", "data.path"),  # no folder given
    ("--config.model.attention=flash", "model.attention='flash'"),
    ("--config.eval.every_steps=-5", "eval.every_steps=-5"),
    ("--config.momentum_teacher_end=1.5", "momentum_teacher_end=1.5"),
    ("--config.model.dtype=float16", "use bfloat16"),  # no loss scaling: refused, not NaN
    ("--config.optimizer=adam", "optimizer='adam': expected adamw (the ViT recipe), sgd or lars"),
    ("--config.model.arch=resnet5", "'resnet50'"),
])
def test_bad_values_fail_before_compiling_naming_the_value(tmp_path, override, needle):
  proc = runs.train(tmp_path, override, check=False)
  assert proc.returncode != 0
  assert needle in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "checkpoints")


def test_missing_data_path_is_named(tmp_path):
  missing = tmp_path / "no_such_folder"
  proc = runs.train(tmp_path / "w", "--config.data.source=folder", f"--config.data.path={missing}",
                check=False)
  assert proc.returncode != 0
  assert str(missing) in proc.stderr, proc.stderr[-2000:]


def test_run_writes_the_workdir_outputs(reference_run):
  rows = runs.metrics(reference_run, drop=())
  assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
  for key in ("loss", "lr", "wd", "momentum", "teacher_temp", "images_per_sec", "entropy",
              "batch_entropy", "kl", "grad_norm", "epoch"):
    assert all(np.isfinite(r[key]) for r in rows), key
  with open(reference_run / "config.json") as f:
    assert json.load(f)["total_steps"] == 12
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(reference_run))
  step, state = runs.final_state(reference_run)
  assert step == 12 and int(state["step"]) == 12


def test_relative_workdir_keeps_every_checkpoint(tmp_path, reference_run):
  """`--workdir rel/wd` given relative to the current directory, as the README's command does:
  orbax's save thread rejects a relative directory, which lost every checkpoint and stopped the
  run at the second save. Every kept checkpoint is written and the run equals the reference."""
  proc = subprocess.run(runs.train_cmd("rel/wd"), env=runs.env(8), cwd=tmp_path, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  workdir = tmp_path / "rel" / "wd"
  assert sorted(int(n) for n in os.listdir(workdir / "checkpoints")) == [4, 8, 12]
  runs.assert_equal_states(workdir, reference_run)


def test_kill_after_checkpoint_then_rerun_equals_uninterrupted(tmp_path, reference_run):
  """SIGKILL once the step-4 checkpoint is on disk; the same command then finishes the run."""
  proc = subprocess.Popen(runs.train_cmd(tmp_path, "--config.total_steps=12"), env=runs.env(8),
                          cwd=runs.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  ckpt = tmp_path / "checkpoints" / "4"
  deadline = time.time() + 300
  while not (ckpt / "_CHECKPOINT_METADATA").exists() and proc.poll() is None:
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  runs.train(tmp_path)
  runs.assert_equal_states(tmp_path, reference_run)
  assert runs.metrics(tmp_path) == runs.metrics(reference_run)


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, reference_run):
  proc = subprocess.Popen(runs.train_cmd(tmp_path), env=runs.env(8), cwd=runs.REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (tmp_path / "metrics.jsonl").exists() and proc.poll() is None:
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  step, _ = runs.final_state(tmp_path)
  assert 2 <= step <= 12
  runs.train(tmp_path)
  runs.assert_equal_states(tmp_path, reference_run)


@pytest.mark.parametrize("devices, mesh", [(1, []), (8, ["--config.mesh.fsdp=2"])])
def test_other_meshes_equal_8_way_data_parallel(tmp_path, reference_run, devices, mesh):
  runs.train(tmp_path, *mesh, devices=devices)
  runs.assert_close_states(tmp_path, reference_run)
  losses = [r["loss"] for r in runs.metrics(tmp_path)]
  np.testing.assert_allclose(losses, [r["loss"] for r in runs.metrics(reference_run)], rtol=1e-5)


@pytest.mark.parametrize("devices, mesh", [(8, ["--config.mesh.fsdp=2"]), (4, [])])
def test_resume_on_another_mesh(tmp_path, reference_run, devices, mesh):
  """The reference's step-4 checkpoint (8-way data parallel) resumed as data 4 x fsdp 2, or on 4
  devices, finishes where the reference did."""
  shutil.copytree(reference_run, tmp_path, dirs_exist_ok=True)
  for step in ("8", "12"):
    shutil.rmtree(tmp_path / "checkpoints" / step)
  runs.train(tmp_path, *mesh, devices=devices)
  runs.assert_close_states(tmp_path, reference_run)
  np.testing.assert_allclose([r["loss"] for r in runs.metrics(tmp_path)],
                             [r["loss"] for r in runs.metrics(reference_run)], rtol=1e-5)


def test_two_processes_equal_one(tmp_path, reference_run):
  """jax.distributed on localhost, 2 processes x 4 devices, against 1 process x 8 devices."""
  runs.launch(tmp_path, 2, 4)
  runs.assert_close_states(tmp_path, reference_run)
  assert len(runs.metrics(tmp_path)) == len(runs.metrics(reference_run))  # only process 0 logs


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  """A NaN injected into the loss from step 7 on: the run stops with a clear error, writes no
  checkpoint after it, and the step-4 checkpoint restores with finite params."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dino_jax import config as config_lib, train  # pylint: disable=g-import-not-at-top

  config = config_lib.from_file(runs.DEFAULT_CONFIG, runs.TINY)
  original = train.train_step

  def poisoned(state, batch, rng, **kw):
    new_state, metrics = original(state, batch, rng, **kw)
    bad = state.step >= 6
    metrics["loss"] = jnp.where(bad, jnp.nan, metrics["loss"])
    return new_state, metrics

  monkeypatch.setattr(train, "train_step", poisoned)
  with pytest.raises(FloatingPointError, match="step 7"):
    train.train_and_evaluate(config, str(tmp_path))
  step, state = runs.final_state(tmp_path)
  assert step == 4
  assert all(np.isfinite(v).all() for v in jax.tree.leaves(state["params"]))


def test_a_failed_background_save_is_reported_before_the_next_save(tmp_path, monkeypatch):
  """A save that fails in orbax's background thread (here: a relative directory, which orbax
  0.12's writer rejects) is raised by check_saved, which the training loop calls at every log step,
  once the save has ended; orbax alone would hold the error until the next save."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from dino_jax import checkpoint  # pylint: disable=g-import-not-at-top

  monkeypatch.chdir(tmp_path)
  mngr = ocp.CheckpointManager(
      "rel/checkpoints", options=ocp.CheckpointManagerOptions(enable_async_checkpointing=True),
      item_names=("state",), item_handlers={"state": ocp.StandardCheckpointHandler()})
  checkpoint.check_saved(mngr)  # nothing saved yet: nothing to report
  mngr.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.ones(3)})))
  deadline = time.time() + 60
  with pytest.raises(RuntimeError, match=r"saving a checkpoint to rel/checkpoints failed"):
    while time.time() < deadline:
      checkpoint.check_saved(mngr)
      time.sleep(0.05)
  assert mngr.all_steps() == []
  mngr.close()


def test_one_compilation_of_the_step_for_the_whole_run(tmp_path, caplog):
  """Logging, checkpointing and the NaN checks between steps never change what the jitted step
  sees (shapes, shardings, static arguments): jax.log_compiles reports train_step compiled once in
  a 12-step run that logs every 2 steps and checkpoints every 4."""
  import jax  # pylint: disable=g-import-not-at-top
  from dino_jax import config as config_lib, train  # pylint: disable=g-import-not-at-top

  config = config_lib.from_file(runs.DEFAULT_CONFIG, runs.TINY)
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, str(tmp_path))
  compiles = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("Compiling") and "train_step" in r.getMessage()]
  assert len(compiles) == 1, compiles
  assert len(runs.metrics(tmp_path)) == 6


def test_default_recipe_short_run_stays_finite_and_writes_the_reports(tmp_path):
  """configs/default.py as the main job runs it (BN head, its ViT, crops and evaluation), only
  shorter and on fewer images: every logged loss is finite, the teacher is not collapsed (per-sample
  entropy below 95% of ln K, batch-mean entropy well above 0) and the closing evaluation writes
  knn.json and attention.json with the keys the README and tools read. The evaluation during
  training (eval.every_steps) writes a row at steps 15 and 30; the last is the same teacher as the
  closing report's, so it gives the same figures."""
  short = ["--config.total_steps=30", "--config.log_every_steps=10", "--config.eval.every_steps=15",
           "--config.checkpoint_every_steps=30", "--config.data.shapes_train_size=640",
           "--config.data.shapes_eval_size=96", "--config.eval.batch_size=96"]
  proc = subprocess.run(
      [sys.executable, "-m", "dino_jax.train", "--config", runs.DEFAULT_CONFIG, "--workdir",
       str(tmp_path), *short], env=runs.env(1), cwd=runs.REPO, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "COLLAPSE" not in proc.stderr
  rows = runs.metrics(tmp_path, drop=())
  assert [r["step"] for r in rows] == [10, 20, 30]
  from dino_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.from_file(runs.DEFAULT_CONFIG)
  ln_k = np.log(config.out_dim)
  for r in rows:
    assert np.isfinite(r["loss"]) and np.isfinite(r["kl"])
  assert rows[-1]["entropy"] < 0.95 * ln_k, rows[-1]
  assert rows[-1]["batch_entropy"] > 0.25 * ln_k, rows[-1]

  with open(tmp_path / "eval" / "knn.json") as f:
    knn = json.load(f)
  for table in (knn["top1"], knn["top5"], knn["random_init"]["top1"]):
    assert 0 <= table["20"] <= 100
  with open(tmp_path / "eval" / "attention.json") as f:
    att = json.load(f)
  assert len(att["per_head"]) == config.model.num_heads
  assert att["jaccard"] == pytest.approx(max(att["per_head"]))
  assert att["jaccard_head_mean"] == pytest.approx(np.mean(att["per_head"]))
  assert 0 < att["object_area"] < 1 and 0 <= att["mass_on_object"] <= 1
  assert set(att["random_init"]) >= {"jaccard", "jaccard_head_mean", "mass_on_object"}
  assert os.path.getsize(tmp_path / "eval" / "attention.png") > 0

  with open(tmp_path / "eval" / "progress.jsonl") as f:
    progress = [json.loads(line) for line in f]
  assert [r["step"] for r in progress] == [15, 30]
  assert progress[-1]["knn_top1"] == pytest.approx(knn["top1"])
  for key in ("jaccard", "jaccard_head_mean", "mass_on_object"):
    assert progress[-1][key] == pytest.approx(att[key], abs=1e-5)
  assert os.path.getsize(tmp_path / "eval" / "progress.png") > 0
