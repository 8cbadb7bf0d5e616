"""ONNX export of the backbone (export_torch --format onnx): onnxruntime on the file gives
dino_jax's features, at two batch sizes through the one dynamic batch axis."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from dino_jax.convert import exporting, importing
from dino_jax.convert.state_dicts import flax_to_torch
from dino_jax.models import build_vit

# pylint: disable=g-import-not-at-top,wrong-import-position
from helpers import tiny_config
from test_convert import error_message
from test_vit_timm import rel_err
# pylint: enable=g-import-not-at-top,wrong-import-position

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("transformers")

SIZE = 16  # the tiny config's ViT: patch 4, D 32, 2 blocks, 2 heads
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where python -m runs


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(workdir, path of its .onnx export, the backbone, its params): random weights of the tiny
  ViT in a workdir (import_torch of a .pth), exported by the command as documented (the format
  from the output's extension)."""
  root = tmp_path_factory.mktemp("onnx")
  net = build_vit("vit_custom", 4, embed_dim=32, depth=2, num_heads=2, img_size=SIZE)
  params = jax.jit(net.init)(jax.random.PRNGKey(0), np.zeros((1, SIZE, SIZE, 3)))["params"]
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in flax_to_torch(params).items()},
             root / "weights.pth")
  importing.import_weights(str(root / "weights.pth"), str(root / "workdir"), config=tiny_config())
  path = str(root / "backbone.onnx")
  proc = subprocess.run(
      [sys.executable, "-m", "dino_jax.export_torch", f"--workdir={root / 'workdir'}",
       f"--output={path}"], capture_output=True, text=True, cwd=REPO,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout) == {"path": path, "format": "onnx", "step": 0}
  return str(root / "workdir"), path, net, params


def test_onnxruntime_gives_our_features_at_two_batch_sizes(exported):
  """features = model.apply's final-LN [CLS] and tokens = the final-LN tokens, within 1e-5 of
  dino_jax (float32), for batches of 1 and 3 from one file."""
  _, path, net, params = exported
  session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  (inp,) = session.get_inputs()
  assert inp.name == "pixel_values" and inp.shape[1:] == [3, SIZE, SIZE]
  assert isinstance(inp.shape[0], str)  # symbolic: any batch
  assert [o.name for o in session.get_outputs()] == ["features", "tokens"]
  for batch in (1, 3):
    x = np.random.default_rng(batch).normal(size=(batch, SIZE, SIZE, 3)).astype(np.float32)
    features, tokens = session.run(None, {"pixel_values": x.transpose(0, 3, 1, 2)})
    assert features.shape == (batch, 32) and tokens.shape == (batch, (SIZE // 4) ** 2 + 1, 32)
    assert rel_err(features, net.apply({"params": params}, x)) <= 1e-5
    ours = net.apply({"params": params}, x, method=net.get_intermediate_layers)[0]
    assert rel_err(tokens, ours) <= 1e-5


def test_onnx_errors_in_one_line(exported, tmp_path, monkeypatch):
  """The head has no place in the graph; without onnxscript the message names the extra."""
  workdir = exported[0]
  msg = error_message(lambda: exporting.export(workdir, str(tmp_path / "h.onnx"), fmt="onnx",
                                               with_head=True))
  assert "backbone only" in msg
  monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript raises ImportError
  msg = error_message(lambda: exporting.export(workdir, str(tmp_path / "b.onnx"), fmt="onnx"),
                      ImportError)
  assert "pip install -e '.[onnx]'" in msg and "\n" not in msg
  assert not (tmp_path / "b.onnx").exists()
