"""Runs the notebooks in colabs/ top to bottom and stores them with their outputs.

  python colabs/execute.py                       # every notebook, its default settings
  python colabs/execute.py quickstart.ipynb --param TOTAL_STEPS=40

Each notebook runs in a fresh kernel on one CPU device (XLA_FLAGS dropped, JAX_PLATFORMS=cpu),
from WORKDIR_ROOT (its WORKDIR and pictures land there), and is written back in place with its
outputs, so that GitHub shows the pictures. With --param, the values are set in a cell after the
one tagged "parameters", as papermill does, and the notebook is written to --output instead.
tests/test_notebooks.py runs them through `execute` with small settings.
"""
from __future__ import annotations

import argparse
import ast
import os
import time

import nbclient
import nbformat

COLABS = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = ("quickstart.ipynb", "attention_heads.ipynb")
WORKDIR_ROOT = os.path.join(os.path.dirname(COLABS), "workdirs", "colabs")


def execute(name: str, params: dict | None = None, cwd: str = WORKDIR_ROOT,
            timeout: int = 1800) -> tuple[nbformat.NotebookNode, float]:
  """Executes colabs/<name> in `cwd`, with `params` set after its parameters cell.

  Returns (the executed notebook, seconds). Any cell's error raises nbclient's CellExecutionError
  with the cell and its traceback. The kernel inherits this process's environment.
  """
  nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
  if params:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
      raise ValueError(f"{name}: expected one cell tagged 'parameters', found {len(tagged)}")
    injected = nbformat.v4.new_code_cell("# Parameters injected by colabs/execute.py\n" + "\n".join(
        f"{k} = {v!r}" for k, v in params.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(tagged[0] + 1, injected)
  os.makedirs(cwd, exist_ok=True)
  client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                   resources={"metadata": {"path": cwd}})
  t0 = time.perf_counter()
  client.execute()
  return nb, time.perf_counter() - t0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("names", nargs="*", default=list(NOTEBOOKS), help="notebooks in colabs/")
  parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                      help="a parameter (a Python literal) set after the parameters cell")
  parser.add_argument("--output", default=None,
                      help="folder for the executed copies (needed with --param)")
  args = parser.parse_args()
  params = {}
  for item in args.param:
    key, sep, value = item.partition("=")
    if not sep:
      parser.error(f"--param {item!r}: expected KEY=VALUE")
    try:
      params[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      params[key] = value
  if params and args.output is None:
    parser.error("--param needs --output: the stored notebooks hold their default settings' run")
  if args.output:
    os.makedirs(args.output, exist_ok=True)
  os.environ.pop("XLA_FLAGS", None)
  os.environ["JAX_PLATFORMS"] = "cpu"
  for name in args.names:
    nb, seconds = execute(name, params)
    out = os.path.join(args.output or COLABS, name)
    nbformat.write(nb, out)
    print(f"{name}: {seconds:.0f} s -> {out}")


if __name__ == "__main__":
  main()
