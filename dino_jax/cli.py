"""What every `python -m dino_jax.<command>` shares: its log lines, its launch flags, its errors."""
from __future__ import annotations

import logging as py_logging
import os
import sys
from typing import Callable

import jax
from absl import app, flags, logging

from dino_jax.data import pipeline


class _OwnInfoOnly(py_logging.Filter):
  """INFO lines from dino_jax only; other libraries' (orbax logs every save step) from WARNING."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or f"{os.sep}dino_jax{os.sep}" in record.pathname


def quiet_library_logs() -> None:
  """Keeps dino_jax's INFO lines and the warnings of every library on absl's handler; processes
  other than 0 log warnings and errors only, so a launch of many processes logs its progress once.

  Call it after initialize_distributed: it reads this process's index.
  """
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
    handler.addFilter(_OwnInfoOnly())
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)


def define_distributed_flags() -> None:
  """--distributed / --coordinator_address / --num_processes / --process_id."""
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (TPU pods, SLURM, "
                    "multi-GPU hosts: the same command on every host).")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies "
                      "--distributed; needs --num_processes and --process_id).")
  flags.DEFINE_integer("num_processes", None, "Processes in a --coordinator_address launch.")
  flags.DEFINE_integer("process_id", None, "This process's index in that launch.")


def define_step_flag() -> None:
  """--step: which checkpoint of the workdir a command reads."""
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def define_data_path_flag() -> None:
  """--data_path of eval_knn and eval_linear (the release's): another labelled image folder."""
  flags.DEFINE_string("data_path", None, "An image folder with train/ and val/ class folders, "
                      "evaluated instead of the workdir's data.")


def use_data_path(config, path: str | None) -> None:
  """config's data, in place, as the folder at `path` (data.source 'folder', data.path), unless
  path is None. Raises FileNotFoundError naming a path that is not a directory or lacks a split,
  ValueError for train and eval splits of different class folders (pipeline.check_classes)."""
  if path is None:
    return
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--data_path {path!r}: no such directory")
  with config.unlocked():
    config.data.source, config.data.path = "folder", path
  pipeline.check_classes(config)


def initialize_distributed() -> None:
  """jax.distributed.initialize as the flags of define_distributed_flags ask (else nothing)."""
  f = flags.FLAGS
  if f.coordinator_address or f.distributed:
    jax.distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)


def run(main: Callable[[list[str]], None]) -> None:
  """app.run, with a misspelt --config.KEY reported in one line (exit code 2), not a traceback."""
  try:
    app.run(main)
  except (KeyError, AttributeError) as e:
    msg = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ")
    if "Did you mean" not in msg and "does not exist" not in msg:
      raise
    print(f"error: unknown config key {msg}", file=sys.stderr)
    sys.exit(2)
