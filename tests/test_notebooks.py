"""The notebooks in colabs/ run top to bottom (nbclient, a fresh kernel, one CPU device) with small
settings injected after their "parameters" cell, as papermill does; any cell's error fails the test.

Each test prints how long its notebook took and where its figures are (run with -s to see it; the
attention grid stays under pytest's tmp_path).
"""
import json
import os
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_notebook(name: str, params: dict, tmp_path, monkeypatch) -> tuple[object, float]:
  """Executes colabs/<name> in tmp_path with `params` set after its parameters cell.

  Returns (the executed notebook, seconds). The kernel sees one CPU device: the test session's
  XLA_FLAGS (8 virtual devices, conftest) are not passed on.
  """
  nb = nbformat.read(os.path.join(REPO, "colabs", name), as_version=4)
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters', found {len(tagged)}"
  source = "# Parameters injected by tests/test_notebooks.py\n" + "\n".join(
      f"{k} = {v!r}" for k, v in params.items())
  injected = nbformat.v4.new_code_cell(source)
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(tagged[0] + 1, injected)
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  t0 = time.perf_counter()
  client.execute()  # raises CellExecutionError (with the cell and its traceback) on any error
  seconds = time.perf_counter() - t0
  nbformat.write(nb, str(tmp_path / name))  # the executed copy, outputs included, for a look
  return nb, seconds


def test_attention_heads_notebook(tmp_path, monkeypatch, capsys):
  """Trains the embedded-data ViT for a few steps, then draws every head (trained and random init)
  and scores the masks against the objects."""
  grid = tmp_path / "attention_heads_grid.png"
  nb, seconds = run_notebook("attention_heads.ipynb", dict(
      WORKDIR=str(tmp_path / "workdir"), TRAIN_STEPS=40, BATCH_SIZE=32, TRAIN_IMAGES=512,
      EVAL_IMAGES=128, NUM_IMAGES=3, GRID_PNG=str(grid)), tmp_path, monkeypatch)
  assert grid.stat().st_size > 0
  text = _stream_text(nb)
  assert "Jaccard, best head" in text and "random init" in text
  with capsys.disabled():
    print(f"\nattention_heads.ipynb: {seconds:.0f} s; attention grid: {grid}")


def test_quickstart_notebook(tmp_path, monkeypatch, capsys):
  """Pretrains for a few steps, plots the curves, reads the k-NN results, and checks the teacher
  exported to timm against the JAX one (the notebook asserts the difference)."""
  workdir = tmp_path / "workdir"
  nb, seconds = run_notebook("quickstart.ipynb", dict(
      WORKDIR=str(workdir), TOTAL_STEPS=40, BATCH_SIZE=32, LOG_EVERY_STEPS=5, TRAIN_IMAGES=512,
      EVAL_IMAGES=128, NB_KNN=(10, 20)), tmp_path, monkeypatch)
  with open(workdir / "eval" / "knn.json") as f:
    assert set(json.load(f)["top1"]) == {"10", "20"}
  assert (workdir / "teacher.pth").stat().st_size > 0
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) >= 2  # the training curves and the attention grid
  assert "max |jax - timm|" in _stream_text(nb)
  with capsys.disabled():
    print(f"\nquickstart.ipynb: {seconds:.0f} s; attention grid: {workdir / 'eval' / 'attention.png'}")


def _stream_text(nb) -> str:
  return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", [])
                 if o.get("output_type") == "stream")
