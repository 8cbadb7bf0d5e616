"""ResNet-50 against torchvision's resnet50 on the same weights: features, gradients and BatchNorm
running statistics, in train and eval mode; the key table both ways."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax.convert import exporting, flax_to_torch, importing, torch_to_flax
from dino_jax.evaluate import features
from dino_jax.models import build_resnet, merge_stats
from helpers import assert_trees_close

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def torch_resnet():
  """torchvision's resnet50 (fc = Identity, as the release) with BN params and running stats
  away from their init, so that every one of them matters."""
  torch.manual_seed(0)
  net = torchvision.models.resnet50()
  net.fc = torch.nn.Identity()
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 2.0)
  return net


def _images(seed=0, b=2, size=64):
  return np.random.default_rng(seed).standard_normal((b, 3, size, size)).astype(np.float32)


def _weights(net):
  return torch_to_flax(net.state_dict(), with_batch_stats=True)


def test_key_table_is_torchvisions(torch_resnet):
  """Our init's tree maps to exactly torchvision's state_dict keys and shapes (fc left out)."""
  model = build_resnet("resnet50")
  v = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  zeros = lambda t: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), t)
  sd = flax_to_torch(zeros(v["params"]), zeros(v["batch_stats"]))
  want = {k: tuple(t.shape) for k, t in torch_resnet.state_dict().items()}
  assert list(sd) == list(want)
  assert {k: tuple(x.shape) for k, x in sd.items()} == want


def test_eval_mode_features(torch_resnet):
  """eval(): running statistics; also the stats_in_params clone evaluations use."""
  params, stats = _weights(torch_resnet)
  x = _images()
  torch_resnet.eval()
  with torch.no_grad():
    want = torch_resnet(torch.from_numpy(x)).numpy()
  model = build_resnet("resnet50")
  got = jax.jit(model.apply)({"params": params, "batch_stats": stats}, x.transpose(0, 2, 3, 1))
  assert got.shape == (2, 2048)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  frozen = model.clone(stats_in_params=True)
  got_frozen = jax.jit(frozen.apply)({"params": merge_stats(params, stats)},
                                     x.transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(got_frozen, got)


def _torch_train_step(net, x, w, dtype):
  """A train-mode forward and backward of sum(features * w) on a copy of net in dtype:
  (features, {name: grad}, state_dict after the forward), float64 numpy."""
  net = copy.deepcopy(net).to(dtype).train()
  feats = net(torch.from_numpy(x).to(dtype))
  (feats * torch.from_numpy(w).to(dtype)).sum().backward()
  f64 = lambda t: t.detach().double().numpy()
  return (f64(feats), {k: f64(p.grad) for k, p in net.named_parameters()},
          {k: f64(t) for k, t in net.state_dict().items()})


def test_train_mode_features_gradients_and_running_stats(torch_resnet):
  """train(): batch statistics, the running ones updated as torch's (unbiased variance,
  momentum 0.1), and the gradient of every parameter.

  Train-mode BatchNorm over a few values per channel (4 images x 2 x 2 in the last stage) makes
  the gradient ill-conditioned: torch's own float32 gradients are up to ~2 % from its float64
  ones. So each gradient is held to float64 torch, as close as torch's float32 gets (x 3).
  """
  params, stats = _weights(torch_resnet)
  x = _images(1, b=4)
  w = np.random.default_rng(2).standard_normal((4, 2048)).astype(np.float32)
  want, want_grads, want_sd = _torch_train_step(torch_resnet, x, w, torch.float64)
  _, torch32_grads, _ = _torch_train_step(torch_resnet, x, w, torch.float32)
  model = build_resnet("resnet50")

  def loss(p):
    f, new = model.apply({"params": p, "batch_stats": stats}, x.transpose(0, 2, 3, 1),
                         deterministic=False, mutable=["batch_stats"])
    return jnp.sum(f * w), (f, new["batch_stats"])

  grads, (got, new_stats) = jax.jit(jax.grad(loss, has_aux=True))(params)
  assert_trees_close(got, want, 3e-4, what="features")
  got_grads = flax_to_torch(grads, new_stats)
  rel = lambda a, b: np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)
  for k, g in want_grads.items():
    assert rel(got_grads[k], g) <= max(3 * rel(torch32_grads[k], g), 1e-4), k
  got_stats = {k: v for k, v in flax_to_torch(params, new_stats).items() if "running" in k}
  assert_trees_close(got_stats, {k: want_sd[k] for k in got_stats}, 1e-4, what="running stats")


def test_weights_both_ways_with_torchvision(torch_resnet, tmp_path):
  """A torchvision state_dict (the release's backbone file) -> import_torch's workdir -> its
  export loads strictly into torchvision's resnet50 (fc = Identity): the same tensors, the same
  features; and the workdir's evaluation backbone gives those features too."""
  sd = {k: v.clone() for k, v in torch_resnet.state_dict().items()}
  torch.save(sd, tmp_path / "rn50.pth")
  wd = str(tmp_path / "wd")
  importing.import_weights(str(tmp_path / "rn50.pth"), wd, arch="resnet50")
  exporting.export(wd, str(tmp_path / "back.pth"), fmt="pth")
  for fmt in ("hf", "onnx"):  # transformers' ViTModel formats: refused in one line, nothing written
    with pytest.raises(ValueError, match=f"--format {fmt} is a transformers.ViTModel"):
      exporting.export(wd, str(tmp_path / f"x.{fmt}"), fmt=fmt)
    assert not (tmp_path / f"x.{fmt}").exists()
  back = torch.load(tmp_path / "back.pth", weights_only=True)
  net = torchvision.models.resnet50()
  net.fc = torch.nn.Identity()
  net.load_state_dict(back, strict=True)
  for k, v in sd.items():
    if not k.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(back[k].numpy(), v.numpy(), err_msg=k)
  x = _images(3)
  torch_resnet.eval()
  with torch.no_grad():
    want = torch_resnet(torch.from_numpy(x)).numpy()
  config, backbone, params, _ = features.load_backbone(wd)
  assert config.model.arch == "resnet50"
  got = jax.jit(backbone.apply)({"params": params}, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_import_names_missing_and_unexpected_keys(torch_resnet, tmp_path):
  sd = dict(torch_resnet.state_dict())
  del sd["layer3.2.bn2.running_var"]
  sd["fc.weight"] = torch.zeros(1000, 2048)
  with pytest.raises(ValueError) as e:
    torch_to_flax(sd, with_batch_stats=True)
  assert "fc.weight: unknown key" in str(e.value)
  del sd["fc.weight"]
  with pytest.raises(ValueError) as e:
    torch_to_flax(sd, with_batch_stats=True)
  assert "layer3.2.bn2.running_var: missing, the model expects shape (256,)" in str(e.value)
  sd = dict(torch_resnet.state_dict())
  sd["layer2.0.conv2.weight"] = torch.zeros(128, 128, 1, 1)
  with pytest.raises(ValueError, match=r"layer2.0.conv2.weight: shape \(128, 128, 1, 1\) in the "
                     r"state_dict, the model expects \(128, 128, 3, 3\)"):
    torch_to_flax(sd, with_batch_stats=True)


def test_batch_statistics_are_the_global_batchs_under_sharding(torch_resnet):
  """A batch split over 8 devices normalises with the statistics of the whole batch (the
  release's SyncBatchNorm): features and running statistics as on one device."""
  params, stats = _weights(torch_resnet)
  x = _images(4, b=8, size=32).transpose(0, 2, 3, 1)
  model = build_resnet("resnet50")
  fwd = lambda p, s, x: model.apply({"params": p, "batch_stats": s}, x, deterministic=False,
                                    mutable=["batch_stats"])
  one = jax.jit(fwd)(params, stats, x)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded = jax.jit(fwd, in_shardings=(repl, repl, rows))(params, stats, jax.device_put(x, rows))
  # Summation order only (ill-conditioned as in the test above); per-device statistics of one
  # image (a single value per channel in the last stage) would differ by O(1).
  assert_trees_close(sharded, one, 1e-3, what="8 devices vs 1")
