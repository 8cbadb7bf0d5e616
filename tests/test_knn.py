"""Weighted k-NN (dino_jax.evaluate.knn) against a brute-force NumPy version of the release's
rule; feature extraction counts each image once."""
import jax
import numpy as np
import pytest

from dino_jax import sharding
from dino_jax.evaluate import knn

KS = (1, 3, 10, 20)


def random_params(module, image_shape, seed=0):
  """Params of the module's shapes drawn N(0, 0.3): jit(init) of a ViT takes seconds to compile
  on a CPU, eval_shape nothing. (Also used by the other evaluation tests.)"""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), np.zeros(image_shape, np.float32))
  return jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape, np.float32), shapes)["params"]


def brute_force(train, train_labels, test, k, temperature, num_classes):
  """One k at a time, as the release: sort all similarities, vote, sort the classes.

  Ties: stable sorts, so equal similarities take the lower train index and equal summed weights
  the lower class index; weights summed in neighbour rank order (float32).
  """
  sims = test @ train.T
  order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  weights = np.exp(np.take_along_axis(sims, order, 1) / np.float32(temperature))
  scores = np.zeros((len(test), num_classes), np.float32)
  for j in range(k):
    scores[np.arange(len(test)), train_labels[order[:, j]]] += weights[:, j]
  return np.argsort(-scores, axis=1, kind="stable")[:, :min(5, num_classes)]


def discrete_set(rng, n, m, d=16, classes=7):
  """Features on a coarse grid: dot products are exact in float32 in any order, and repeat, so
  similarity ties at the k-th neighbour and equal class scores both occur."""
  train = rng.integers(-2, 3, (n, d)).astype(np.float32) / 16
  test = rng.integers(-2, 3, (m, d)).astype(np.float32) / 16
  train[n // 2:] = train[:n - n // 2]  # duplicated train features with other labels
  return train, rng.integers(0, classes, n).astype(np.int32), test


@pytest.mark.parametrize("n,m", [(333, 101), (40, 17)])
def test_matches_brute_force_with_ties(n, m):
  rng = np.random.default_rng(n)
  train, labels, test = discrete_set(rng, n, m)
  sims = test @ train.T
  kth = np.sort(sims, axis=1)[:, ::-1][:, 9]
  assert ((sims == kth[:, None]).sum(1) > 1).any(), "the set should hold ties at the 10th neighbour"
  got = knn.knn_predict(train, labels, test, KS, 0.07, num_classes=7)
  for k in KS:
    np.testing.assert_array_equal(got[k], brute_force(train, labels, test, k, 0.07, 7),
                                  err_msg=f"k={k}")


def test_continuous_features_match_brute_force():
  rng = np.random.default_rng(0)
  train = rng.normal(size=(500, 32)).astype(np.float32)
  train /= np.linalg.norm(train, axis=1, keepdims=True)
  test = rng.normal(size=(60, 32)).astype(np.float32)
  test /= np.linalg.norm(test, axis=1, keepdims=True)
  labels = rng.integers(0, 10, 500).astype(np.int32)
  got = knn.knn_predict(train, labels, test, KS, 0.07, num_classes=10)
  for k in KS:
    np.testing.assert_array_equal(got[k], brute_force(train, labels, test, k, 0.07, 10))


def test_known_answer():
  # Class 0 around +x, class 1 around +y: the nearest neighbours decide, with k above the class
  # size the weights still do (exp(1/0.07) dwarfs exp(0)).
  train = np.array([[1, 0], [0.99, 0.141], [0.99, -0.141], [0, 1], [0.141, 0.99]], np.float32)
  labels = np.array([0, 0, 0, 1, 1], np.int32)
  test = np.array([[0.98, 0.2], [0.2, 0.98], [-1, 0]], np.float32)
  res = knn.knn_classify(train, labels, test, np.array([0, 1, 0]), ks=(1, 5), temperature=0.07)
  # (-1, 0), labelled 0, is nearer to class 1: wrong at top-1, right in the top 2 of k = 5.
  assert res["top1"] == pytest.approx({"1": 200 / 3, "5": 200 / 3})
  assert res["top5"] == pytest.approx({"1": 200 / 3, "5": 100.0})
  # Equal summed weights: the lower class index wins; equal similarities: the lower train index.
  train = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
  pred = knn.knn_predict(train, np.array([3, 1, 2]), np.array([[1, 0]], np.float32), (1, 2))
  assert pred[1][0, 0] == 3  # train rows 0 and 1 tie; row 0 comes first
  assert list(pred[2][0, :2]) == [1, 3]  # classes 1 and 3 tie on weight; 1 first


def test_chunked_and_sharded_equal_unchunked():
  rng = np.random.default_rng(1)
  train, labels, test = discrete_set(rng, 203, 57)
  ref = knn.knn_predict(train, labels, test, KS, 0.1, num_classes=7,
                        mesh=sharding.make_mesh(devices=jax.devices()[:1]), chunk_size=57)
  for mesh, chunk in [(sharding.make_mesh(), 5), (sharding.make_mesh(4, 2), 13),
                      (sharding.make_mesh(), None)]:
    got = knn.knn_predict(train, labels, test, KS, 0.1, num_classes=7, mesh=mesh, chunk_size=chunk)
    for k in KS:
      np.testing.assert_array_equal(got[k], ref[k])


def test_rejects_k_above_bank():
  with pytest.raises(ValueError, match="nb_knn"):
    knn.knn_predict(np.eye(3, dtype=np.float32), np.arange(3), np.eye(3, dtype=np.float32), (4,))


def test_features_count_each_image_once():
  """extract() over a padded last batch and the sharded mesh returns each image once, in order;
  cls_features are the backbone's [CLS] rows, unit-normed."""
  from dino_jax.evaluate import features
  from dino_jax.models import VisionTransformer

  vit = VisionTransformer(patch_size=4, embed_dim=16, depth=1, num_heads=2, img_size=8)
  params = random_params(vit, (1, 8, 8, 3))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (21, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 5, 21).astype(np.int32)

  def batches():  # 8 + 8 + 5 real images; the padding repeats image 0 with another label
    for s in range(0, 21, 8):
      n = min(8, 21 - s)
      yield {"image": np.concatenate([images[s:s + n], np.repeat(images[:1], 8 - n, 0)]),
             "label": np.concatenate([labels[s:s + n], np.full(8 - n, 9, np.int32)]),
             "valid": np.arange(8) < n}

  mesh = sharding.make_mesh()
  fn = lambda p, b: {"cls": features.cls_features(vit, p, b["image"]), "sum": b["image"].sum(
      (1, 2, 3))}
  out, stats = features.extract(fn, params, batches(), mesh)
  assert stats["examples"] == 21 and stats["examples_per_sec"] > 0
  np.testing.assert_array_equal(out["label"], labels)
  np.testing.assert_array_equal(out["sum"], images.astype(np.int64).sum((1, 2, 3)))
  ref = jax.jit(lambda p, x: vit.apply({"params": p}, x))(
      params, (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]))
  ref = np.asarray(ref) / np.linalg.norm(ref, axis=1, keepdims=True)
  np.testing.assert_allclose(out["cls"], ref, atol=1e-5)
