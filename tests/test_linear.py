"""Linear probe (dino_jax.evaluate.linear): separable data is learnt, the optimizer is the
release's SGD + per-epoch cosine, training resumes exactly, features as the release builds them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dino_jax.evaluate import features, linear
from dino_jax.models import VisionTransformer
from test_knn import random_params


def separable(n, rng, classes=4, dim=12):
  """Clusters around orthogonal class means: linearly separable with a wide margin."""
  labels = np.arange(n) % classes
  x = 3 * np.eye(dim, dtype=np.float32)[labels] + 0.3 * rng.normal(size=(n, dim))
  return x.astype(np.float32), labels.astype(np.int32)


def batches_of(x, y, batch_size, order=None):
  order = np.arange(len(x)) if order is None else order
  for s in range(0, len(x), batch_size):
    idx = order[s:s + batch_size]
    pad = batch_size - len(idx)
    yield {"image": np.pad(x[idx], ((0, pad), (0, 0))), "label": np.pad(y[idx], (0, pad)),
           "valid": np.arange(batch_size) < len(idx)}


def run_probe(x, y, xt, yt, epochs, ckpt_dir=None, fail_at=None, batch_size=16, seen=None,
              base_lr=0.05, settings=None):
  def train_batches(epoch):
    if seen is not None:
      seen.append(epoch)
    if epoch == fail_at:
      raise KeyboardInterrupt
    return batches_of(x, y, batch_size, np.random.default_rng(epoch).permutation(len(x)))

  return linear.train(lambda p, images: images, {}, num_features=x.shape[1], num_labels=4,
                      train_batches=train_batches, eval_batches=lambda: batches_of(xt, yt, 16),
                      epochs=epochs, steps_per_epoch=-(-len(x) // batch_size),
                      batch_size=batch_size, base_lr=base_lr, ckpt_dir=ckpt_dir,
                      settings=settings)


def test_separable_set_reaches_100_percent():
  rng = np.random.default_rng(0)
  x, y = separable(120, rng)
  xt, yt = separable(40, rng)  # 40 = 2 batches + 8: a padded last eval batch
  res = run_probe(x, y, xt, yt, epochs=6)
  assert res["top1"] == 100.0 and res["top5"] == 100.0 and res["best_top1"] == 100.0
  assert [r["epoch"] for r in res["per_epoch"]] == list(range(6))
  assert res["per_epoch"][-1]["loss"] < res["per_epoch"][0]["loss"]


def test_resumes_where_it_stopped(tmp_path):
  rng = np.random.default_rng(1)
  x, y = separable(50, rng)
  xt, yt = separable(16, rng)
  full = run_probe(x, y, xt, yt, epochs=4)
  with pytest.raises(KeyboardInterrupt):
    run_probe(x, y, xt, yt, epochs=4, ckpt_dir=str(tmp_path), fail_at=2)
  seen = []
  resumed = run_probe(x, y, xt, yt, epochs=4, ckpt_dir=str(tmp_path), seen=seen)
  assert seen == [2, 3] and len(resumed["per_epoch"]) == 4
  for a, b in zip(full["per_epoch"], resumed["per_epoch"]):
    assert a == pytest.approx(b, rel=1e-5)


def test_resumes_only_with_the_same_settings(tmp_path):
  """A rerun with another lr, or other settings of the caller's, stops naming what differs and
  keeps the checkpoints: the same settings then resume after the last saved epoch."""
  rng = np.random.default_rng(2)
  x, y = separable(50, rng)
  xt, yt = separable(16, rng)
  data = {"data.path": "/a"}
  with pytest.raises(KeyboardInterrupt):
    run_probe(x, y, xt, yt, epochs=4, ckpt_dir=str(tmp_path), fail_at=2, settings=data)
  with pytest.raises(ValueError, match=r"base_lr 0\.05, now 0\.1"):
    run_probe(x, y, xt, yt, epochs=4, ckpt_dir=str(tmp_path), base_lr=0.1, settings=data)
  with pytest.raises(ValueError, match=str(tmp_path) + r".*data.path '/a', now '/b'"):
    run_probe(x, y, xt, yt, epochs=4, ckpt_dir=str(tmp_path), settings={"data.path": "/b"})
  seen = []
  resumed = run_probe(x, y, xt, yt, epochs=4, ckpt_dir=str(tmp_path), seen=seen, settings=data)
  assert seen == [2, 3] and len(resumed["per_epoch"]) == 4


def test_optimizer_is_torch_sgd_with_per_epoch_cosine():
  """Same parameters, step by step, as torch SGD(momentum 0.9) + CosineAnnealingLR(T_max=epochs)
  stepped after each epoch, on a least-squares problem (lr = 0.001 x 512 / 256)."""
  epochs, steps_per_epoch = 5, 3
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=8).astype(np.float32)
  tx, schedule = linear.make_optimizer(0.001, 512, epochs, steps_per_epoch)

  w_t = torch.zeros(4, requires_grad=True)
  opt = torch.optim.SGD([w_t], lr=0.002, momentum=0.9, weight_decay=0)
  sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0)
  w = jnp.zeros(4)
  state = tx.init(w)
  grad = jax.grad(lambda w: 50 * jnp.sum((jnp.asarray(a) @ w - b) ** 2))
  for epoch in range(epochs):
    assert float(schedule(epoch * steps_per_epoch)) == pytest.approx(sched.get_last_lr()[0])
    for _ in range(steps_per_epoch):
      opt.zero_grad()
      (50 * torch.sum((torch.from_numpy(a) @ w_t - torch.from_numpy(b)) ** 2)).backward()
      opt.step()
      updates, state = tx.update(grad(w), state, w)
      w = w + updates
      np.testing.assert_allclose(w, w_t.detach().numpy(), rtol=1e-4, atol=1e-6)
    sched.step()


def test_linear_features_are_the_release_concatenations():
  vit = VisionTransformer(patch_size=4, embed_dim=8, depth=3, num_heads=2, img_size=8)
  params = random_params(vit, (1, 8, 8, 3))
  images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  f = jax.jit(features.linear_features, static_argnums=(0, 3, 4))
  toks = jax.jit(lambda p, x: vit.apply({"params": p}, x, 3, method="get_intermediate_layers"))(
      params, (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]))
  toks = [np.asarray(t) for t in toks]
  np.testing.assert_allclose(f(vit, params, images, 2, False),
                             np.concatenate([toks[1][:, 0], toks[2][:, 0]], -1), atol=1e-5)
  # avgpool: torch.cat((cls.unsqueeze(-1), mean.unsqueeze(-1)), -1).reshape(B, -1) interleaves.
  cls, mean = torch.tensor(toks[2][:, 0]), torch.tensor(toks[2][:, 1:].mean(1))
  ref = torch.cat((cls.unsqueeze(-1), mean.unsqueeze(-1)), dim=-1).reshape(2, -1).numpy()
  np.testing.assert_allclose(f(vit, params, images, 1, True), ref, atol=1e-5)
  with pytest.raises(ValueError, match="n_last_blocks=1"):
    features.linear_features(vit, params, images, 2, True)
