"""Image retrieval (evaluate/retrieval.py, data/revisited.py, eval_image_retrieval.py) against
transcriptions of the published definitions written here: revisitop's compute_ap / compute_map
(loops, as its python/evaluate.py), the release's Medium / Hard ground truth and multi_scale
(torch's own interpolate), PIL's thumbnail; and the command line end to end, on revisitop's layout
fabricated here and on the embedded shapes."""
import json
import os
import pickle

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from dino_jax import checkpoint
from dino_jax.data import revisited
from dino_jax.data.sources import make_source
from dino_jax.evaluate import retrieval
from dino_jax.models import build_models
from test_eval_cli import MEAN, STD, cli, tiny_config, workdir  # noqa: F401  (workdir: a fixture)
from test_knn import random_params


# ------------------------------------------------------------------------------------------------
# revisitop's evaluation, transcribed as published (python/evaluate.py): loops, 0-based ranks.
# ------------------------------------------------------------------------------------------------
def ref_compute_ap(ranks, nres):
  ap = 0.0
  for j, rank in enumerate(ranks):
    precision_0 = 1.0 if rank == 0 else j / rank
    precision_1 = (j + 1) / (rank + 1)
    ap += (precision_0 + precision_1) * (1.0 / nres) / 2.0
  return ap


def ref_compute_map(ranks, gnd, kappas):
  """ranks (N, Q) as revisitop takes them; gnd [{'ok', 'junk'}]."""
  nq = len(gnd)
  aps, prs = np.zeros(nq), np.zeros((nq, len(kappas)))
  m_ap, pr, nempty = 0.0, np.zeros(len(kappas)), 0
  for i in range(nq):
    qgnd = np.asarray(gnd[i]["ok"])
    if qgnd.shape[0] == 0:
      aps[i], prs[i] = np.nan, np.nan
      nempty += 1
      continue
    qgndj = np.asarray(gnd[i].get("junk", np.empty(0)))
    pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
    junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
    k = ij = 0
    if len(junk):
      ip = 0
      while ip < len(pos):
        while ij < len(junk) and pos[ip] > junk[ij]:
          k += 1
          ij += 1
        pos[ip] = pos[ip] - k
        ip += 1
    ap = ref_compute_ap(pos, len(qgnd))
    m_ap += ap
    aps[i] = ap
    pos = pos + 1
    for j, kappa in enumerate(kappas):
      kq = min(max(pos), kappa)
      prs[i, j] = (pos <= kq).sum() / kq
    pr = pr + prs[i]
  return m_ap / (nq - nempty), aps, pr / (nq - nempty), prs


def ref_revisited(ranks, gnd, kappas=(1, 5, 10)):
  """The release's two settings (eval_image_retrieval.py) over ref_compute_map, in percent."""
  out = {}
  for name, ok_keys, junk_keys in (("medium", ("easy", "hard"), ("junk",)),
                                   ("hard", ("hard",), ("junk", "easy"))):
    g = [{"ok": np.concatenate([q[k] for k in ok_keys]),
          "junk": np.concatenate([q[k] for k in junk_keys])} for q in gnd]
    m_ap, _, mpr, _ = ref_compute_map(ranks, g, kappas)
    out[name] = {"mAP": 100 * m_ap, **{f"mP@{k}": 100 * v for k, v in zip(kappas, mpr)}}
  return out


def test_compute_map_hand_case_and_revisitop():
  # Database 0..5 ranked 3, 0, 5, 1, 4, 2; positives {0, 1}, junk {5}. Positives at ranks 1 and 3,
  # the junk at 2 taken out: ranks 1 and 2. AP = ((0 + 1/2) / 2 + (1/2 + 2/3) / 2) / 2 = 5/12.
  # Last positive at 1-based rank 3: P@1 = 0/1, P@5 = P@10 = 2/3 (k capped at 3).
  ranking = np.array([[3, 0, 5, 1, 4, 2]])
  m_ap, aps, mpr, _ = retrieval.compute_map(ranking, [np.array([0, 1])], [np.array([5])])
  assert m_ap == pytest.approx(5 / 12) and aps[0] == pytest.approx(5 / 12)
  np.testing.assert_allclose(mpr, [0, 2 / 3, 2 / 3])
  assert ref_compute_map(ranking.T, [{"ok": np.array([0, 1]), "junk": np.array([5])}],
                         (1, 5, 10))[0] == pytest.approx(5 / 12)
  # Without the junk taken out the same ranking scores less: (1/4 + (1/3 + 1/2) / 2) / 2 = 1/3.
  assert retrieval.compute_map(ranking, [np.array([0, 1])])[0] == pytest.approx(1 / 3)

  rng = np.random.default_rng(0)
  q, n = 9, 40
  ranking = np.stack([rng.permutation(n) for _ in range(q)])
  gnd = []
  for i in range(q):
    items = rng.permutation(n)
    a, b, c = rng.integers(0, 6, 3)
    gnd.append({"easy": items[:a], "hard": items[a:a + b], "junk": items[a + b:a + b + c]})
  gnd[2]["easy"] = gnd[2]["hard"] = np.array([], np.int64)  # no positives: left out
  gnd[3]["hard"] = np.array([], np.int64)  # none in the Hard setting only
  got = retrieval.revisited_scores(ranking, gnd)
  want = ref_revisited(ranking.T, gnd)
  for setting in ("medium", "hard"):
    assert got[setting] == pytest.approx(want[setting], rel=1e-12), setting
  ok = [np.concatenate([g["easy"], g["hard"]]) for g in gnd]
  junk = [g["junk"] for g in gnd]
  _, aps, _, prs = retrieval.compute_map(ranking, ok, junk, (1, 3, 7))
  _, ref_aps, _, ref_prs = ref_compute_map(ranking.T, [{"ok": o, "junk": j}
                                                       for o, j in zip(ok, junk)], (1, 3, 7))
  np.testing.assert_allclose(aps, ref_aps, rtol=1e-12)
  np.testing.assert_allclose(prs, ref_prs, rtol=1e-12)
  assert np.isnan(aps[2]) and np.isnan(prs[2]).all()


def test_thumbnail_size_is_pils():
  for w in range(1, 70, 3):
    for h in range(1, 70, 4):
      img = Image.new("RGB", (w, h))
      img.thumbnail((24, 24), Image.LANCZOS)
      assert revisited.thumbnail_size(w, h, 24) == img.size, (w, h)


def test_multiscale_features_match_torch_interpolate():
  """The release's multi_scale: torch's bilinear interpolate (scale factors, align_corners False)
  of the normalised image, the ViT's [CLS] at each scale (its strided patch conv reads the
  largest multiple of the patch), the mean, L2-normalised."""
  vit = build_models(tiny_config())[1].backbone
  params = random_params(vit, (1, 16, 16, 3))
  images = np.random.default_rng(1).integers(0, 256, (2, 29, 37, 3), dtype=np.uint8)
  x = torch.from_numpy(((images / 255.0 - MEAN) / STD).astype(np.float32)).permute(0, 3, 1, 2)
  apply = jax.jit(lambda p, a: vit.apply({"params": p}, a))
  feats = []
  for s in retrieval.MULTISCALE:
    xs = x if s == 1 else torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear",
                                                          align_corners=False)
    xs = xs.permute(0, 2, 3, 1).numpy()
    got = np.asarray(retrieval.resize_bilinear(np.asarray(x.permute(0, 2, 3, 1)), s))
    np.testing.assert_allclose(got, xs, atol=1e-5)  # also pins the output size
    h, w = xs.shape[1] // 4 * 4, xs.shape[2] // 4 * 4
    feats.append(np.asarray(apply(params, xs[:, :h, :w])))
  want = np.mean(feats, axis=0)
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  features = jax.jit(retrieval.multiscale_features, static_argnums=(0, 3))
  got = features(vit, params, images, retrieval.MULTISCALE)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
  single = features(vit, params, images, (1.0,))
  np.testing.assert_allclose(np.asarray(single),
                             feats[0] / np.linalg.norm(feats[0], axis=1, keepdims=True), atol=2e-5)


# ------------------------------------------------------------------------------------------------
# A revisitop dataset of 10 images in the release's layout.
# ------------------------------------------------------------------------------------------------
# Ten images, each in the database and, cut to its box, a query; thumbnailed to 24 px they are
# 24 x 18 or 18 x 24, and so are the boxes, rounded to (2, 3, 38, 30) or (3, 2, 30, 38): two image
# sizes, two compilations. Easy, hard and junk images drawn at random for each query.
SIZES = [(30, 40) if i % 3 == 0 else (40, 30) for i in range(10)]


def make_gnd():
  rng = np.random.default_rng(3)
  gnd = []
  for w, _ in SIZES:
    items = rng.permutation(10)
    gnd.append({"bbx": [2.4, 2.6, 38.4, 29.6] if w == 40 else [2.6, 2.4, 29.6, 38.4],
                "easy": items[:2], "hard": items[2:4], "junk": items[4:5]})
  return gnd


GND = make_gnd()


@pytest.fixture(scope="module")
def oxford(tmp_path_factory):
  root = tmp_path_factory.mktemp("revisited")
  jpg = root / "roxford5k" / "jpg"
  jpg.mkdir(parents=True)
  rng = np.random.default_rng(2)
  for i, (w, h) in enumerate(SIZES):
    yy, xx = np.mgrid[:h, :w] / 8.0  # smooth content, so the JPEG keeps it
    phase = rng.uniform(0, 6, 3)
    img = 127 + 100 * np.sin(xx[..., None] * rng.uniform(0.3, 2) + yy[..., None] + phase)
    Image.fromarray(img.astype(np.uint8)).save(jpg / f"im{i}.jpg", quality=95)
  names = [f"im{i}" for i in range(10)]
  with open(root / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
    pickle.dump({"imlist": names, "qimlist": names, "gnd": GND}, f)
  return str(root)


def test_source_and_batches(oxford):
  """Records as the release loads them (RGB, PIL's crop, thumbnail with Lanczos); batches of one
  size, the same sequence of shapes on every process, each image once."""
  queries = revisited.RevisitedSource(oxford, "roxford5k", "query", imsize=24, crop_queries=True)
  for i in (0, 1):
    img = Image.open(os.path.join(oxford, "roxford5k", "jpg", f"im{i}.jpg")).convert("RGB")
    img = img.crop(GND[i]["bbx"])
    img.thumbnail((24, 24), Image.LANCZOS)
    np.testing.assert_array_equal(queries[i]["image"], np.asarray(img))
    assert queries.size(i) == (img.height, img.width)
  assert queries[0]["image"].shape == (24, 18, 3) and queries[1]["image"].shape == (18, 24, 3)
  source = revisited.RevisitedSource(oxford, "roxford5k", "database", imsize=24)
  runs = [list(revisited.batches(source, 2, process_index=p, process_count=2)) for p in (0, 1)]
  assert [b["image"].shape for b in runs[0]] == [b["image"].shape for b in runs[1]]
  seen = np.concatenate([b["index"][b["valid"]] for run in runs for b in run])
  assert sorted(seen) == list(range(10))
  for run in runs:
    for b in run:
      for i, row in zip(b["index"][b["valid"]], b["image"][b["valid"]]):
        np.testing.assert_array_equal(row, source[i]["image"])


def test_cli_on_revisited_layout_matches_release(workdir, oxford):  # noqa: F811
  cli("eval_image_retrieval", "--workdir", workdir, "--data_path", oxford, "--imsize", "24",
      "--multiscale", "--crop_queries")
  with open(os.path.join(workdir, "eval", "image_retrieval_roxford5k.json")) as f:
    res = json.load(f)
  # The release's loading and features, written out: PIL crop + thumbnail (Lanczos), torch's
  # interpolate at each scale, [CLS] of the patch-multiple part, mean, normalise; then revisitop.
  config, params, _, _ = checkpoint.restore_network(workdir)
  vit = build_models(config)[1].backbone
  apply = jax.jit(lambda p, a: vit.apply({"params": p}, a))

  def feature(name, box=None):
    img = Image.open(os.path.join(oxford, "roxford5k", "jpg", name + ".jpg")).convert("RGB")
    if box is not None:
      img = img.crop(box)
    img.thumbnail((24, 24), Image.LANCZOS)
    x = torch.from_numpy(((np.asarray(img) / 255.0 - MEAN) / STD).astype(np.float32))
    x = x.permute(2, 0, 1)[None]
    v = 0
    for s in (1, 1 / 2**(1 / 2), 1 / 2):
      xs = x if s == 1 else torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear",
                                                            align_corners=False)
      xs = xs.permute(0, 2, 3, 1).numpy()
      v = v + np.asarray(apply(params["backbone"],
                               xs[:, :xs.shape[1] // 4 * 4, :xs.shape[2] // 4 * 4]))[0]
    v = v / 3
    return v / np.linalg.norm(v)

  db = np.stack([feature(f"im{i}") for i in range(10)])
  qs = np.stack([feature(f"im{i}", GND[i]["bbx"]) for i in range(10)])
  ranks = np.argsort(-(db @ qs.T), axis=0, kind="stable")  # (N, Q), as the release
  want = ref_revisited(ranks, GND)
  assert set(res) == {"medium", "hard"}
  for setting in ("medium", "hard"):
    assert res[setting] == pytest.approx(want[setting], rel=1e-9), setting


def test_embedded_cli(workdir):  # noqa: F811
  out = cli("eval_image_retrieval", "--workdir", workdir, "--shapes_queries", "12",
            "--shapes_database", "36")
  assert "chance" in out and "mP@10" in out
  with open(os.path.join(workdir, "eval", "image_retrieval.json")) as f:
    res = json.load(f)
  assert set(res) == {"trained", "random_init", "baseline"}
  # The workdir's teacher is its seed's fresh init: the two columns must agree exactly.
  assert res["trained"] == res["random_init"]
  # The baseline: raw pixels' cosine ranking of the two splits' images, scored by revisitop.
  config = checkpoint.load_config(workdir)
  data = []
  for split, size in zip(retrieval.SHAPES_SPLITS, (12, 36)):
    config.data.shapes_eval_size = size
    source = make_source(config, split)
    images = np.stack([source[i]["image"] for i in range(size)])
    x = ((images / 255.0 - MEAN) / STD).reshape(size, -1)
    data.append((x / np.linalg.norm(x, axis=1, keepdims=True),
                 np.array([source[i]["label"] for i in range(size)])))
  (qx, qy), (dx, dy) = data
  ranks = np.argsort(-(dx @ qx.T), axis=0, kind="stable")
  m_ap, _, mpr, _ = ref_compute_map(ranks, [{"ok": np.flatnonzero(dy == y)} for y in qy],
                                    (1, 5, 10))
  assert res["baseline"]["mAP"] == pytest.approx(100 * m_ap, rel=1e-6)
  assert [res["baseline"][f"mP@{k}"] for k in (1, 5, 10)] == pytest.approx(100 * mpr, rel=1e-6)
