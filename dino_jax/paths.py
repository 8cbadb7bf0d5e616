"""Workdirs and output paths: local paths and URIs (gs://bucket/dir) alike, through etils.epath.

Every file dino_jax reads or writes under a workdir or an output path goes through here or through
libraries that take the same paths (orbax, grain). A URI's filesystem client is an extra
(`pip install -e '.[gcs]'` for gs://); `check` names it before anything is written.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from etils import epath

# URI scheme -> (the module etils.epath reads it with, the dino_jax extra that installs it).
CLIENTS = {"gs": ("gcsfs", "gcs")}


def is_uri(path: str | os.PathLike) -> bool:
  return "://" in str(path)


def path(p: str | os.PathLike) -> epath.Path:
  """A local path made absolute (orbax rejects relative ones), a URI as it is."""
  return epath.Path(p if is_uri(p) else os.path.abspath(p))


def check(p: str | os.PathLike) -> None:
  """Raises ValueError, in one line, when p's filesystem is unknown, its client is not installed
  (naming what to install) or its bucket does not exist. Local paths always pass."""
  if not is_uri(p):
    return
  scheme = str(p).split("://", 1)[0]
  if scheme not in CLIENTS:
    raise ValueError(f"{p}: {scheme}:// is not supported; use a local path or one of "
                     f"{', '.join(s + '://' for s in CLIENTS)}")
  module, extra = CLIENTS[scheme]
  if importlib.util.find_spec(module) is None:
    raise ValueError(f"{p}: {scheme}:// paths need the {module} client: "
                     f"pip install -e '.[{extra}]'")
  bucket = f"{scheme}://{str(p).split('://', 1)[1].split('/', 1)[0]}"
  try:
    found = epath.Path(bucket).exists()
  except Exception as e:  # pylint: disable=broad-except  # credentials, network, ...
    raise ValueError(f"{p}: {bucket} cannot be reached ({type(e).__name__}: "
                     f"{(str(e).splitlines() or [''])[0]})") from e
  if not found:
    raise ValueError(f"{p}: the bucket {bucket} does not exist (it is not created for you)")


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
  """Writes a file whole, creating its local directory. An object store has no directories, and
  gcsfs's makedirs would create a missing (misspelt) bucket: a URI's bucket must exist."""
  uri, p = is_uri(p), path(p)
  if not uri:
    p.parent.mkdir(parents=True, exist_ok=True)
  p.write_bytes(data)


def write_text(p: str | os.PathLike, text: str) -> None:
  write_bytes(p, text.encode())


def write_json(p: str | os.PathLike, data: Any) -> None:
  write_text(p, json.dumps(data, indent=2))


def read_bytes(p: str | os.PathLike) -> bytes:
  return path(p).read_bytes()


def read_text(p: str | os.PathLike) -> str:
  return path(p).read_text()


def exists(p: str | os.PathLike) -> bool:
  return path(p).exists()
