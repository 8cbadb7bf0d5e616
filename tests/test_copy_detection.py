"""Copy detection (dino_jax.evaluate.copy_detection, data/copydays.py, eval_copy_detection): the
average precision against the precision-recall area computed another way and by hand, GeM pooling
and the whitening against NumPy transcriptions of the release's, the Copydays command line end to
end against a NumPy pipeline of the release's protocol, and the embedded command line."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from dino_jax import checkpoint
from dino_jax.data import copydays, pipeline
from dino_jax.evaluate import copy_detection as cd
from dino_jax.models import build_models
import helpers
from test_eval_cli import MEAN, STD, cli, workdir  # noqa: F401  (workdir: a fixture)
from test_knn import random_params



def pr_area(retrieved, positives, k=20):
  """Average precision as the trapezoid area under the precision-recall curve of the first k
  retrieved items, cut by cut: precision 1 at zero retrieved, recall over all positives."""
  hits = np.isin(np.asarray(retrieved)[:k], list(positives)).astype(float)
  tp = np.concatenate([[0.0], np.cumsum(hits)])
  precision = np.concatenate([[1.0], tp[1:] / np.arange(1, len(hits) + 1)])
  recall = tp / len(positives)
  return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2))


def release_whitening(train, x):
  """utils.PCA(dim=F, whit=0.5) trained on cov = train^T train / n, applied to x - mean(train)."""
  d, v = np.linalg.eigh(train.T @ train / train.shape[0])
  eps = d.max() * 1e-5
  d[d < eps] = eps
  idx = np.argsort(d)[::-1]
  dvt = np.diag(1.0 / d[idx] ** 0.5) @ v[:, idx].T
  return (dvt @ (x - train.mean(0)).T).T


def gem_numpy(x, p=4.0):
  return np.mean(np.clip(x, 1e-6, None) ** p, axis=1) ** (1 / p)


def test_average_precision_by_hand_and_as_a_pr_area():
  # Positives at ranks 0 and 2 of 2: (1 + 1) / 2 / 2 + (1/2 + 2/3) / 2 / 2 = 19/24.
  assert cd.average_precision([0, 2], 2) == pytest.approx(19 / 24)
  # One of 2 positives, at rank 1: (0 + 1/2) / 2 / 2; the other not retrieved adds nothing.
  assert cd.average_precision([1], 2) == pytest.approx(1 / 8)
  rng = np.random.default_rng(0)
  ids = np.stack([rng.permutation(40)[:20] for _ in range(30)])
  positives = [rng.choice(40, rng.integers(1, 5), replace=False) for _ in range(30)]
  want = np.mean([pr_area(r, p) for r, p in zip(ids, positives)])
  assert cd.mean_average_precision(ids, positives) == pytest.approx(want, rel=1e-12)


def test_detect_ranks_the_top_20_by_dot_product():
  """No whitening: unit vectors on a circle, so the ranking is the angular distance; a positive
  ranked beyond 20 adds nothing (the release's topk(20))."""
  angles = np.linspace(0, 3, 60)
  database = np.stack([np.cos(angles), np.sin(angles)], 1)
  rng = np.random.default_rng(1)
  q_angles = rng.uniform(0, 3, 12)
  queries = 3 * np.stack([np.cos(q_angles), np.sin(q_angles)], 1)  # norms: normalised away
  positives = [rng.choice(60, 3, replace=False) for _ in range(12)]
  got = cd.detect({"a": queries[:5], "b": queries[5:]}, database, None,
                  {"a": positives[:5], "b": positives[5:]})
  order = np.argsort(np.abs(q_angles[:, None] - angles[None]), axis=1, kind="stable")
  aps = [pr_area(o, p) for o, p in zip(order, positives)]
  assert got["a"] == pytest.approx(100 * np.mean(aps[:5]))
  assert got["b"] == pytest.approx(100 * np.mean(aps[5:]))
  assert any(np.isin(p, o[20:]).any() for o, p in zip(order, positives))  # the cut matters


def test_whitening_matches_the_release():
  rng = np.random.default_rng(2)
  train = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) + rng.normal(size=12)
  x, y = rng.normal(size=(7, 12)), rng.normal(size=(5, 12))
  w = cd.learn_whitening(train)
  # Gram matrices: the same whatever the eigenvectors' signs. And dvt^T dvt = cov^-1 (whit 0.5).
  np.testing.assert_allclose(w(x) @ w(y).T, release_whitening(train, x)
                             @ release_whitening(train, y).T, rtol=1e-9, atol=1e-9)
  cov = train.T @ train / len(train)
  np.testing.assert_allclose(w.dvt.T @ w.dvt, np.linalg.inv(cov), rtol=1e-7, atol=1e-9)
  # Rank-deficient (more dimensions than images, a constant-zero one): eigenvalues clamped.
  low = np.concatenate([train[:6], np.zeros((6, 1))], 1)
  xl, yl = rng.normal(size=(4, 13)), rng.normal(size=(3, 13))
  wl = cd.learn_whitening(low)
  np.testing.assert_allclose(wl(xl) @ wl(yl).T, release_whitening(low, xl)
                             @ release_whitening(low, yl).T, rtol=1e-6)
  assert wl.energy == pytest.approx(1.0) and cd.learn_whitening(train, dim=4).energy < 0.99


def test_gem_pixels_and_copy_features_match_numpy():
  rng = np.random.default_rng(3)
  tokens = rng.normal(size=(3, 16, 8)).astype(np.float32)  # negatives: clamped at 1e-6
  np.testing.assert_allclose(cd.gem(tokens), gem_numpy(tokens), rtol=1e-5)
  images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  want = images.reshape(2, 4, 4, 4, 4, 3).mean((2, 4)).reshape(2, -1) / 255
  np.testing.assert_allclose(cd.pixel_features(images, 4), want, rtol=1e-6)

  vit = build_models(helpers.tiny_config())[1].backbone
  params = random_params(vit, (1, 16, 16, 3))
  tok = np.asarray(jax.jit(lambda p, x: vit.apply({"params": p}, x, 1,
                                                  method="get_intermediate_layers")[0])(
      params, (images / 255.0 - MEAN) / STD))
  want = np.concatenate([tok[:, 0], gem_numpy(tok[:, 1:].astype(np.float64))], 1)
  got = jax.jit(lambda p, x: cd.copy_features(vit, p, x))(params, images)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_copydays_layout_errors_and_batches(tmp_path):
  img = np.zeros((8, 8, 3), np.uint8)
  for d, name in (("original", "100000.jpg"), ("original", "100100.jpg"),
                  ("strong", "100001.jpg"), ("strong", "100101.jpg"),
                  ("jpegqual/50", "100000.jpg")):
    os.makedirs(tmp_path / d, exist_ok=True)
    Image.fromarray(img).save(tmp_path / d / name)
  with pytest.raises(ValueError, match="paired by position"):
    copydays.copydays(str(tmp_path), 8)
  Image.fromarray(img).save(tmp_path / "jpegqual/50/100100.jpg")
  Image.fromarray(img).save(tmp_path / "strong/109901.jpg")
  with pytest.raises(ValueError, match="109901.jpg"):
    copydays.copydays(str(tmp_path), 8)
  os.remove(tmp_path / "strong/109901.jpg")
  sets = copydays.copydays(str(tmp_path), 8)
  assert list(sets.queries) == ["original", "strong", "jpegqual/50"] and sets.whitening is None
  assert [p.tolist() for p in sets.positives["strong"]] == [[0], [1]]

  # Two processes: contiguous shares, as many batches each, the padding invalid.
  source = copydays.Images(5, lambda i: np.full((6, 4, 3), i, np.uint8), 4)
  shares = [list(pipeline.padded_share(source, 2, process_index=p, process_count=2))
            for p in range(2)]
  assert [len(s) for s in shares] == [2, 2]
  rows = [b["image"][b["valid"], 0, 0, 0].tolist() for s in shares for b in s]
  assert rows == [[0, 1], [2], [3, 4], []]


def fabricate_copydays(root, rng):
  """5 originals (smooth random images, 40 x 30), strong copies (1 to 2 each: flips and noise),
  jpegqual/30 and crops/50 blocks, distractors and whitening images (png, one .txt ignored)."""
  def image():
    small = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((30, 40), Image.BILINEAR))

  def save(folder, name, array, **kw):
    os.makedirs(root / folder, exist_ok=True)
    Image.fromarray(array).save(root / folder / name, **kw)

  blocks = {b: [] for b in ("original", "strong", "jpegqual/30", "crops/50")}
  for i in range(5):
    orig = image()
    save("original", f"{2000 + i}00.jpg", orig)
    save("jpegqual/30", f"{2000 + i}00.jpg", orig, quality=30)
    save("crops/50", f"{2000 + i}00.jpg", orig[5:33, 4:25])
    for c in range(1 + i % 2):
      copy = np.clip(orig[:, ::-1] + rng.normal(0, 20 * c, orig.shape), 0, 255).astype(np.uint8)
      save("strong", f"{2000 + i}{c + 1:02d}.jpg", copy)
  for j in range(8):
    save("distractors", f"d{j}.png", image())
  for j in range(40):
    save("whitening", f"w{j}.jpg", image())
  (root / "distractors" / "notes.txt").write_text("not an image")
  for b in blocks:
    blocks[b] = [str(root / b / n) for n in sorted(os.listdir(root / b))]
  return blocks


def test_copydays_cli_matches_numpy(workdir, tmp_path):  # noqa: F811
  blocks = fabricate_copydays(tmp_path, np.random.default_rng(4))
  out = cli("eval_copy_detection", "--workdir", workdir, "--data_path", str(tmp_path),
            "--imsize", "24", "--distractors_path", str(tmp_path / "distractors"),
            "--whitening_path", str(tmp_path / "whitening"), "--batch_size_per_gpu", "3")
  assert "strong mAP (%) <-" in out
  with open(os.path.join(workdir, "eval", "copy_detection.json")) as f:
    res = json.load(f)

  # The release's pipeline in NumPy: square bicubic resize, final-LN tokens of the last block,
  # [CLS] + GeM, whitening, L2, top 20 by dot product, AP of the copies.
  config, params, _, _ = checkpoint.restore_network(workdir)
  vit = build_models(config)[1].backbone
  tokens = jax.jit(lambda p, x: vit.apply({"params": p}, x, 1,
                                          method="get_intermediate_layers")[0])

  def feats(files):
    x = np.stack([np.asarray(Image.open(f).convert("RGB").resize((24, 24), Image.BICUBIC))
                  for f in files])
    t = np.asarray(tokens(params["backbone"], (x / 255.0 - MEAN) / STD), np.float64)
    return np.concatenate([t[:, 0], gem_numpy(t[:, 1:])], 1)

  distractors = [str(tmp_path / "distractors" / f"d{j}.png") for j in range(8)]
  whitening = feats(sorted(str(tmp_path / "whitening" / f) for f in
                           os.listdir(tmp_path / "whitening")))
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  db = unit(release_whitening(whitening, feats(blocks["original"] + distractors)))
  names = [os.path.basename(f) for f in blocks["original"]]
  want = {}
  for b, files in blocks.items():
    q = unit(release_whitening(whitening, feats(files)))
    order = np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :20]
    if b == "strong":  # the originals sharing the first 4 characters of the name
      pos = [[j for j, n in enumerate(names) if n[:4] == os.path.basename(f)[:4]] for f in files]
    else:
      pos = [[i] for i in range(len(files))]
    want[b] = 100 * np.mean([pr_area(o, p) for o, p in zip(order, pos)])
  assert list(res["mAP"]) == ["original", "strong", "jpegqual/30", "crops/50"]
  assert res["mAP"] == pytest.approx(want, abs=1e-4)
  assert res["images"] == {"queries": {"original": 5, "strong": 7, "jpegqual/30": 5,
                                       "crops/50": 5}, "database": 13, "whitening": 40}


def test_embedded_cli_trained_equals_random_init_for_a_fresh_checkpoint(workdir):  # noqa: F811
  """Plumbing: the three columns, the release's 20 blocks; the workdir's teacher is the seed's
  init, so 'trained' and 'random_init' agree; an original finds itself (mAP 100)."""
  out = cli("eval_copy_detection", "--workdir", workdir, "--embedded_originals", "10",
            "--embedded_distractors", "40", "--embedded_whitening", "120",
            "--batch_size_per_gpu", "16")
  assert "random init" in out and "baseline" in out
  with open(os.path.join(workdir, "eval", "copy_detection.json")) as f:
    res = json.load(f)
  assert set(res) == {"trained", "random_init", "baseline"}
  for name in res:
    assert list(res[name]["mAP"]) == list(copydays.BLOCKS)
    assert res[name]["mAP"]["original"] == pytest.approx(100.0)
    assert all(0 <= v <= 100 for v in res[name]["mAP"].values())
  assert res["trained"] == res["random_init"]
  sets = copydays.embedded(checkpoint.load_config(workdir), 16, originals=10, copies=15,
                           distractors=40, whitening=120)
  assert len(sets.queries["strong"]) == 15 and len(sets.database) == 50
  again = copydays.embedded(checkpoint.load_config(workdir), 16, originals=10, copies=15,
                            distractors=40, whitening=120)
  strong = [sets.queries["strong"][j]["image"] for j in (0, 10)]  # copies of original 0
  np.testing.assert_array_equal(strong[0], again.queries["strong"][0]["image"])  # seeded
  assert not np.array_equal(strong[0], strong[1])
