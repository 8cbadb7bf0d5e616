"""Multi-crop augmentation against torchvision: crops, eval transform, photometric ops, rates."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from dino_jax import config as config_lib
from dino_jax.data import augment

torch = pytest.importorskip("torch")
T = pytest.importorskip("torchvision.transforms")
F = pytest.importorskip("torchvision.transforms.functional")


def _image(h, w, seed=0):
  return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Host: crops.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4)])
def test_random_resized_crop_box_distribution_matches_torchvision(scale):
  n, (h, w) = 3000, (375, 500)
  rng = np.random.default_rng(0)
  ours = np.array([augment.random_resized_crop_box(rng, w, h, scale) for _ in range(n)])
  torch.manual_seed(0)
  img = torch.zeros(3, h, w)
  theirs = np.array([T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
                     for _ in range(n)])
  for boxes in (ours, theirs):
    top, left, bh, bw = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + bh <= h).all() and (left + bw <= w).all()
  top, left, bh, bw = ours.T
  area, ratio = bh * bw / (h * w), bw / bh
  slack = 2 * (bh + bw) / (h * w)  # integer rounding of the sides
  assert (area >= scale[0] - slack).all() and (area <= scale[1] + slack).all()
  assert (ratio >= 3 / 4 * (1 - 2 / bh)).all() and (ratio <= 4 / 3 * (1 + 2 / bh)).all()
  for k, name in enumerate(["top", "left", "h", "w"]):  # same distributions as torchvision's
    assert stats.ks_2samp(ours[:, k], theirs[:, k]).pvalue > 1e-3, name
  assert stats.ks_2samp(area, theirs[:, 2] * theirs[:, 3] / (h * w)).pvalue > 1e-3


def test_random_resized_crop_fallback_is_torchvision_centre_crop():
  rng = np.random.default_rng(0)
  for w, h in ((100, 10), (10, 100), (30, 30)):  # no try can fit: the centre-crop fallback
    expected = T.RandomResizedCrop.get_params(torch.zeros(3, h, w), [1.5, 2.0], [3 / 4, 4 / 3])
    assert augment.random_resized_crop_box(rng, w, h, (1.5, 2.0)) == tuple(expected)


@pytest.mark.parametrize("box,size", [((10, 20, 150, 200), 96), ((0, 0, 375, 500), 224),
                                      ((3, 7, 64, 64), 64), ((100, 50, 31, 17), 224)])
@pytest.mark.parametrize("mode", ["BICUBIC", "BILINEAR"])
def test_resized_crop_is_torchvision_on_pil(box, size, mode):
  img = Image.fromarray(_image(375, 500))
  expected = np.asarray(F.resized_crop(img, *box, [size, size], T.InterpolationMode[mode]))
  np.testing.assert_array_equal(augment.resized_crop(img, box, size, getattr(Image, mode)),
                                expected)


def test_probe_crop_is_torchvision_random_resized_crop_and_flip():
  """The linear probe's train transform: torchvision's RandomResizedCrop (bilinear: the filter
  sees only the crop) at the drawn box, then the drawn flip."""
  image = _image(120, 90)
  crop = augment.RandomResizedCropFlip(32)
  for seed in range(8):
    out = crop.random_map({"image": image, "label": 3}, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    box = augment.random_resized_crop_box(rng, 90, 120, (0.08, 1.0))
    want = np.asarray(F.resized_crop(Image.fromarray(image), *box, [32, 32],
                                     T.InterpolationMode.BILINEAR))
    np.testing.assert_array_equal(out["image"], want[:, ::-1] if rng.random() < 0.5 else want)
    assert out["label"] == 3 and out["valid"]


@pytest.mark.parametrize("hw", [(375, 500), (500, 375), (256, 256), (40, 30)])
def test_eval_transform_is_torchvision_resize_and_centre_crop(hw):
  image = _image(*hw)
  tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
  np.testing.assert_array_equal(augment.eval_transform(image, 256, 224),
                                np.asarray(tf(Image.fromarray(image))))


def test_multicrop_shapes_determinism_and_flip_rate():
  mc = augment.MultiCrop(32, 16, 4, (0.4, 1.0), (0.05, 0.4), flip_prob=0.5)
  ramp = np.broadcast_to(np.linspace(0, 255, 48).astype(np.uint8)[None, :, None], (40, 48, 3))
  record = {"image": np.ascontiguousarray(ramp)}
  out = mc.random_map(record, np.random.default_rng(1))
  assert out["global"].shape == (2, 32, 32, 3) and out["local"].shape == (4, 16, 16, 3)
  assert out["global"].dtype == np.uint8
  again = mc.random_map(record, np.random.default_rng(1))
  np.testing.assert_array_equal(out["local"], again["local"])
  # A left-to-right ramp stays increasing unless flipped.
  rng = np.random.default_rng(2)
  flipped = []
  for _ in range(500):
    o = mc.random_map(record, rng)
    for crops in (o["global"], o["local"]):
      flipped.extend(crops[:, :, 0, 0].astype(int).mean(1) > crops[:, :, -1, 0].astype(int).mean(1))
  assert abs(np.mean(flipped) - 0.5) < 4 * np.sqrt(0.25 / len(flipped))
  none = augment.MultiCrop(32, 16, 0, (0.4, 1.0), (0.05, 0.4), flip_prob=0.0)
  o = none.random_map(record, rng)
  assert "local" not in o and (np.diff(o["global"][..., 0].astype(int), axis=-1) >= 0).all()


# ----------------------------------------------------------------------------------------------
# Device: crops (aug.crops_on_device) against PIL's, through torchvision's resized_crop.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(32, 32), (40, 48)])
def test_device_crops_are_pil_bicubic_resized_crops(hw):
  rng = np.random.default_rng(0)
  image, n = _image(*hw), 200
  for size in (32, 16, 8):  # shrinking and enlarging, each axis, both pass orders of Pillow
    boxes = [augment.random_resized_crop_box(rng, hw[1], hw[0], (0.02, 1.0)) for _ in range(n)]
    flips = rng.random(n) < 0.5
    got = jax.jit(augment.device_crops, static_argnums=3)(
        image[None], np.array([boxes], np.int32), flips[None], size)[0]
    want = [np.asarray(F.resized_crop(Image.fromarray(image), *b, [size, size],
                                      T.InterpolationMode.BICUBIC)) for b in boxes]
    want = np.stack([w[:, ::-1] if f else w for w, f in zip(want, flips)]).astype(np.float64)
    diff = np.abs(np.asarray(got, np.float64) * 255 - want)
    # Float coefficients where PIL's are 22-bit fixed point: a level off here and there.
    assert diff.max() <= 2.0 + 1e-3, (size, diff.max())
    assert (diff > 0.5).mean() < 0.005, (size, (diff > 0.5).mean())


def test_multicrop_on_device_draws_the_same_crops_as_on_the_host():
  host = augment.MultiCrop(32, 16, 4, (0.4, 1.0), (0.05, 0.4), flip_prob=0.5)
  dev = augment.MultiCrop(32, 16, 4, (0.4, 1.0), (0.05, 0.4), flip_prob=0.5, on_device=True)
  record = {"image": _image(32, 32, seed=3)}
  for seed in range(5):
    want = host.random_map(record, np.random.default_rng(seed))
    draws = dev.random_map(record, np.random.default_rng(seed))
    assert set(draws) == {"image", "global_boxes", "global_flips", "local_boxes", "local_flips"}
    batch = jax.tree.map(lambda x: np.asarray(x)[None], draws)
    for name, size in (("global", 32), ("local", 16)):
      got = augment.device_crops(batch["image"], batch[f"{name}_boxes"], batch[f"{name}_flips"],
                                 size)[0]
      np.testing.assert_allclose(np.asarray(got) * 255, want[name], atol=2.001)


# ----------------------------------------------------------------------------------------------
# Device: photometric ops against torchvision.transforms.functional on float tensors.
# ----------------------------------------------------------------------------------------------
def _torch(x):  # (..., H, W, 3) -> (..., 3, H, W)
  return torch.from_numpy(np.moveaxis(np.asarray(x), -1, -3).copy())


def _numpy(t):
  return np.moveaxis(t.numpy(), -3, -1)


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  x = rng.random((4, 19, 23, 3)).astype(np.float32)
  x[0] = x[0, :1, :1]  # a flat image
  x[1, ..., 1] = x[1, ..., 0]  # ties between channels
  return x


@pytest.mark.parametrize("name,factors", [
    ("brightness", (0.6, 1.0, 1.4, 1.2)), ("contrast", (0.6, 1.0, 1.4, 0.0)),
    ("saturation", (0.8, 1.0, 1.2, 0.0)), ("hue", (-0.1, 0.0, 0.1, 0.5))])
def test_colour_ops_match_torchvision(images, name, factors):
  """Each op alone: first in the order, the others at their identity (hue 0 is a round trip)."""
  names = ["brightness", "contrast", "saturation", "hue"]
  op = names.index(name)
  n = len(images)
  p = {k: jnp.full((n,), 0.0 if k == "hue" else 1.0) for k in names}
  p[name] = jnp.asarray(factors)
  p["order"] = jnp.asarray([[op] + [i for i in range(4) if i != op]] * n)
  ours = jax.jit(augment.color_jitter)(images, p)
  tv = getattr(F, f"adjust_{name}")
  theirs = np.stack([_numpy(tv(_torch(im), f)) for im, f in zip(images, factors)])
  np.testing.assert_allclose(ours, theirs, atol=2e-6)
  if name == "hue":
    np.testing.assert_allclose(jax.jit(augment.adjust_hue)(images, p["hue"]), theirs, atol=2e-6)


def test_grayscale_blur_solarize_match_torchvision(images):
  x = jnp.asarray(images)
  np.testing.assert_allclose(jnp.broadcast_to(augment.grayscale(x), x.shape),
                             _numpy(F.rgb_to_grayscale(_torch(images), 3)), atol=1e-6)
  sigmas = (0.1, 0.7, 1.3, 2.0)
  k = augment.blur_kernel_size(2.0, 19)
  assert k == 13
  ours = jax.jit(augment.gaussian_blur, static_argnums=2)(x, jnp.asarray(sigmas), k)
  theirs = np.stack([_numpy(F.gaussian_blur(_torch(im), [k, k], [s, s]))
                     for im, s in zip(images, sigmas)])
  np.testing.assert_allclose(ours, theirs, atol=1e-6)
  np.testing.assert_allclose(augment.solarize(x), _numpy(F.solarize(_torch(images), 128 / 255)))
  assert augment.blur_kernel_size(2.0, 5) == 9  # reflect padding needs half < side


def test_photometric_replays_as_torchvision_with_the_same_draws():
  c = config_lib.base_config()
  shape = (6, 3)
  x = np.random.default_rng(1).random(shape + (12, 12, 3)).astype(np.float32)
  half = jnp.full((3,), 0.5)
  p = augment.sample_params(jax.random.PRNGKey(0), shape, c.aug, half, half)
  with jax.numpy_dtype_promotion("strict"):
    ours = jax.jit(augment.photometric, static_argnums=2)(jnp.asarray(x), p, 9)
  p = jax.tree.map(np.asarray, p)
  ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
  names = ["brightness", "contrast", "saturation", "hue"]
  for idx in np.ndindex(shape):
    t = _torch(x[idx])
    if p["jitter"][idx]:
      for op in p["order"][idx]:
        t = ops[op](t, float(p[names[op]][idx]))
    if p["gray"][idx]:
      t = F.rgb_to_grayscale(t, 3)
    if p["blur"][idx]:
      t = F.gaussian_blur(t, [9, 9], [float(p["sigma"][idx])] * 2)
    if p["solarize"][idx]:
      t = F.solarize(t, 128 / 255)
    np.testing.assert_allclose(ours[idx], _numpy(t), atol=1e-5, err_msg=str(idx))


def test_param_rates_and_ranges():
  c = config_lib.base_config()
  a = c.aug
  n = 20000
  p = augment.sample_params(jax.random.PRNGKey(3), (n, 3), a, jnp.asarray(a.blur_prob),
                            jnp.asarray(a.solarize_prob))
  p = jax.tree.map(np.asarray, p)
  tol = lambda q: 4 * np.sqrt(q * (1 - q) / n) + 1e-9
  for key, probs in (("jitter", [0.8] * 3), ("gray", [0.2] * 3), ("blur", a.blur_prob),
                     ("solarize", a.solarize_prob)):
    for crop, q in enumerate(probs):
      assert abs(p[key][:, crop].mean() - q) <= tol(q), (key, crop)
  for key, (lo, hi) in (("brightness", (0.6, 1.4)), ("contrast", (0.6, 1.4)),
                        ("saturation", (0.8, 1.2)), ("hue", (-0.1, 0.1)), ("sigma", (0.1, 2.0))):
    v = p[key].ravel()
    assert lo <= v.min() and v.max() <= hi
    assert stats.kstest(v, "uniform", (lo, hi - lo)).pvalue > 1e-3, key
  np.testing.assert_array_equal(np.sort(p["order"], -1), np.broadcast_to(np.arange(4), (n, 3, 4)))
  first = np.bincount(p["order"][..., 0].ravel(), minlength=4) / (3 * n)
  assert np.abs(first - 0.25).max() < 0.01  # each op equally likely first


def test_device_augment_grayscale_and_solarize_rates_end_to_end():
  c = config_lib.base_config()
  n = 2000
  rng = np.random.default_rng(0)
  colour = (rng.random((n, 1, 1, 1, 3)) * 0.5 * 255).astype(np.uint8) + np.uint8([0, 60, 128])
  batch = {"global": np.broadcast_to(colour, (n, 2, 4, 4, 3)),
           "local": np.broadcast_to(colour, (n, 3, 4, 4, 3))}
  out = jax.jit(augment.device_augment(c))(jax.random.PRNGKey(0), batch)
  assert out["global"].dtype == jnp.float32 and out["local"].shape == (n, 3, 4, 4, 3)
  for crops in (out["global"], out["local"]):
    crops = np.asarray(crops)
    assert crops.min() >= -1e-6 and crops.max() <= 1 + 1e-6  # blur weights sum to 1 +- ulp
    gray = (crops[..., 0] == crops[..., 1]).all((-2, -1)) & (crops[..., 1] == crops[..., 2]).all(
        (-2, -1))
    assert np.abs(gray.mean(0) - 0.2).max() < 4 * np.sqrt(0.16 / n)
  # Only solarisation moves a pixel across 0.5 when nothing else is applied.
  c.aug.color_jitter_prob = c.aug.grayscale_prob = 0.0
  c.aug.blur_prob = (0.0, 0.0, 0.0)
  out = jax.jit(augment.device_augment(c))(jax.random.PRNGKey(1), batch)
  x = np.asarray(batch["global"][:, :, 0, 0], np.float32) / 255
  solarized = ~np.isclose(np.asarray(out["global"])[:, :, 0, 0], x).all(-1)
  assert solarized[:, 0].sum() == 0 and abs(solarized[:, 1].mean() - 0.2) < 4 * np.sqrt(0.16 / n)
  np.testing.assert_allclose(np.asarray(out["local"]), batch["local"] / 255, atol=1e-6)


def test_inversion_flips_a_share_of_crops_and_leaves_the_other_draws_alone():
  """aug.invert_prob (the shapes demo's addition): x -> 1 - x on that share of crops, after the
  release's ops, whose random draws stay the same as without it."""
  c = config_lib.base_config()
  n = 2000
  rng = np.random.default_rng(1)
  batch = {"global": rng.integers(0, 256, (n, 2, 4, 4, 3), dtype=np.uint8),
           "local": rng.integers(0, 256, (n, 3, 4, 4, 3), dtype=np.uint8)}
  plain = jax.jit(augment.device_augment(c))(jax.random.PRNGKey(2), batch)
  c.aug.invert_prob = 0.3
  out = jax.jit(augment.device_augment(c))(jax.random.PRNGKey(2), batch)
  for key in ("global", "local"):
    a, b = np.asarray(plain[key]), np.asarray(out[key])
    same = np.isclose(a, b, atol=1e-6).all((-3, -2, -1))
    flipped = np.isclose(1.0 - a, b, atol=1e-6).all((-3, -2, -1))
    assert (same | flipped).all()
    assert abs(flipped.mean() - 0.3) < 4 * np.sqrt(0.21 / flipped.size)
