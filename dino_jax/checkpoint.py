"""Workdir checkpoints: orbax CheckpointManager over the TrainState and the data iterator state.

A workdir holds config.json and checkpoints/<step>/{state, data}. Every process calls save/restore
(orbax writes each process's shards); restoring into an abstract state with shardings lays the
arrays out on the current mesh, whatever mesh wrote them. The linear probe keeps its own
(`probe_manager`) in eval/linear_checkpoints_<which>/<epoch>/{state, history}.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import ml_collections as mlc
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from dino_jax import config as config_lib


def absolute(path: str) -> epath.Path:
  """A local path made absolute (URIs such as gs://bucket/dir stay as they are).

  orbax's array writer rejects a relative directory, and only from its background thread,
  where the error surfaces at the next save.
  """
  return epath.Path(path if "://" in str(path) else os.path.abspath(path))


def manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """CheckpointManager on workdir/checkpoints with items 'state' and (optionally) 'data'.

  read_only: a manager for restoring only, which neither creates, saves nor deletes. (Its options
  are set to that directly rather than through orbax's read_only flag, which logs four warnings
  on every manager it builds.)
  """
  if read_only:
    options = ocp.CheckpointManagerOptions(create=False, save_interval_steps=0,
                                           enable_async_checkpointing=False)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
  return ocp.CheckpointManager(
      absolute(workdir) / "checkpoints", options=options, item_names=("state", "data"),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()})


def probe_manager(directory: str, keep: int = 2) -> ocp.CheckpointManager:
  """The linear probe's CheckpointManager on `directory`: items 'state' (its classifier and
  optimizer) and 'history' (JSON, its per-epoch rows), one step per epoch, the last `keep` kept."""
  return ocp.CheckpointManager(absolute(directory),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep),
                               item_names=("state", "history"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any = None) -> None:
  """Saves asynchronously (returns once the arrays are copied off the devices)."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  mngr.save(step, args=ocp.args.Composite(**items), force=True)


def check_saved(mngr: ocp.CheckpointManager) -> None:
  """Raises the error of a background save that has ended in failure, without waiting for one
  still running. orbax holds such an error until the next save or the final wait: an epoch of
  training later, with nothing saved in between.

  Single process only: with several, each would decide alone whether to wait, and orbax's wait
  synchronises the processes.
  """
  if jax.process_count() > 1 or mngr.is_saving_in_progress():
    return
  try:
    mngr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f"saving a checkpoint to {mngr.directory} failed ({type(e).__name__}: "
                       f"{e}); training stopped. The last good checkpoint is step "
                       f"{mngr.latest_step()}.") from e


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, data_iter: Any = None,
            step: int | None = None) -> tuple[int, Any] | None:
  """Restores the latest readable checkpoint (or `step`) into abstract_state's shardings.

  A checkpoint that cannot be read is reported and the one before it tried. The data iterator, if
  given, is set to its saved state in place. Returns (step, state), or None without checkpoints.
  """
  steps = [step] if step is not None else sorted(mngr.all_steps(), reverse=True)
  for s in steps:
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    # Imported workdirs (import_torch) hold no iterator state: the data then starts afresh.
    if data_iter is not None and (epath.Path(mngr.directory) / str(s) / "data").exists():
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = mngr.restore(s, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      if step is not None:
        raise
      logging.error("checkpoint %s cannot be read (%s: %s); trying the previous one",
                    os.path.join(str(mngr.directory), str(s)), type(e).__name__, e)
      continue
    return s, restored["state"]
  return None


def save_config(workdir: str, config: mlc.ConfigDict) -> None:
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(config_lib.to_json(config))


def load_config(workdir: str) -> mlc.ConfigDict:
  """The resolved config a workdir was trained (or imported) with."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: not a dino_jax workdir (train or import_torch "
                            "writes one)")
  return config_lib.from_json(path.read_text())


def restore_host(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """(step, state) of a workdir's latest (or given) checkpoint as nested dicts of arrays on this
  process's first device, whatever mesh and device count wrote it (no model or config needed)."""
  mngr = manager(workdir, read_only=True)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    tree = mngr.item_metadata(step)["state"]
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree)
    return step, mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
  finally:
    mngr.close()


def restore_params(workdir: str, which: str = "teacher", step: int | None = None
                   ) -> tuple[mlc.ConfigDict, dict[str, Any], int]:
  """(config, params {'backbone', 'head'}, step) of the teacher or student of a workdir's latest
  (or given) checkpoint: what evaluation and export need."""
  if which not in ("teacher", "student"):
    raise ValueError(f"which={which!r}: expected 'teacher' or 'student'")
  config = load_config(workdir)
  step, state = restore_host(workdir, step)
  return config, state["teacher_params" if which == "teacher" else "params"], step
