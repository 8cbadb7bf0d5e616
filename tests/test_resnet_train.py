"""The ResNet-50 config (configs/resnet50_imagenet.py: SGD, BN statistics in the TrainState)
trained end to end by `python -m dino_jax.train` at a tiny resolution: checkpoints hold the
student's and teacher's BatchNorm statistics, a run resumed from a checkpoint ends bit for bit
where the uninterrupted run does, and the closing evaluation scores k-NN and says attention
maps do not apply; the linear probe runs on it.

One CPU device and a persistent compilation cache: the resumed run reuses the first run's
compiled step."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np

import runs
from helpers import assert_trees_close

CONFIG = os.path.join(runs.REPO, "configs/resnet50_imagenet.py")
TINY = [f"--config.{k}={v}" for k, v in {
    "data.source": "shapes", "data.workers": 0, "data.shapes_image_size": 16,
    "data.shapes_train_size": 32, "data.shapes_eval_size": 8, "global_crops_size": 16,
    "local_crops_size": 8, "local_crops_number": 2, "batch_size": 4, "out_dim": 64,
    "model.head_hidden_dim": 32, "model.head_bottleneck_dim": 16, "model.dtype": "float32",
    "model.use_bn_in_head": True, "total_steps": 4, "checkpoint_every_steps": 2,
    "log_every_steps": 1, "warmup_epochs": 0.25, "freeze_last_layer": 0.25,
    "eval.batch_size": 8, "eval.nb_knn": (2, 4)}.items()]


def _run(module, workdir, cache, *args):
  env = {**runs.env(1), "JAX_COMPILATION_CACHE_DIR": str(cache),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  proc = subprocess.run([sys.executable, "-m", f"dino_jax.{module}", "--workdir", str(workdir),
                         *args], env=env, cwd=runs.REPO, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stderr


def test_resnet_config_trains_checkpoints_bn_statistics_and_resumes_exactly(tmp_path):
  ref, resumed, cache = tmp_path / "ref", tmp_path / "resumed", tmp_path / "cache"
  log = _run("train", ref, cache, "--config", CONFIG, *TINY, "--config.eval.after_training=True")
  # The uninterrupted run, cut back to its step-2 checkpoint: the rerun resumes from there.
  shutil.copytree(ref, resumed, ignore=shutil.ignore_patterns("eval"))
  shutil.rmtree(resumed / "checkpoints" / "4")
  _run("train", resumed, cache, "--config", CONFIG, *TINY)

  step, state = runs.final_state(ref)
  assert step == 4
  stats, teacher_stats = state["batch_stats"], state["teacher_batch_stats"]
  assert set(stats) == {"backbone", "head"} and "layer4_2" in stats["backbone"]
  # The teacher's statistics are its own (its forward passes on the global crops only).
  assert not np.array_equal(stats["backbone"]["bn1"]["mean"],
                            teacher_stats["backbone"]["bn1"]["mean"])
  assert_trees_close(runs.final_state(resumed)[1], state, what="resumed")
  assert runs.metrics(resumed) == runs.metrics(ref)

  with open(ref / "eval" / "knn.json") as f:
    assert set(json.load(f)["top1"]) == {"2", "4"}
  assert not (ref / "eval" / "attention.json").exists()
  assert "attention maps do not apply to a resnet50" in log

  # The linear probe on the pooled 2048-d feature, as the release's eval_linear for convnets.
  _run("eval_linear", ref, cache, "--epochs=1", "--batch_size=8")
  with open(ref / "eval" / "linear.json") as f:
    probe = json.load(f)
  assert probe["step"] == 4 and 0 <= probe["top1"] <= 100
