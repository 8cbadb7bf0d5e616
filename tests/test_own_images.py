"""Training on your own folder of images: the main job's config and configs/vit_small_folder.py
on generated JPEGs of many sizes, in the three layouts a folder may have (flat; class folders
without splits; train/ and val/ class folders), corrupt files among them; pipeline.resolve's
choices; the collapse warnings against their thresholds computed by hand."""
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys

import ml_collections as mlc
import numpy as np
import pytest
import runs
from helpers import tiny_flags
from PIL import Image

from dino_jax import checkpoint
from dino_jax import config as config_lib
from dino_jax import diagnostics
from dino_jax.data import pipeline
from dino_jax.data.augment import normalize
from dino_jax.evaluate import plots
from dino_jax.models import build_models

FOLDER_CONFIG = os.path.join(runs.REPO, "configs/vit_small_folder.py")


def write_images(folder, n: int, seed: int, colour=None) -> None:
  """n JPEGs of random sizes (24-90 px a side) under folder: noise, or noise around an RGB
  colour (a class anyone can tell apart)."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  for i in range(n):
    h, w = rng.integers(24, 91, 2)
    if colour is None:
      pixels = rng.integers(0, 256, (h, w, 3))
    else:
      pixels = np.clip(np.array(colour) + rng.normal(0, 20, (h, w, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i:03d}.jpg"))


def write_corrupt(folder) -> None:
  """Two files named as images that PIL cannot decode: text, and a JPEG cut short."""
  with open(os.path.join(folder, "not_an_image.jpg"), "wb") as f:
    f.write(b"not an image")
  good = sorted(p for p in os.listdir(folder) if p[0].isdigit())[0]
  with open(os.path.join(folder, good), "rb") as f:
    head = f.read(300)
  with open(os.path.join(folder, "truncated.jpg"), "wb") as f:
    f.write(head)


def labelled(root, split: str, n: int, seed: int) -> None:
  """root/split/{red,blue}/*.jpg, n images each ('' split: root/{red,blue}/)."""
  for i, (name, colour) in enumerate((("blue", (40, 40, 200)), ("red", (200, 40, 40)))):
    write_images(os.path.join(root, split, name), n, seed + i, colour)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("own_images")
  write_images(root / "flat", 40, 0)
  write_corrupt(root / "flat")
  labelled(root / "imagenet", "train", 24, 1)
  labelled(root / "imagenet", "val", 8, 3)
  labelled(root / "classes", "", 20, 5)
  write_images(root / "unlabelled_splits" / "train", 40, 7)
  write_images(root / "unlabelled_splits" / "val", 8, 8)
  return root


def default_on(path) -> mlc.ConfigDict:
  """configs/default.py pointed at a folder, as on the command line."""
  return config_lib.from_file(runs.DEFAULT_CONFIG, ["data.source=folder", f"data.path={path}"])


@pytest.mark.parametrize("layout, evaluates, reason", [
    ("flat", False, "flat/val"),
    ("classes", False, "classes/val"),
    ("unlabelled_splits", False, "no class folders"),
    ("imagenet", True, None),
])
def test_resolve_moves_crops_to_the_host_and_keeps_evaluation_only_with_labels(
    folders, caplog, layout, evaluates, reason):
  """The main job's config on a folder: crops on the host, one logged line; k-NN kept for train/
  and val/ class folders, else turned off with one logged line naming why (the closing
  evaluation stays, for the attention picture); a second resolve changes and logs nothing;
  validate then passes."""
  config = default_on(folders / layout)
  with caplog.at_level(logging.INFO, logger="absl"):
    pipeline.resolve(config)
  lines = [r.getMessage() for r in caplog.records]
  assert config.aug.crops_on_device is False
  assert sum("crops are made on the host" in line for line in lines) == 1, lines
  assert config.eval.knn is evaluates and config.eval.after_training
  skipped = [line for line in lines if "no k-NN evaluation" in line]
  assert len(skipped) == (0 if evaluates else 1), lines
  if reason:
    assert reason in skipped[0], skipped
  before = config.to_dict()
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="absl"):
    pipeline.resolve(config)
  assert not caplog.records and config.to_dict() == before
  pipeline.validate(config)


def test_resolve_leaves_the_main_job_untouched():
  config = config_lib.from_file(runs.DEFAULT_CONFIG)
  before = config.to_dict()
  pipeline.resolve(config)
  assert config.to_dict() == before and config.aug.crops_on_device


def test_crops_on_device_without_resolve_names_the_flag(folders):
  with pytest.raises(ValueError, match="config.aug.crops_on_device=False"):
    pipeline.validate(default_on(folders / "flat"))


def test_train_and_val_with_different_classes_fail_naming_both(tmp_path):
  labelled(tmp_path, "train", 16, 0)
  write_images(tmp_path / "val" / "green", 4, 9, (40, 200, 40))
  config = default_on(tmp_path)
  pipeline.resolve(config)
  with pytest.raises(ValueError, match=r"(?s)train.*val.*different class folders.*green"):
    pipeline.validate(config)


def train(config_path, workdir, *flags, devices=1):
  proc = subprocess.run(
      [sys.executable, "-m", "dino_jax.train", "--config", config_path, "--workdir",
       str(workdir), *flags], env=runs.env(devices), cwd=runs.REPO, capture_output=True,
      text=True, timeout=600)
  return proc


def test_main_job_trains_on_a_flat_folder_of_mixed_sizes(folders, tmp_path):
  """The README's command on a flat folder: it trains (crops on the host, k-NN skipped, each said
  in one line), the two undecodable files are skipped and logged, the logged steps are finite,
  and the closing evaluation draws the attention maps of the first training images (as the
  evaluation transform gives them, the heads' maps computed here independently); eval_knn on the
  workdir then fails in one line naming the missing val/ folder."""
  proc = train(runs.DEFAULT_CONFIG, tmp_path, "--config.data.source=folder",
               f"--config.data.path={folders / 'flat'}", "--config.total_steps=2",
               "--config.log_every_steps=1", "--config.checkpoint_every_steps=2")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "crops are made on the host" in proc.stderr
  assert "no k-NN evaluation" in proc.stderr
  assert "skipped undecodable image" in proc.stderr
  for name in ("not_an_image.jpg", "truncated.jpg"):
    assert name in proc.stderr
  rows = runs.metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2]
  assert all(math.isfinite(r["loss"]) for r in rows)
  assert os.path.isdir(tmp_path / "checkpoints" / "2")
  assert not os.path.exists(tmp_path / "eval" / "knn.json")
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  assert saved["aug"]["crops_on_device"] is False and saved["eval"]["knn"] is False
  n = saved["eval"]["attention_images"]
  assert f"over the first {n} images of 'train'" in proc.stderr
  # The same picture from the teacher's last-block attention, computed here by the ViT's apply.
  config, params, _, _ = checkpoint.restore_network(str(tmp_path))
  vit = build_models(config)[1].backbone
  images = next(iter(pipeline.eval_batches(config, "train", n)))["image"]
  attn = vit.apply({"params": params["backbone"]}, normalize(images),
                   method="get_last_selfattention")
  g = images.shape[1] // vit.patch_size
  maps = np.asarray(attn)[:, :, 0, 1:].reshape(n, -1, g, g)
  plots.plot_grid(tmp_path / "want.png", images, maps, vit.patch_size, 0.6)
  want = np.asarray(Image.open(tmp_path / "want.png"))
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "eval" / "attention.png")), want)
  # eval_knn on that workdir says in one line why it cannot run.
  proc = subprocess.run([sys.executable, "-m", "dino_jax.eval_knn", "--workdir", str(tmp_path)],
                        env=runs.env(1), cwd=runs.REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert f"no folder '{folders / 'flat' / 'val'}'" in proc.stderr.splitlines()[-1]


def test_main_job_on_train_and_val_class_folders_scores_knn(folders, tmp_path):
  """ImageNet's layout: the closing k-NN runs on val/ with train/ as the bank. Red and blue noise
  are told apart by any network, the random init included: a k-NN that mixed up the folders'
  labels would score about 50 %."""
  proc = train(runs.DEFAULT_CONFIG, tmp_path, "--config.data.source=folder",
               f"--config.data.path={folders / 'imagenet'}", "--config.total_steps=2",
               "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
               "--config.eval.nb_knn=(5,10)")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "no k-NN evaluation" not in proc.stderr
  with open(tmp_path / "eval" / "knn.json") as f:
    knn = json.load(f)
  assert set(knn["top1"]) == {"5", "10"}
  assert knn["top1"]["10"] >= 90 and knn["random_init"]["top1"]["10"] >= 90, knn


def test_folder_config_trains_a_tiny_model_end_to_end(folders, tmp_path):
  """configs/vit_small_folder.py as written (folder source, bf16, gradient accumulation over 8
  micro-batches, host crops, draft JPEG decoding) with the model and crops shrunk: it trains,
  prints the collapse diagnostics' explanation and skips the evaluation of a flat folder."""
  flags = tiny_flags(data__workers=0, total_steps=3, log_every_steps=1,
                     checkpoint_every_steps=3, data__eval_resize=18)
  flags = [f for f in flags if not f.startswith("--config.data.s")]  # keep the folder source
  proc = train(f"{FOLDER_CONFIG}:20000", tmp_path, *flags,
               f"--config.data.path={folders / 'flat'}")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "collapse diagnostics in each log line" in proc.stderr
  assert "no k-NN evaluation" in proc.stderr
  rows = runs.metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(math.isfinite(r["loss"]) and r["kl"] >= -1e-3 for r in rows), rows
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  assert (saved["grad_accum_steps"], saved["model"]["dtype"], saved["epochs"]) == (
      8, "bfloat16", 800)


def test_folder_config_without_a_path_fails_before_compiling_naming_the_key(tmp_path):
  proc = train(FOLDER_CONFIG, tmp_path / "w")
  assert proc.returncode != 0
  assert "config.data.path" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_folder_config_table_by_number_of_images():
  """get_config(N), as `--config configs/vit_small_folder.py:N` calls it: TABLE's row for N, and
  the steps the trainer makes of it at batch 256."""
  spec = importlib.util.spec_from_file_location("vit_small_folder", FOLDER_CONFIG)
  folder_config = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(folder_config)
  for n, want in ((10_000, (800, 30, 4096)), (29_999, (800, 30, 4096)),
                  (30_000, (400, 20, 8192)), (250_000, (200, 10, 16384)),
                  (1_000_000, (100, 10, 32768))):
    c = folder_config.get_config(str(n))
    assert (c.epochs, c.warmup_epochs, c.out_dim) == want, n
    per_epoch, total = config_lib.steps(c, n)
    assert per_epoch == n // 256 and total == want[0] * (n // 256)
  assert folder_config.get_config().out_dim == 16384  # the 100k row
  with pytest.raises(ValueError, match="'50k'.*number of images"):
    folder_config.get_config("50k")
  config_lib.validate(folder_config.get_config(), num_devices=1)


def test_collapse_warnings_at_their_thresholds():
  """Thresholds by hand: K = 4096, ln K = 8.318; uniform above 0.95 ln K = 7.902, one-hot below
  0.05 ln K = 0.416."""
  k = 4096
  healthy = {"entropy": 4.0, "batch_entropy": 7.0}
  assert diagnostics.collapse_warning(healthy, k) is None
  assert "uniform collapse" in diagnostics.collapse_warning({**healthy, "entropy": 7.91}, k)
  assert diagnostics.collapse_warning({**healthy, "entropy": 7.89}, k) is None
  one_hot = diagnostics.collapse_warning({**healthy, "batch_entropy": 0.41}, k)
  assert "one-hot collapse" in one_hot and "center_momentum" in one_hot
  assert diagnostics.collapse_warning({**healthy, "batch_entropy": 0.42}, k) is None
  assert "8.32" in diagnostics.explain(k) and "7.90" in diagnostics.explain(k)
