"""Workdir checkpoints: orbax CheckpointManager over the TrainState.

A workdir holds config.json and checkpoints/<step>/{state, topology}. Every process calls
save/restore (orbax writes each process's shards); restoring into an abstract state with
shardings lays the arrays out on the current mesh, whatever mesh and processes wrote them.
`topology` (JSON: processes, devices, mesh) tells a resumed run what changed. The input needs no
state: its position follows from the step (data/pipeline.py). The linear probe keeps its own
(`probe_manager`) in eval/linear_checkpoints_<which>/<epoch>/{state, history}.
"""
from __future__ import annotations

from typing import Any

import grain
import jax
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from dino_jax import config as config_lib
from dino_jax import paths


class UnreadableCheckpoint(RuntimeError):
  """The latest checkpoint of a workdir cannot be restored; nothing in the workdir was changed."""


def manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """CheckpointManager on workdir/checkpoints with items 'state' and (optionally) 'topology'.

  read_only: a manager for restoring only, which neither creates, saves nor deletes. (Its options
  are set to that directly rather than through orbax's read_only flag, which logs four warnings
  on every manager it builds.)
  """
  if read_only:
    options = ocp.CheckpointManagerOptions(create=False, save_interval_steps=0,
                                           enable_async_checkpointing=False)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
  # "data": the input iterator's state, which checkpoints written before the input became a
  # function of the step hold; known to the manager so that reading them stays quiet, never read.
  return ocp.CheckpointManager(
      paths.path(workdir) / "checkpoints", options=options,
      item_names=("state", "topology", "data"),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "topology": ocp.JsonCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()})


def topology(mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """What a checkpoint records of the run that wrote it: processes, devices, mesh axes."""
  return {"processes": jax.process_count(), "devices": jax.device_count(),
          "mesh": {k: int(v) for k, v in mesh.shape.items()}}


def probe_manager(directory: str, keep: int = 2) -> ocp.CheckpointManager:
  """The linear probe's CheckpointManager on `directory`: items 'state' (its classifier and
  optimizer) and 'history' (JSON, its per-epoch rows), one step per epoch, the last `keep` kept."""
  return ocp.CheckpointManager(paths.path(directory),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep),
                               item_names=("state", "history"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any,
         run_topology: dict[str, Any] | None = None) -> None:
  """Saves asynchronously (returns once the arrays are copied off the devices)."""
  items = {"state": ocp.args.StandardSave(state)}
  if run_topology is not None:
    items["topology"] = ocp.args.JsonSave(run_topology)
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


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
            ) -> tuple[int, Any] | None:
  """Restores the latest checkpoint (or `step`) into abstract_state's shardings.

  Returns (step, state), or None when there is no checkpoint. Raises UnreadableCheckpoint, in one
  line naming the checkpoint, the reason and what starts afresh, when it cannot be read: a run
  never starts over beside checkpoints it could not read.
  """
  if step is None:
    step = mngr.latest_step()
    if step is None:
      return None
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
  except Exception as e:  # pylint: disable=broad-except
    reason = (str(e).splitlines() or [""])[0]
    raise UnreadableCheckpoint(
        f"checkpoint {paths.path(mngr.directory) / str(step)} cannot be read into this config's "
        f"state ({type(e).__name__}: {reason}). Nothing was changed; to start afresh, give a new "
        "--workdir") from e
  return step, restored["state"]


def saved_topology(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
  """The topology a checkpoint was written on (None for checkpoints without one)."""
  if not (paths.path(mngr.directory) / str(step) / "topology").exists():
    return None
  return dict(mngr.restore(step, args=ocp.args.Composite(
      topology=ocp.args.JsonRestore()))["topology"])


def save_config(workdir: str, config: mlc.ConfigDict) -> None:
  paths.write_text(paths.path(workdir) / "config.json", config_lib.to_json(config))


def load_config(workdir: str) -> mlc.ConfigDict:
  """The resolved config a workdir was trained (or imported) with."""
  paths.check(workdir)
  path = paths.path(workdir) / "config.json"
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
    if step not in mngr.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {workdir}/checkpoints (steps: "
                              f"{', '.join(map(str, sorted(mngr.all_steps())))})")
    tree = mngr.item_metadata(step)["state"]
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree)
    return step, mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
  finally:
    mngr.close()


def init_from(state: Any, workdir: str, state_sh: Any) -> Any:
  """Student, teacher, centre and BatchNorm statistics from another workdir's latest checkpoint;
  fresh optimizer state and step."""
  _, source = restore_host(workdir)
  copied = {}
  for name in ("params", "teacher_params", "center", "batch_stats", "teacher_batch_stats"):
    old = getattr(state, name)
    new = source.get(name, {})
    flat_new = dict(jax.tree_util.tree_flatten_with_path(new)[0])
    flat_old, treedef = jax.tree_util.tree_flatten_with_path(old)
    for path, x in flat_old:
      if path not in flat_new or flat_new[path].shape != x.shape:
        got = flat_new[path].shape if path in flat_new else "missing"
        raise ValueError(f"config.init_from={workdir}: {name}{jax.tree_util.keystr(path)} has "
                         f"shape {got}, this model needs {x.shape}")
    host = [np.asarray(flat_new[path], x.dtype) for path, x in flat_old]
    # Laid out from this process's host copy: every process holds the whole checkpoint.
    leaves = [jax.make_array_from_callback(h.shape, sh, lambda idx, h=h: h[idx])
              for h, sh in zip(host, jax.tree.leaves(getattr(state_sh, name)))]
    copied[name] = jax.tree_util.tree_unflatten(treedef, leaves)
  logging.info("initialised student, teacher, centre and BN statistics from %s", workdir)
  return state.replace(**copied)


def restore_network(workdir: str, which: str = "teacher", step: int | None = None
                    ) -> tuple[mlc.ConfigDict, dict[str, Any], dict[str, Any], int]:
  """(config, params {'backbone', 'head'}, batch_stats, step) of the teacher or student of a
  workdir's latest (or given) checkpoint: what evaluation and export need; batch_stats are the
  network's BatchNorm statistics ({'backbone'?, 'head'?}, {} without BN)."""
  if which not in ("teacher", "student"):
    raise ValueError(f"which={which!r}: expected 'teacher' or 'student'")
  config = load_config(workdir)
  step, state = restore_host(workdir, step)
  prefix = "teacher_" if which == "teacher" else ""
  return config, state[prefix + "params"], state.get(prefix + "batch_stats") or {}, step
