"""The notebooks in colabs/ run top to bottom (nbclient, a fresh kernel, one CPU device) with small
settings injected after their "parameters" cell, as papermill does; any cell's error fails the test.

Each test prints how long its notebook took and where its figures are (run with -s to see it; the
attention grid stays under pytest's tmp_path).
"""
import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "colabs"))
import execute  # noqa: E402  (colabs/execute.py: what stores the notebooks with their outputs)


def run_notebook(name: str, params: dict, tmp_path, monkeypatch) -> tuple[object, float]:
  """Executes colabs/<name> in tmp_path with `params` set after its parameters cell.

  The kernel sees one CPU device: the test session's XLA_FLAGS (8 virtual devices, conftest) are
  not passed on. The executed copy, outputs included, is left in tmp_path for a look.
  """
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb, seconds = execute.execute(name, params, cwd=str(tmp_path), timeout=900)
  nbformat.write(nb, str(tmp_path / name))
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


@pytest.mark.parametrize("name", execute.NOTEBOOKS)
def test_stored_notebooks_show_their_outputs(name):
  """The notebooks are stored executed (colabs/execute.py), so that a reader on GitHub sees the
  pictures: every code cell ran, in order, none failed, and at least one picture is kept."""
  nb = nbformat.read(os.path.join(execute.COLABS, name), as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), name
  outputs = [o for c in code for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"], name
  assert any("image/png" in o.get("data", {}) for o in outputs), name
