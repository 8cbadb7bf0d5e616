"""Video object segmentation (the release's eval_video_segmentation.py, DAVIS-2017's J and F):
the metrics against a NumPy transcription of davis2017-evaluation's definitions and hand values,
label propagation against a NumPy transcription of the release's algorithm, and the command line
on a fabricated DAVIS folder (checked against the release's pipeline written out here, with the
ViT as a black box) and on the embedded clips."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from dino_jax import checkpoint
from dino_jax.data import shapes_clips
from dino_jax.evaluate import davis_metrics
from dino_jax.evaluate import video_segmentation as vs
from dino_jax.models import build_models
from test_eval_cli import cli, workdir  # noqa: F401  (the fixture: a tiny fresh-init workdir)

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.228, 0.224, 0.225])  # release's video


# davis2017-evaluation's definitions, written out pixel by pixel.

def ref_seg2bmap(seg):
  h, w = seg.shape
  b = np.zeros((h, w), bool)
  for y in range(h):
    for x in range(w):
      if y == h - 1 and x == w - 1:
        continue
      if y == h - 1:
        b[y, x] = seg[y, x] != seg[y, x + 1]
      elif x == w - 1:
        b[y, x] = seg[y, x] != seg[y + 1, x]
      else:
        b[y, x] = (seg[y, x] != seg[y, x + 1] or seg[y, x] != seg[y + 1, x]
                   or seg[y, x] != seg[y + 1, x + 1])
  return b


def ref_dilate(b, r):
  """cv2.dilate with skimage's disk(r): offsets dy^2 + dx^2 <= r^2, nothing beyond the border."""
  h, w = b.shape
  out = np.zeros_like(b)
  for dy in range(-r, r + 1):
    for dx in range(-r, r + 1):
      if dy * dy + dx * dx <= r * r:
        out[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] |= \
            b[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
  return out


def ref_f(gt, pred):
  r = int(np.ceil(0.008 * np.sqrt(gt.shape[0] ** 2 + gt.shape[1] ** 2)))
  fb, gb = ref_seg2bmap(pred), ref_seg2bmap(gt)
  n_fg, n_gt = fb.sum(), gb.sum()
  if n_fg == 0 and n_gt > 0:
    p, rc = 1, 0
  elif n_fg > 0 and n_gt == 0:
    p, rc = 0, 1
  elif n_fg == 0 and n_gt == 0:
    p, rc = 1, 1
  else:
    p, rc = (fb & ref_dilate(gb, r)).sum() / n_fg, (gb & ref_dilate(fb, r)).sum() / n_gt
  return 0.0 if p + rc == 0 else 2 * p * rc / (p + rc)


def ref_j(gt, pred):
  union = (gt | pred).sum()
  return 1.0 if union == 0 else (gt & pred).sum() / union


def ref_video_jf(gt, pred):
  """Each object's (J mean, F mean) over frames 1 .. T-2."""
  objs = range(1, int(gt[0].max()) + 1)
  return [(np.mean([ref_j(gt[t] == k, pred[t] == k) for t in range(1, len(gt) - 1)]),
           np.mean([ref_f(gt[t] == k, pred[t] == k) for t in range(1, len(gt) - 1)]))
          for k in objs]


def square(shape, top, left, side):
  m = np.zeros(shape, bool)
  m[top:top + side, left:left + side] = True
  return m


def test_j_and_f_hand_values_and_the_boundary_tolerance():
  # 200 x 300 px: the tolerance is ceil(0.008 x 360.6) = 3 px.
  gt = square((200, 300), 50, 50, 50)
  assert davis_metrics.jaccard(gt, gt) == 1 and davis_metrics.boundary_f(gt, gt) == 1
  shifted3, shifted4 = square((200, 300), 50, 53, 50), square((200, 300), 50, 54, 50)
  assert davis_metrics.jaccard(gt, shifted3) == pytest.approx(50 * 47 / (50 * 53))
  assert davis_metrics.boundary_f(gt, shifted3) == 1.0  # every edge within 3 px of the other's
  f4 = davis_metrics.boundary_f(gt, shifted4)
  assert f4 < 1 and f4 == pytest.approx(ref_f(gt, shifted4))
  empty = np.zeros_like(gt)
  assert davis_metrics.jaccard(empty, empty) == 1 and davis_metrics.boundary_f(empty, empty) == 1
  assert davis_metrics.jaccard(gt, empty) == 0 and davis_metrics.boundary_f(gt, empty) == 0
  # The boundary: the object's bottom-right pixels and the pixels just above / left of it.
  b = davis_metrics.seg2bmap(square((6, 6), 2, 2, 2))
  assert np.argwhere(b).tolist() == [[1, 1], [1, 2], [1, 3], [2, 1], [2, 3], [3, 1], [3, 2],
                                     [3, 3]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_j_and_f_match_the_transcription_on_blobs(seed):
  rng = np.random.default_rng(seed)
  h, w = 40, 70  # tolerance 1 px
  yy, xx = np.mgrid[:h, :w]

  def blob():
    cy, cx, ry, rx = rng.uniform(5, 35), rng.uniform(5, 65), rng.uniform(3, 15), rng.uniform(3, 20)
    m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    m[rng.random((h, w)) < 0.03] ^= True  # speckle: isolated boundary pixels
    return m

  for _ in range(3):
    a, b = blob(), blob()
    assert davis_metrics.jaccard(a, b) == pytest.approx(ref_j(a, b), abs=1e-12)
    assert davis_metrics.boundary_f(a, b) == pytest.approx(ref_f(a, b), abs=1e-12)


def test_scores_leave_out_first_and_last_frames_and_summaries():
  gt = np.zeros((5, 20, 20), np.uint8)
  gt[:, 2:8, 2:8], gt[:, 10:16, 10:16] = 1, 2
  pred = gt.copy()
  pred[0] = pred[-1] = 0  # wrong on the frames the evaluation leaves out
  pred[2][pred[2] == 2] = 0  # object 2 missing on frame 2 of 1 .. 3
  s = davis_metrics.video_scores(gt, pred)
  assert s["J"].shape == (2, 3)
  np.testing.assert_array_equal(s["J"], [[1, 1, 1], [1, 0, 1]])
  mean, recall, decay = davis_metrics.statistics(np.array([1, 0.9, 0.2, 0.1, 0.4]))
  # decay: bins [0:2], [1:3], [2:4], [3:5] of 5 values; first minus last
  assert (mean, recall, decay) == pytest.approx((0.52, 0.4, 0.95 - 0.25))
  res = davis_metrics.summarize({"v": s})
  assert res["per_object"]["v_2"]["J-Mean"] == pytest.approx(2 / 3)
  assert res["J-Mean"] == pytest.approx((1 + 2 / 3) / 2)
  assert res["J&F-Mean"] == pytest.approx((res["J-Mean"] + res["F-Mean"]) / 2)


# The release's label propagation (eval_video_segmentation.py), transcribed in NumPy.

def ref_neighborhood(h, w, size):
  mask = np.zeros((h, w, h, w))
  for i in range(h):
    for j in range(w):
      for p in range(2 * size + 1):
        for q in range(2 * size + 1):
          if 0 <= i - size + p < h and 0 <= j - size + q < w:
            mask[i, j, i - size + p, j - size + q] = 1
  return mask.reshape(h * w, h * w)


def ref_label_propagation(feat_tar, list_feats, list_segs, h, w, size, topk, temp=0.1):
  """feat_tar (hw, dim), list_feats [(dim, hw)], list_segs [(1, C, h, w)]."""
  feat_sources = np.stack(list_feats)
  ft = feat_tar / np.linalg.norm(feat_tar, axis=1, keepdims=True)
  fs = feat_sources / np.linalg.norm(feat_sources, axis=1, keepdims=True)
  aff = np.exp(np.repeat(ft[None], len(list_feats), 0) @ fs / temp)  # (ctx, tar, src)
  if size > 0:
    aff *= ref_neighborhood(h, w, size)[None]
  aff = aff.transpose(0, 2, 1).reshape(-1, h * w)
  tk_min = np.sort(aff, axis=0)[::-1][:topk].min(0)
  aff[aff < tk_min] = 0
  aff = aff / aff.sum(0, keepdims=True)
  segs = np.concatenate(list_segs)
  n, c = segs.shape[:2]
  segs = segs.reshape(n, c, -1).transpose(0, 2, 1).reshape(-1, c).T
  return (segs @ aff).reshape(1, c, h, w), feat_tar.T


def ref_propagate(feats, first_seg, h, w, n_last, size, topk):
  """feats (T, hw, dim), first_seg (1, C, h, w) -> [(1, C, h, w)] of frames 1 .. T-1."""
  que, out = [], []
  for cnt in range(1, len(feats)):
    seg, feat = ref_label_propagation(feats[cnt], [feats[0].T] + [p[0] for p in que],
                                      [first_seg] + [p[1] for p in que], h, w, size, topk)
    if len(que) == n_last:
      que.pop(0)
    que.append([feat, seg])
    out.append(seg)
  return out


def ref_linear(n_in, n_out):
  """torch / cv2 bilinear weights, (n_out, n_in), written per output index."""
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = int(src)
    i1 = i0 + 1 if i0 < n_in - 1 else i0
    m[i, i0] += 1 - (src - i0)
    m[i, i1] += src - i0
  return m


def ref_labels(seg, p):
  """(1, C, h, w) -> ids (h p, w p): upsample, the release's norm_mask, argmax."""
  _, c, h, w = seg.shape
  up = np.einsum("ah,chw,bw->cab", ref_linear(h, h * p), seg[0], ref_linear(w, w * p))
  for k in range(c):
    if up[k].max() > 0:
      up[k] = up[k] - up[k].min()
      up[k] = up[k] / up[k].max()
  return np.argmax(up, 0)


def test_propagation_matches_the_release():
  rng = np.random.default_rng(0)
  t, h, w, d, c = 12, 5, 6, 8, 3
  # Features drifting from frame to frame, so the labels move.
  feats = rng.normal(size=(1, h * w, d)) + 0.5 * np.cumsum(rng.normal(size=(t, h * w, d)), 0)
  first_ids = rng.integers(0, c, size=(h, w))
  first = np.eye(c)[first_ids.reshape(-1)]  # (N, C)
  n_last, size, topk = 3, 2, 4  # the queue wraps; the neighbourhood cuts the 5 x 6 grid
  want = ref_propagate(feats, first.T.reshape(1, c, h, w), h, w, n_last, size, topk)
  got = np.asarray(vs.propagate(feats.astype(np.float32), first.astype(np.float32), (h, w),
                                n_last, size, topk, 0.1))
  assert got.shape == (t - 1, h * w, c)
  for i, seg in enumerate(want):
    np.testing.assert_allclose(got[i], seg[0].reshape(c, -1).T, rtol=1e-4, atol=1e-6,
                               err_msg=f"frame {i + 1}")
  labels = np.asarray(vs.soft_to_labels(got, (h, w), 4))
  np.testing.assert_array_equal(labels, np.stack([ref_labels(s, 4) for s in want]))
  # Without the neighbourhood the labels differ: the test sees the restriction.
  free = np.asarray(vs.propagate(feats.astype(np.float32), first.astype(np.float32), (h, w),
                                 n_last, 0, topk, 0.1))
  assert np.abs(free - got).max() > 1e-3


# The command line.

PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9)


def fabricate_davis(root):
  """Two videos of 48 x 100 px frames in the DAVIS-2017 layout: a square (id 1) and a disc (id
  2) moving right, then one square; an annotation PNG per frame; ImageSets/2017/val.txt."""
  yy, xx = np.mgrid[:48, :100]
  videos = {"vidA": (6, 2), "vidB": (4, 1)}
  for name, (frames, objects) in videos.items():
    os.makedirs(root / "JPEGImages" / "480p" / name)
    os.makedirs(root / "Annotations" / "480p" / name)
    for t in range(frames):
      ids = np.zeros((48, 100), np.uint8)
      ids[10:26, 8 + 3 * t:24 + 3 * t] = 1
      if objects == 2:
        ids[(yy - 30) ** 2 + (xx - 70 + 2 * t) ** 2 <= 81] = 2
      gray = np.where(ids > 0, 200, 50) + np.random.default_rng(t).normal(0, 30, ids.shape)
      img = np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, -1)
      Image.fromarray(img).save(root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", quality=95)
      ann = Image.fromarray(ids)
      ann.putpalette(PALETTE)
      ann.save(root / "Annotations" / "480p" / name / f"{t:05d}.png")
  os.makedirs(root / "ImageSets" / "2017")
  (root / "ImageSets" / "2017" / "val.txt").write_text("vidA\nvidB\n")
  return videos


def test_cli_on_a_davis_folder(workdir, tmp_path):  # noqa: F811
  videos = fabricate_davis(tmp_path / "davis")
  out = cli("eval_video_segmentation", "--workdir", workdir, "--data_path",
            str(tmp_path / "davis"), "--output", str(tmp_path / "out"), "--scale_size", "64",
            "--bs", "4")
  assert "J&F-Mean" in out
  with open(os.path.join(workdir, "eval", "video_segmentation.json")) as f:
    res = json.load(f)
  assert set(davis_metrics.MEASURES) <= set(res) and set(res["per_video"]) == set(videos)
  assert set(res["per_object"]) == {"vidA_1", "vidA_2", "vidB_1"}
  ann = tmp_path / "davis" / "Annotations" / "480p"
  preds, gts = {}, {}
  for name, (frames, _) in videos.items():
    pngs = [Image.open(tmp_path / "out" / name / f"{t:05d}.png") for t in range(frames)]
    assert all(p.mode == "P" and p.size == (100, 48) for p in pngs)
    preds[name] = np.stack([np.asarray(p) for p in pngs])
    gts[name] = np.stack([np.asarray(Image.open(ann / name / f"{t:05d}.png"))
                          for t in range(frames)])
    np.testing.assert_array_equal(preds[name][0], gts[name][0])  # the given first frame
  # The figures, from the written PNGs by the transcribed definitions.
  per_object = {f"{n}_{k + 1}": jf for n in videos
                for k, jf in enumerate(ref_video_jf(gts[n], preds[n]))}
  for key, (j, f) in per_object.items():
    assert res["per_object"][key]["J-Mean"] == pytest.approx(j, abs=1e-9)
    assert res["per_object"][key]["F-Mean"] == pytest.approx(f, abs=1e-9)
  j = np.mean([v[0] for v in per_object.values()])
  f = np.mean([v[1] for v in per_object.values()])
  assert res["J&F-Mean"] == pytest.approx((j + f) / 2, abs=1e-9)

  # vidA's masks, by the release's pipeline written out: frames resized by its rule (48 x 100 ->
  # 64 x (64 x 100 / 48 // 64 x 64 = 128)), bilinear; normalised; the ViT's last block; the first
  # mask to the 16 x 32 grid by PIL nearest; propagation; upsampling; back to 48 x 100 (nearest).
  config, params, _, _ = checkpoint.restore_network(workdir)
  vit = build_models(config)[1].backbone
  frames = np.stack([np.asarray(Image.open(tmp_path / "davis" / "JPEGImages" / "480p" / "vidA" /
                                           f"{t:05d}.jpg").convert("RGB")) for t in range(6)])
  resized = np.einsum("ah,thwc,bw->tabc", ref_linear(48, 64), frames.astype(float),
                      ref_linear(100, 128))
  x = (np.clip(np.round(resized), 0, 255) / 255.0 - MEAN) / STD
  tokens = jax.jit(lambda p, x: vit.apply({"params": p}, x, 1, method="get_intermediate_layers"))(
      params["backbone"], x.astype(np.float32))[0]
  feats = np.asarray(tokens, np.float64)[:, 1:]
  small = np.asarray(Image.fromarray(gts["vidA"][0]).resize((32, 16), Image.NEAREST))
  first = np.eye(3)[small.reshape(-1)].T.reshape(1, 3, 16, 32)
  segs = ref_propagate(feats, first, 16, 32, 7, 12, 5)
  want = [np.asarray(Image.fromarray(ref_labels(s, 4).astype(np.uint8)).resize((100, 48), 0))
          for s in segs]
  # Every pixel: a changed setting (temperature 0.07 for 0.1) moves a few of them.
  np.testing.assert_array_equal(preds["vidA"][1:], np.stack(want))
  assert res["per_video"]["vidA"]["J-Mean"] > 0.3  # not a trivial pass: objects are found


def test_embedded_cli(workdir):  # noqa: F811
  out = cli("eval_video_segmentation", "--workdir", workdir, "--num_clips", "8",
            "--num_frames", "5")
  assert "random init" in out and "baseline" in out
  with open(os.path.join(workdir, "eval", "video_segmentation.json")) as f:
    res = json.load(f)
  assert set(res) == {"trained", "random_init", "baseline"}
  for r in res.values():
    assert set(davis_metrics.MEASURES) <= set(r) and len(r["per_video"]) == 8
  # The workdir's teacher is the seed's fresh init: the two networks agree to the last digit.
  assert res["trained"] == res["random_init"]
  # The baseline, from the clips by the transcribed definitions.
  config = checkpoint.load_config(workdir)
  clips = shapes_clips.make_clips(config, 8, 5)
  assert [int(c["masks"][0].max()) for c in clips] == [1] * 6 + [2] * 2
  jf = [x for c in clips for x in ref_video_jf(c["masks"], np.repeat(c["masks"][:1], 5, 0))]
  assert res["baseline"]["J-Mean"] == pytest.approx(np.mean([x[0] for x in jf]), abs=1e-9)
  assert res["baseline"]["F-Mean"] == pytest.approx(np.mean([x[1] for x in jf]), abs=1e-9)
  assert Image.open(os.path.join(workdir, "eval", "video_segmentation.png")).size[0] > 300


def test_clip_lighting_is_torchvisions_jitter(workdir):  # noqa: F811
  """The clips' lighting is torchvision's adjust_brightness then adjust_contrast, by factors in
  the training's colour jitter ranges, drawn per frame; the motion and the masks do not change."""
  tf = pytest.importorskip("torchvision.transforms.functional")
  torch = pytest.importorskip("torch")
  frames = np.random.default_rng(0).uniform(0, 1, (6, 10, 10))
  lit = shapes_clips._light(frames, np.random.default_rng(1), 0.4, 0.3)
  rng = np.random.default_rng(1)  # the same draws: brightness factors, then contrast factors
  b, c = rng.uniform(0.6, 1.4, 6), rng.uniform(0.7, 1.3, 6)
  for t in range(6):
    x = torch.tensor(np.repeat(frames[t][None], 3, 0))  # a gray RGB image, (3, H, W) in [0, 1]
    want = tf.adjust_contrast(tf.adjust_brightness(x, b[t]), c[t])[0].numpy()
    # (torchvision's grayscale weights sum to 0.9999: its mean is 1e-4 of a level lower)
    np.testing.assert_allclose(lit[t], want, atol=1e-4)

  config = checkpoint.load_config(workdir)
  constant = shapes_clips.make_clips(config, 3, 6, lighting=False)
  changing = shapes_clips.make_clips(config, 3, 6)
  for a, b in zip(constant, changing):
    np.testing.assert_array_equal(a["masks"], b["masks"])
    obj = a["masks"] > 0
    # Constant light: the object's mean level moves only with noise and edge pixels; changing
    # light: by far more.
    levels = [np.array([f[..., 0][m].mean() for f, m in zip(x["frames"], obj)])
              for x in (a, b)]
    assert np.ptp(levels[1]) > 4 * np.ptp(levels[0])
