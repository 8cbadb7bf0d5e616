"""Many processes on this CPU (jax.distributed on localhost): resume on another process count,
fsdp across processes, the SLURM launch, and a checkpoint that cannot serve.

Every run is runs.TINY's 12 steps, compared with the 8-device reference run.
"""
import logging
import os
import shutil

import grain
import numpy as np
import orbax.checkpoint as ocp
import portpicker
import pytest
import runs

from dino_jax import checkpoint


def _keep_only_step_4(workdir):
  for step in (8, 12):
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))


@pytest.mark.parametrize("before, after", [((2, 2), (1, 4)), ((1, 4), (2, 2))])
def test_resume_on_another_process_count_continues_from_the_step(tmp_path, reference_run,
                                                                  before, after):
  """12 steps on one topology, the checkpoints after step 4 removed, then the run resumed on the
  other: it continues from step 4 (the state resharded, the data re-derived from the step) and
  ends where the uninterrupted 8-device run ends."""
  runs.launch(tmp_path, *before)
  _keep_only_step_4(tmp_path)
  errs = runs.launch(tmp_path, *after)
  assert "resumed from" in errs[0] and "checkpoints/4" in errs[0]
  assert f"'processes': {before[0]}" in errs[0], errs[0][-2000:]  # the note of what changed
  runs.assert_close_states(tmp_path, reference_run)
  got, want = runs.metrics(tmp_path), runs.metrics(reference_run)
  assert [r["step"] for r in got] == [r["step"] for r in want]  # no row lost or repeated
  np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-5)


def test_fsdp_across_two_processes_equals_data_parallel(tmp_path, reference_run):
  """mesh.fsdp=2 with 2 processes x 2 devices: each parameter split over devices of both."""
  runs.launch(tmp_path, 2, 2, "--config.mesh.fsdp=2")
  runs.assert_close_states(tmp_path, reference_run)


def test_slurm_launch_needs_only_distributed(tmp_path, reference_run):
  """Under SLURM `--distributed` is all a launch needs: jax.distributed finds the coordinator
  (the first node of SLURM_STEP_NODELIST, a port from SLURM_JOB_ID), the process count and id
  in SLURM's variables. Two tasks on this machine."""
  port = next(p for p in range(61440, 65536) if portpicker.is_port_free(p))
  job_id = str(port - 61440)  # jax's port: 61440 + job id mod 4096
  slurm = lambda i: {"SLURM_JOB_ID": job_id, "SLURM_STEP_NODELIST": "localhost",
                     "SLURM_NTASKS": "2", "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
                     "SLURM_STEP_NUM_NODES": "1"}
  errs = runs.launch(tmp_path, 2, 4, "--distributed", env_of=slurm)
  assert "2 processes" in errs[0]
  runs.assert_close_states(tmp_path, reference_run)


def test_a_checkpoint_this_config_cannot_read_stops_and_changes_nothing(tmp_path):
  """A rerun into the same workdir with another model: one line naming the checkpoint and what
  starts afresh; no traceback; checkpoints and metrics as they were (no restart from step 0)."""
  runs.train(tmp_path)
  before = (sorted(os.listdir(tmp_path / "checkpoints")), runs.metrics(tmp_path))
  proc = runs.train(tmp_path, "--config.model.depth=3", check=False)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert "checkpoints/12 cannot be read" in last and "new --workdir" in last, last
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert (sorted(os.listdir(tmp_path / "checkpoints")), runs.metrics(tmp_path)) == before
  assert runs.final_state(tmp_path)[0] == 12


def test_a_checkpoint_with_the_old_iterator_item_restores_quietly(tmp_path, caplog):
  """Checkpoints written when the input iterator's state was saved beside the state (an item
  'data') restore as they are, without orbax warning of the unread item."""
  it = iter(grain.MapDataset.range(10).to_iter_dataset())
  next(it)
  with ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("state", "data")) as mngr:
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.arange(4.0)}),
                                         data=grain.checkpoint.CheckpointSave(it)))
  with caplog.at_level(logging.WARNING):
    step, state = checkpoint.restore_host(str(tmp_path))
  assert step == 3 and state["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
  assert not [r for r in caplog.records if "data" in r.getMessage()], caplog.text
