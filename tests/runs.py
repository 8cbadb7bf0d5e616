"""The trainer run as users run it: `python -m dino_jax.train` in subprocesses (the device and
process counts are fixed when jax starts), the tiny 12-step config, and what a run leaves."""
import json
import os
import subprocess
import sys

import portpicker
from helpers import assert_trees_close, tiny_flags

from dino_jax import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs/default.py")

# No BN in the head here: it makes the gradients of the biases before it (and of the final
# LayerNorm's) exactly zero, and Adam turns their rounding noise into O(lr) steps that differ
# between summation orders, so meshes could not be compared. BN is covered in test_step.
TINY = tiny_flags(data__shapes_train_size=256, data__shapes_eval_size=32,
                  eval__after_training=False, log_every_steps=2, checkpoint_every_steps=4,
                  total_steps=12, warmup_epochs=0.25, freeze_last_layer=0.25,
                  model__use_bn_in_head=False)


def env(devices: int) -> dict:
  out = dict(os.environ)
  out["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  out["JAX_PLATFORMS"] = "cpu"
  out["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return out


def train_cmd(workdir, *extra):
  return [sys.executable, "-m", "dino_jax.train", "--config", DEFAULT_CONFIG, "--workdir",
          str(workdir), *TINY, *extra]


def train(workdir, *extra, devices=8, check=True):
  proc = subprocess.run(train_cmd(workdir, *extra), env=env(devices), cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  if check and proc.returncode:
    raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


def launch(workdir, processes: int, devices: int, *extra, env_of=None) -> list[str]:
  """The trainer in `processes` processes of `devices` CPU devices each, on localhost; returns
  their stderr. env_of(i): process i's extra environment instead of --coordinator_address."""
  port = 0 if env_of else portpicker.pick_unused_port()
  procs = []
  for i in range(processes):
    flags = [] if env_of else [f"--coordinator_address=localhost:{port}",
                               f"--num_processes={processes}", f"--process_id={i}"]
    procs.append(subprocess.Popen(
        train_cmd(workdir, *flags, *extra), env={**env(devices), **(env_of(i) if env_of else {})},
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
  errs = [p.communicate(timeout=600)[1] for p in procs]
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-3000:]
  return errs


def final_state(workdir):
  """The latest checkpoint's (step, TrainState as nested dicts of arrays)."""
  return checkpoint.restore_host(str(workdir))


def metrics(workdir, drop=("images_per_sec",)):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in f]


def assert_close_states(workdir, reference):
  """Student, teacher and centre within 1e-5 (relative, per tensor) of the reference run's."""
  _, got = final_state(workdir)
  _, want = final_state(reference)
  for key in ("params", "teacher_params", "center"):
    assert_trees_close(got[key], want[key], 1e-5, norm=True, what=key)


def assert_equal_states(workdir, reference):
  """The whole final TrainState bit for bit equal to the reference run's."""
  _, got = final_state(workdir)
  _, want = final_state(reference)
  assert_trees_close(got, want)
