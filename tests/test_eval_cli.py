"""The evaluation commands end to end on a tiny workdir of the embedded shapes data: eval_knn,
eval_linear (and its resume), visualize_attention (--workdir and --weights), and the main job's
report (report.run), each checked against a computation that bypasses the code under test."""
import json
import os
import shutil
import subprocess
import sys

import jax
import matplotlib
import numpy as np
import pytest
from PIL import Image

from dino_jax import checkpoint
from dino_jax import state as state_lib
from dino_jax.data.sources import make_source
from dino_jax.evaluate import features
from dino_jax.models import build_models, build_vit
import helpers
from test_knn import brute_force

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def tiny_config():
  return helpers.tiny_config(
      model__use_bn_in_head=True, eval__batch_size=16, eval__nb_knn=(5, 20),
      eval__attention_images=3, eval__compare_random_init=True, eval__linear_epochs=2,
      eval__linear_batch_size=32, eval__linear_lr=0.01,
      eval__linear_n_last_blocks=3)  # more than the depth: all blocks, as the release


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir whose checkpoint holds the fresh state of the config's seed, derived as
  train_and_evaluate derives it: its teacher *is* the random init."""
  config = tiny_config()
  wd = str(tmp_path_factory.mktemp("evalwd"))
  init = state_lib.init_fn(config)
  init_rng, _ = state_lib.seed_rngs(config.seed)
  checkpoint.save_config(wd, config)
  mngr = checkpoint.manager(wd)
  checkpoint.save(mngr, 3, jax.jit(init)(init_rng))
  mngr.wait_until_finished()
  mngr.close()
  return wd


def cli(name, *args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", f"dino_jax.{name}", *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-3000:]}"
  return proc.stdout


def teacher_features(wd, split):
  """[CLS] features straight from the source's images and the backbone, no pipeline or extract."""
  config, params, _, _ = checkpoint.restore_network(wd)
  source = make_source(config, split)
  images = np.stack([source[i]["image"] for i in range(len(source))])
  labels = np.array([source[i]["label"] for i in range(len(source))])
  vit = build_models(config)[1].backbone
  f = np.asarray(jax.jit(lambda p, x: vit.apply({"params": p}, x))(
      params["backbone"], (images / 255.0 - MEAN) / STD))
  return f / np.linalg.norm(f, axis=1, keepdims=True), labels, images, vit, params["backbone"]


def test_eval_knn_matches_brute_force(workdir):
  out = cli("eval_knn", "--workdir", workdir, "--nb_knn", "3", "7", "--temperature", "0.1")
  assert "3-NN top-1" in out
  with open(os.path.join(workdir, "eval", "knn.json")) as f:
    res = json.load(f)
  train_f, train_y, *_ = teacher_features(workdir, "train")
  test_f, test_y, *_ = teacher_features(workdir, "val")
  assert set(res) == {"top1", "top5"} and set(res["top1"]) == {"3", "7"}
  for k in (3, 7):
    pred = brute_force(train_f, train_y, test_f, k, 0.1, 6)
    assert res["top1"][str(k)] == pytest.approx(100 * np.mean(pred[:, 0] == test_y))
    top5 = (pred[:, :min(5, k)] == test_y[:, None]).any(1)  # the release's top-5 for k < 5
    assert res["top5"][str(k)] == pytest.approx(100 * np.mean(top5))


def test_step_names_the_checkpoint(workdir):
  """--step N reads checkpoint N; a step the workdir lacks fails in one line listing those it
  has (the workdir holds step 3 only)."""
  assert "k-NN, teacher at step 3" in cli("eval_knn", "--workdir", workdir, "--step", "3",
                                          "--nb_knn", "5")
  r = subprocess.run([sys.executable, "-m", "dino_jax.eval_knn", "--workdir", workdir, "--step",
                      "7"], capture_output=True, text=True, timeout=300)
  last = r.stderr.strip().splitlines()[-1]
  assert r.returncode != 0 and "no checkpoint of step 7" in last and "(steps: 3)" in last


def copies_folders(root):
  """root/same and root/swapped: train/<a|b|c>/ of 4 noise images each; val/ the same images,
  under their own class (same) or the next one (swapped)."""
  rng = np.random.default_rng(0)
  classes = ["a", "b", "c"]
  images = {c: [rng.integers(0, 256, (40, 48, 3), np.uint8) for _ in range(4)] for c in classes}
  for name, shift in (("same", 0), ("swapped", 1)):
    for i, c in enumerate(classes):
      for split in ("train", "val"):
        os.makedirs(root / name / split / c)
      for j, img in enumerate(images[c]):
        Image.fromarray(img).save(root / name / "train" / c / f"{j}.png")
        Image.fromarray(images[classes[(i + shift) % 3]][j]).save(
            root / name / "val" / c / f"{j}.png")


def test_eval_knn_on_another_folder(workdir, tmp_path):
  """--data_path: the bank and the queries come from that folder's train/ and val/ (copies of
  train images: 1-NN finds each one's own copy; filed under another class: none right), and the
  workdir's config stays as it was."""
  copies_folders(tmp_path)
  with open(os.path.join(workdir, "config.json")) as f:
    before = f.read()
  for root, want in (("same", 100.0), ("swapped", 0.0)):
    cli("eval_knn", "--workdir", workdir, "--data_path", str(tmp_path / root), "--nb_knn", "1")
    with open(os.path.join(workdir, "eval", "knn.json")) as f:
      assert json.load(f)["top1"]["1"] == want
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == before
  missing = str(tmp_path / "nowhere")
  r = subprocess.run([sys.executable, "-m", "dino_jax.eval_knn", "--workdir", workdir,
                      "--data_path", missing], capture_output=True, text=True)
  assert r.returncode != 0 and missing in r.stderr.strip().splitlines()[-1]
  # val/ with a class train/ lacks: labels would be indices of other classes; refused.
  os.rename(tmp_path / "same" / "val" / "c", tmp_path / "same" / "val" / "d")
  r = subprocess.run([sys.executable, "-m", "dino_jax.eval_knn", "--workdir", workdir,
                      "--data_path", str(tmp_path / "same")], capture_output=True, text=True)
  last = r.stderr.strip().splitlines()[-1]
  assert r.returncode != 0 and "different class folders (e.g. c, d)" in last, last


def test_eval_linear_writes_json_and_checkpoints(workdir):
  out = cli("eval_linear", "--workdir", workdir)
  with open(os.path.join(workdir, "eval", "linear.json")) as f:
    res = json.load(f)
  assert [r["epoch"] for r in res["per_epoch"]] == [0, 1]
  assert res["per_epoch"][0]["lr"] == pytest.approx(0.01 * 32 / 256)  # lr x batch / 256
  assert res["top1"] == res["per_epoch"][-1]["top1"] and 0 <= res["top5"] <= 100
  assert os.path.isdir(os.path.join(workdir, "eval", "linear_checkpoints_teacher", "2"))
  assert "top-1" in out


def test_eval_linear_on_another_folder_and_its_resume(workdir, tmp_path):
  """--data_path probes that folder's classes; a rerun on the workdir's own data does not resume
  that probe: it stops naming the data, and the probe's checkpoints stay."""
  wd = str(tmp_path / "wd")
  shutil.copytree(workdir, wd, ignore=shutil.ignore_patterns("eval"))
  copies_folders(tmp_path)
  cli("eval_linear", "--workdir", wd, "--data_path", str(tmp_path / "same"))
  with open(os.path.join(wd, "eval", "linear.json")) as f:
    res = json.load(f)
  assert len(res["per_epoch"]) == 2 and 0 <= res["top1"] <= 100
  r = subprocess.run([sys.executable, "-m", "dino_jax.eval_linear", "--workdir", wd],
                     capture_output=True, text=True, timeout=300)
  last = r.stderr.strip().splitlines()[-1]
  assert r.returncode != 0 and "other settings" in last and "'folder', now 'shapes'" in last
  assert os.path.isdir(os.path.join(wd, "eval", "linear_checkpoints_teacher", "2"))


def test_visualize_attention_from_workdir_and_weights(workdir, tmp_path):
  *_, images, vit, params = teacher_features(workdir, "val")
  Image.fromarray(images[0]).save(tmp_path / "img.png")
  outdir = tmp_path / "out"
  cli("visualize_attention", "--workdir", workdir, "--image", str(tmp_path / "img.png"),
      "--output", str(outdir), "--image_size", "32")
  names = {"img.png", "attention.png", "attn-head0.png", "attn-head1.png",
           "mask_th0.6_head0.png", "mask_th0.6_head1.png"}
  assert names <= set(os.listdir(outdir))
  # The head-0 PNG: 4 x 4 px blocks (nearest upsampling of the 8 x 8 grid) whose viridis colours
  # read back the independently computed [CLS] attention, min-max scaled (256 colour levels).
  resized = np.asarray(Image.fromarray(images[0]).resize((32, 32), Image.BILINEAR))
  attn = jax.jit(lambda p, x: vit.apply({"params": p}, x, method="get_last_selfattention"))(
      params, (resized[None] / 255.0 - MEAN) / STD)
  ref = np.asarray(attn)[0, 0, 0, 1:].reshape(8, 8)
  png = np.asarray(Image.open(outdir / "attn-head0.png"))[..., :3].astype(float)
  assert png.shape == (32, 32, 3)
  blocks = png.reshape(8, 4, 8, 4, 3)
  assert (blocks == blocks[:, :1, :, :1]).all()
  lut = matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255
  level = np.abs(blocks[:, 0, :, 0, None] - lut).sum(-1).argmin(-1)  # (8, 8) colour index
  expected = np.minimum(np.floor((ref - ref.min()) / (ref.max() - ref.min()) * 256), 255)
  assert np.abs(level - expected).max() <= 1
  # Without --image_size on this patch-4 network: 60 patches a side (240 px), not 480 px.
  Image.fromarray(images[0]).resize((40, 30)).save(tmp_path / "wide.png")
  out = cli("visualize_attention", "--workdir", workdir, "--image", str(tmp_path / "wide.png"),
            "--output", str(tmp_path / "out1"))
  assert "240x240 px" in out and "60x60 patch grid" in out

  # --weights: a backbone file in the release's key names (dino-reference.md), vit_tiny/16 shapes.
  import torch  # pylint: disable=g-import-not-at-top
  d, g = 192, torch.Generator().manual_seed(0)
  shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 197, d), "patch_embed.proj.weight":
            (d, 3, 16, 16), "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
  for i in range(12):
    for name, shape in (("norm1", (d,)), ("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)),
                        ("norm2", (d,)), ("mlp.fc1", (4 * d, d)), ("mlp.fc2", (d, 4 * d))):
      shapes[f"blocks.{i}.{name}.weight"] = shape
      shapes[f"blocks.{i}.{name}.bias"] = shape[:1]
  torch.save({k: 0.1 * torch.randn(v, generator=g) for k, v in shapes.items()}, tmp_path / "w.pth")
  out = cli("visualize_attention", "--weights", str(tmp_path / "w.pth"), "--arch", "vit_tiny",
            "--patch_size", "16", "--image", str(tmp_path / "img.png"), "--output",
            str(tmp_path / "out2"), "--image_size", "48", "--threshold", "0.5")
  assert "3 heads on a 3x3 patch grid" in out
  assert Image.open(tmp_path / "out2" / "attn-head2.png").size == (48, 48)
  assert (tmp_path / "out2" / "mask_th0.5_head2.png").exists()


def test_visualize_attention_eval_split_matches_numpy(workdir, tmp_path):
  """Without --image: the eval split's attention.json, against NumPy from the raw source: masks by
  the descending form of the rule (a patch is kept while the mass above it is < 60%)."""
  cli("visualize_attention", "--workdir", workdir, "--output", str(tmp_path))
  with open(os.path.join(workdir, "eval", "attention.json")) as f:
    att = json.load(f)
  assert (tmp_path / "attention.png").exists()
  *_, images, vit, params = teacher_features(workdir, "val")
  config = checkpoint.load_config(workdir)
  source = make_source(config, "val")
  obj = np.stack([source[i]["object_mask"] for i in range(len(source))])  # (B, 16, 16)
  attn = jax.jit(lambda p, x: vit.apply({"params": p}, x, method="get_last_selfattention"))(
      params, (images / 255.0 - MEAN) / STD)
  maps = np.asarray(attn)[:, :, 0, 1:].reshape(len(images), 2, 4, 4)

  def jaccard(m):  # m (B, 4, 4) -> per-image Jaccard of its 60% mask
    flat = m.reshape(len(m), -1)
    order = np.argsort(-flat, axis=1)
    shares = np.take_along_axis(flat, order, 1) / flat.sum(1, keepdims=True)
    above = np.cumsum(shares, 1) - shares
    keep = np.zeros_like(flat, bool)
    np.put_along_axis(keep, order, above < 0.6, 1)
    up = np.kron(keep.reshape(m.shape), np.ones((4, 4))).astype(bool)
    return (up & obj).sum((1, 2)) / (up | obj).sum((1, 2))

  per_head = [jaccard(maps[:, h]).mean() for h in range(2)]
  best = int(np.argmax(per_head))
  up_best = np.kron(maps[:, best], np.ones((4, 4)))
  assert att["per_head"] == pytest.approx(per_head, rel=1e-5)
  assert att["jaccard"] == pytest.approx(max(per_head), rel=1e-5)
  assert att["jaccard_head_mean"] == pytest.approx(np.mean(per_head), rel=1e-5)
  assert att["jaccard_mean_map"] == pytest.approx(jaccard(maps.mean(1)).mean(), rel=1e-5)
  assert att["mass_on_object"] == pytest.approx(
      ((up_best * obj).sum((1, 2)) / up_best.sum((1, 2))).mean(), rel=1e-5)
  assert att["object_area"] == pytest.approx(obj.mean(), rel=1e-6)


def test_report_trained_equals_random_init_for_a_fresh_checkpoint(workdir):
  """report.run's files, with exactly the keys the main job promises. The workdir's teacher is the
  seed's fresh init, so 'trained' and 'random_init' must agree to the last digit: this pins
  random_init_backbone to the trainer's init."""
  from dino_jax.evaluate import report  # pylint: disable=g-import-not-at-top
  report.run(tiny_config(), workdir)
  with open(os.path.join(workdir, "eval", "knn.json")) as f:
    knn = json.load(f)
  with open(os.path.join(workdir, "eval", "attention.json")) as f:
    att = json.load(f)
  assert set(knn) == {"top1", "top5", "random_init"} and set(knn["top1"]) == {"5", "20"}
  assert knn["random_init"] == {"top1": knn["top1"], "top5": knn["top5"]}
  assert set(att) == {"jaccard", "jaccard_head_mean", "per_head", "mass_on_object",
                      "object_area", "jaccard_mean_map", "random_init"}
  assert {"jaccard", "jaccard_head_mean", "mass_on_object"} <= set(att["random_init"])
  for key, value in att["random_init"].items():
    assert value == att[key], key
  assert len(att["per_head"]) == 2 and att["jaccard"] == max(att["per_head"])
  assert Image.open(os.path.join(workdir, "eval", "attention.png")).size[0] > 200


def test_evaluations_run_in_float32_whatever_the_training_dtype():
  """A bf16 run with cuDNN attention is evaluated as the release evaluates: float32 compute and
  an attention form that takes float32, on the same params."""
  config = tiny_config()
  config.model.dtype, config.model.attention = "bfloat16", "cudnn"
  backbone = features.evaluation_backbone(config)
  assert (backbone.dtype, backbone.attention) == (jax.numpy.float32, "xla")
  reference = build_vit("vit_custom", 4, embed_dim=32, depth=2, num_heads=2, img_size=16)
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  params = reference.init(jax.random.PRNGKey(0), x)["params"]
  np.testing.assert_allclose(backbone.apply({"params": params}, x),
                             reference.apply({"params": params}, x), rtol=1e-6, atol=1e-6)
