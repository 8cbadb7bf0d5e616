"""DINO's multi-crop augmentation: geometric on the host, photometric on the device.

The release applies the whole recipe per image with PIL in its data-loader workers (reference:
2 global crops + `local_crops_number` local crops; flip, colour jitter, grayscale, blur, solarize).
Here the same recipe is split in two, with the same semantics:

* Host (`MultiCrop`, a grain RandomMapTransform, deterministic from (seed, epoch, index) through
  grain's per-index generator): RandomResizedCrop with torchvision's sampling (10 tries of
  scale / log-ratio, then the centre-crop fallback) and PIL bicubic resampling as torchvision does
  for PIL images, then a horizontal flip. Output uint8 crops. The linear probe's train crop
  (`RandomResizedCropFlip`) and the evaluation transform (`eval_transform`) run on the host too.
* Device (`device_augment`, a pure JAX function that dino_jax.train.train_step runs inside its jit,
  vectorised over the batch with per-crop random parameters): colour jitter (brightness,
  contrast, saturation, hue in a random order per crop) with p 0.8, grayscale p 0.2, Gaussian blur
  (p 1.0 / 0.1 for the global crops, 0.5 for the local ones), solarize p 0.2 on global crop 2.

Departure (where, not what): the photometric ops run on the accelerator, on fixed-size crops, where
they cost nothing next to the step, instead of PIL on the host (the release's known input
bottleneck). They follow torchvision's *tensor* semantics (torchvision.transforms.functional on
float images in [0, 1]: adjust_brightness / contrast / saturation / hue, grayscale weights 0.2989,
0.587, 0.114, contrast blending with the mean of the grayscale image), so intermediate values are
not rounded to uint8 between ops as with PIL. The blur is torchvision's tensor gaussian_blur
(reflect padding) with a kernel of 2 * ceil(3 * sigma_max) + 1 taps (13 for sigma_max = 2; capped
at 2 * (side - 1) + 1 for small crops), sigma uniform in blur_sigma; the release's
PIL GaussianBlur(radius) approximates a Gaussian of sigma = radius with box blurs.

Shapes: B batch, G = 2 global crops, L local crops, H W global side, h w local side.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from PIL import Image

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
RATIO = (3 / 4, 4 / 3)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# Host: crops.
# ----------------------------------------------------------------------------------------------
def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: tuple[float, float], ratio: tuple[float, float] = RATIO
                            ) -> tuple[int, int, int, int]:
  """(top, left, h, w) as torchvision's RandomResizedCrop.get_params draws it: up to 10 tries of
  area uniform in scale x image area and log aspect ratio uniform in log(ratio), then the
  centre-crop fallback. (Its uniforms are drawn in one call: one numpy call costs more than the
  arithmetic.)"""
  u = rng.random(22)
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for t in range(10):
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[2 * t])
    aspect = math.exp(log_lo + (log_hi - log_lo) * u[2 * t + 1])
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:  # top, left uniform integers as torch.randint
      return int(u[20] * (height - h + 1)), int(u[21] * (width - w + 1)), h, w
  in_ratio = width / height  # fallback: the largest centred crop within the ratio range
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img: Image.Image, box: tuple[int, int, int, int], size: int,
                 resample: int = Image.BICUBIC) -> np.ndarray:
  """torchvision's F.resized_crop(img, *box, [size, size], resample) on a PIL image, as uint8.

  Crop, then resize: the filter sees only the crop (PIL's resize(box=...) would read past it).
  """
  top, left, h, w = box
  img = img.crop((left, top, left + w, top + h))
  if (h, w) != (size, size):  # torchvision returns a same-size crop unresampled
    img = img.resize((size, size), resample)
  return np.asarray(img)


@dataclasses.dataclass(frozen=True)
class MultiCrop(grain.transforms.RandomMap):
  """{'image': uint8 (H0, W0, 3), ...} -> {'global': uint8 (2, H, W, 3), 'local': (L, h, w, 3)}.

  Each crop: RandomResizedCrop (bicubic), then a horizontal flip with flip_prob. No 'local' key
  when local_number is 0.
  """
  global_size: int
  local_size: int
  local_number: int
  global_scale: tuple[float, float]
  local_scale: tuple[float, float]
  flip_prob: float = 0.5
  on_device: bool = False

  @classmethod
  def from_config(cls, config: mlc.ConfigDict) -> MultiCrop:
    return cls(config.global_crops_size, config.local_crops_size, config.local_crops_number,
               tuple(config.global_crops_scale), tuple(config.local_crops_scale),
               config.aug.flip_prob, config.aug.crops_on_device)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """With on_device, the same draws without the pixels: {'image': uint8 (H0, W0, 3),
    'global_boxes': int32 (2, 4), 'global_flips': bool (2,), 'local_boxes', 'local_flips'} for
    `device_crops` (the images of a batch must then share one size)."""
    image = element["image"]
    height, width = image.shape[:2]
    img = None if self.on_device else Image.fromarray(image)
    out = {"image": image} if self.on_device else {}
    for name, n, size, scale in (("global", 2, self.global_size, self.global_scale),
                                 ("local", self.local_number, self.local_size, self.local_scale)):
      if not n:
        continue
      draws = [(random_resized_crop_box(rng, width, height, scale), rng.random() < self.flip_prob)
               for _ in range(n)]
      if self.on_device:
        out[f"{name}_boxes"] = np.array([box for box, _ in draws], np.int32)
        out[f"{name}_flips"] = np.array([flip for _, flip in draws])
      else:
        crops = [resized_crop(img, box, size) for box, _ in draws]
        out[name] = np.stack([c[:, ::-1] if flip else c for c, (_, flip) in zip(crops, draws)])
    return out



@dataclasses.dataclass(frozen=True)
class RandomResizedCropFlip(grain.transforms.RandomMap):
  """The linear probe's train transform, the release's: torchvision's RandomResizedCrop(size)
  (bilinear, its default) + RandomHorizontalFlip. {'image': uint8 (H0, W0, 3), 'label'} ->
  {'image': uint8 (size, size, 3), 'label': int32, 'valid': True}."""
  size: int
  scale: tuple[float, float] = (0.08, 1.0)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    img = Image.fromarray(element["image"])
    box = random_resized_crop_box(rng, img.width, img.height, self.scale)
    out = resized_crop(img, box, self.size, Image.BILINEAR)
    if rng.random() < 0.5:
      out = out[:, ::-1]
    return {"image": out, "label": np.int32(element["label"]), "valid": np.True_}


def eval_transform(image: np.ndarray, resize: int, crop: int) -> np.ndarray:
  """torchvision's Resize(resize, BICUBIC) (shorter side) + CenterCrop(crop), uint8 -> uint8."""
  img = Image.fromarray(image)
  w, h = img.size
  short, long = min(w, h), max(w, h)
  new_short, new_long = resize, int(resize * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_w, new_h) != (w, h):
    img = img.resize((new_w, new_h), Image.BICUBIC)
  top, left = int(round((new_h - crop) / 2)), int(round((new_w - crop) / 2))
  return np.asarray(img.crop((left, top, left + crop, top + crop)))


# ----------------------------------------------------------------------------------------------
# Device: crops (aug.crops_on_device), the host's resized_crop as two matrix products.
# ----------------------------------------------------------------------------------------------
def _bicubic(x: jax.Array) -> jax.Array:
  """PIL's bicubic filter (a = -0.5), support 2."""
  a, x = -0.5, jnp.abs(x)
  return jnp.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                   jnp.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def resize_weights(start: jax.Array, length: jax.Array, n: int, size: int) -> jax.Array:
  """(..., size, n): output pixel i of resizing pixels start .. start + length - 1 of an axis of n
  to `size` is the weighted sum of the axis' pixels with row i, as PIL's bicubic resample of the
  cropped image computes its coefficients (support scaled by the shrink factor, the window cut at
  the crop's edges, each row normalised). A length equal to size gives the identity: torchvision's
  unresampled same-size crop.

  start, length: int (...).
  """
  start = start[..., None, None].astype(jnp.float32)
  length = length[..., None, None].astype(jnp.float32)
  scale = length / size
  filterscale = jnp.maximum(scale, 1.0)
  centre = (jnp.arange(size, dtype=jnp.float32)[:, None] + 0.5) * scale  # crop coordinates
  x = jnp.arange(n, dtype=jnp.float32) - start  # (..., 1, n)
  w = _bicubic((x - centre + 0.5) / filterscale) * ((x >= 0) & (x < length))
  return w / jnp.sum(w, -1, keepdims=True)


def device_crops(image: jax.Array, boxes: jax.Array, flips: jax.Array, size: int) -> jax.Array:
  """The host's resized_crop (+ flip) on the device: uint8 images (B, H0, W0, 3), boxes int32
  (B, N, 4) (top, left, h, w), flips bool (B, N) -> float32 (B, N, size, size, 3) in [0, 1] on
  the 1/255 grid of the host's uint8 crops.

  Rounded to uint8 levels after each pass, in Pillow's order of the passes; the coefficients are
  float where Pillow's are 22-bit fixed point (tests: within two levels of 255 of resized_crop,
  under 0.5 % of pixels off). Both orders are computed for every crop and one is kept: at these
  sizes cheaper than gathering the crops by order.
  """
  top, left, h, w = (boxes[..., i] for i in range(4))
  rows = resize_weights(top, h, image.shape[1], size)  # (B, N, size, H0)
  cols = resize_weights(left, w, image.shape[2], size)  # (B, N, size, W0)
  cols = jnp.where(flips[..., None, None], cols[..., ::-1, :], cols)
  to_uint8_grid = lambda v: jnp.round(jnp.clip(v, 0, 255))  # as PIL after each pass
  x = image.astype(jnp.float32)
  rows_first = to_uint8_grid(jnp.einsum("bniwc,bnjw->bnijc", to_uint8_grid(
      jnp.einsum("bnih,bhwc->bniwc", rows, x)), cols))
  cols_first = to_uint8_grid(jnp.einsum("bnih,bnhjc->bnijc", rows, to_uint8_grid(
      jnp.einsum("bhwc,bnjw->bnhjc", x, cols))))
  # Pillow's pass order for these sizes (docs/notes/data.md, "Pillow's resize pass order").
  rows_first_where = (h > size) & (2 * w < h + size)
  return jnp.where(rows_first_where[..., None, None, None], rows_first, cols_first) / 255.0


# ----------------------------------------------------------------------------------------------
# Device: photometric ops on float images (..., H, W, 3) in [0, 1], one factor per image (...).
# ----------------------------------------------------------------------------------------------
def _per_image(x: jax.Array) -> jax.Array:
  return x[..., None, None, None]


def grayscale(img: jax.Array) -> jax.Array:
  """(..., H, W, 3) -> (..., H, W, 1) luma, torchvision's rgb_to_grayscale weights."""
  r, g, b = GRAY_WEIGHTS
  return r * img[..., :1] + g * img[..., 1:2] + b * img[..., 2:]


def _blend(a: jax.Array, b: jax.Array, factor: jax.Array) -> jax.Array:
  f = _per_image(factor)
  return jnp.clip(f * a + (1 - f) * b, 0, 1)


def adjust_hue(img: jax.Array, factor: jax.Array) -> jax.Array:
  """Hue rotated by factor in [-0.5, 0.5] turns, through HSV as torchvision's _rgb2hsv/_hsv2rgb."""
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  maxc, minc = jnp.max(img, -1), jnp.min(img, -1)
  eqc = maxc == minc
  cr = maxc - minc
  s = cr / jnp.where(eqc, 1.0, maxc)
  inv = 1.0 / jnp.where(eqc, 1.0, cr)  # one division, not three: within 1e-6 of torchvision
  rc, gc, bc = (maxc - r) * inv, (maxc - g) * inv, (maxc - b) * inv
  h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = h / 6.0 + 1.0  # in [5/6, 11/6): x mod 1 = x - floor(x), far cheaper than jnp.mod
  h = h - jnp.floor(h) + factor[..., None, None]
  h = h - jnp.floor(h)
  # HSV -> RGB: channel n = v - v s clip(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6, n = 5, 3, 1;
  # equal to torchvision's six-sector table.
  k = jnp.asarray([5.0, 3.0, 1.0]) + 6.0 * h[..., None]
  k = jnp.where(k >= 6.0, k - 6.0, k)
  rgb = maxc[..., None] * (1 - s[..., None] * jnp.clip(jnp.minimum(k, 4 - k), 0, 1))
  return jnp.clip(rgb, 0, 1)  # as torchvision's clamps of p, q, t


def gaussian_blur(img: jax.Array, sigma: jax.Array, kernel_size: int) -> jax.Array:
  """torchvision's gaussian_blur(img, [k, k], [sigma, sigma]) on tensors, one sigma per image:
  a separable Gaussian of kernel_size taps at integer offsets, normalised, reflect padding.

  Each pass is a matrix product with an (n, n) matrix of the taps at their reflected source
  pixels, on small crops faster than summed shifts (docs/notes/data.md, "Blur as matrices").
  """
  half = kernel_size // 2
  offsets = jnp.arange(kernel_size) - half
  taps = jnp.exp(-0.5 * (offsets.astype(img.dtype) / sigma[..., None])**2)
  taps = taps / jnp.sum(taps, -1, keepdims=True)  # (..., k)

  def matrix(n):  # (..., n, n): output pixel i reads pixel j with weight m[i, j]
    src = jnp.abs(jnp.arange(n)[:, None] + offsets)  # reflect below 0 ...
    src = jnp.where(src >= n, 2 * (n - 1) - src, src)  # ... and past n - 1
    return jnp.einsum("...t,itj->...ij", taps, (src[..., None] == jnp.arange(n)).astype(img.dtype))

  img = jnp.einsum("...ij,...jwc->...iwc", matrix(img.shape[-3]), img)
  return jnp.einsum("...ij,...hjc->...hic", matrix(img.shape[-2]), img)


def solarize(img: jax.Array, threshold: float = 128 / 255) -> jax.Array:
  return jnp.where(img >= threshold, 1.0 - img, img)


def blur_kernel_size(sigma_max: float, side: int) -> int:
  """2 ceil(3 sigma_max) + 1 taps, capped where reflect padding needs half < side."""
  return min(2 * math.ceil(3 * sigma_max) + 1, 2 * (side - 1) + 1)


def sample_params(rng: jax.Array, shape: tuple[int, ...], aug: mlc.ConfigDict,
                  blur_prob: jax.Array, solarize_prob: jax.Array) -> dict[str, jax.Array]:
  """The random draws of `photometric` for images of leading shape `shape` (e.g. (B, G)).

  blur_prob, solarize_prob: broadcastable to shape (e.g. one per crop index, (G,)).
  Returns: 'jitter', 'gray', 'blur', 'solarize' bools (shape); 'order' int32 (shape + (4,)), a
  permutation of (brightness, contrast, saturation, hue) per image; 'brightness', 'contrast',
  'saturation' factors uniform in [max(0, 1 - x), 1 + x], 'hue' in [-x, x]; 'sigma'; 'invert'
  (not in the release: aug.invert_prob, 0 there) drawn from its own key so the others do not move.
  """
  k = jax.random.split(rng, 10)
  u = lambda key, lo=0.0, hi=1.0: jax.random.uniform(key, shape, minval=lo, maxval=hi)
  factor = lambda key, x: u(key, max(0.0, 1.0 - x), 1.0 + x)
  return {
      "jitter": u(k[0]) < aug.color_jitter_prob,
      "order": jnp.argsort(jax.random.uniform(k[1], shape + (4,)), axis=-1).astype(jnp.int32),
      "brightness": factor(k[2], aug.brightness),
      "contrast": factor(k[3], aug.contrast),
      "saturation": factor(k[4], aug.saturation),
      "hue": u(k[5], -aug.hue, aug.hue),
      "gray": u(k[6]) < aug.grayscale_prob,
      "blur": u(k[7]) < blur_prob,
      "sigma": u(k[8], *aug.blur_sigma),
      "solarize": u(k[9]) < solarize_prob,
      "invert": u(jax.random.fold_in(rng, 10)) < aug.invert_prob,
  }


def color_jitter(img: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
  """torchvision's ColorJitter with the factors and order of p (`sample_params`), every image.

  Brightness, contrast and saturation blend the image with black, the mean of its grayscale and
  its grayscale (torchvision's _blend); hue rotates it in HSV. Hue, the costly one, is computed
  once: three blend steps before it and three after, each applying the next non-hue op where it
  falls on that side of hue and the identity (factor 1, exact) elsewhere. The steps are a loop,
  not an unrolled chain, which XLA's CPU fusion would recompute for every read of a pixel's three
  channels (docs/notes/data.md, "Colour jitter as a loop").
  """
  order = p["order"]
  hue_at = jnp.argmax(order == 3, -1)
  others = jnp.take_along_axis(order, jnp.argsort(order == 3, -1, stable=True), -1)[..., :3]
  factors = jnp.stack([p["brightness"], p["contrast"], p["saturation"]], -1)

  def blend(step, img):
    slot = jnp.where(step < 3, step, step - 4)
    active = jnp.where(step < 3, slot < hue_at, slot >= hue_at)
    op = jnp.take(others, slot, axis=-1)
    gray = grayscale(img)
    target = jnp.where(_per_image(op == 0), 0.0, jnp.where(
        _per_image(op == 1), jnp.mean(gray, axis=(-3, -2, -1), keepdims=True), gray))
    factor = jnp.take_along_axis(factors, op[..., None], -1)[..., 0]
    return _blend(img, target, jnp.where(active, factor, 1.0))

  def step(i, img):  # 0-2: blends before hue, 3: hue, 4-6: blends after
    return jax.lax.cond(i == 3, lambda x: adjust_hue(x, p["hue"]), functools.partial(blend, i),
                        img)

  return jax.lax.fori_loop(0, 7, step, img)


def photometric(img: jax.Array, p: dict[str, jax.Array], blur_kernel: int) -> jax.Array:
  """Colour jitter (random order) -> grayscale -> blur -> solarize -> inversion, each where p says.

  img: float (..., H, W, 3) in [0, 1]; p: `sample_params` for its leading shape.
  """
  img = jnp.where(_per_image(p["jitter"]), color_jitter(img, p), img)
  img = jnp.where(_per_image(p["gray"]), grayscale(img), img)
  img = jnp.where(_per_image(p["blur"]), gaussian_blur(img, p["sigma"], blur_kernel), img)
  img = jnp.where(_per_image(p["solarize"]), solarize(img), img)
  return jnp.where(_per_image(p["invert"]), 1.0 - img, img)


def device_augment(config: mlc.ConfigDict) -> Callable[[jax.Array, dict], dict]:
  """(rng, {'global': uint8 (B, G, H, W, 3), 'local': uint8 (B, L, h, w, 3)}) -> the same keys
  as float32 in [0, 1] after DINO's photometric ops; for train_step(augment=...), inside its jit.
  A batch of MultiCrop(on_device=True) ({'image', 'global_boxes', 'global_flips', ...}) is
  cropped here first (`device_crops`).
  """
  a = config.aug
  blur_g, blur_2, blur_l = a.blur_prob
  sol_g, sol_2, sol_l = a.solarize_prob

  def crops(rng, x, blur_prob, solarize_prob):
    x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    p = sample_params(rng, x.shape[:2], a, jnp.asarray(blur_prob), jnp.asarray(solarize_prob))
    return photometric(x, p, blur_kernel_size(a.blur_sigma[1], min(x.shape[2:4])))

  def augment(rng: jax.Array, batch: dict) -> dict:
    k_global, k_local = jax.random.split(rng)
    batch = dict(batch)
    if "global_boxes" in batch:  # MultiCrop(on_device=True): crop first
      image = batch.pop("image")
      for name, size in (("global", config.global_crops_size), ("local", config.local_crops_size)):
        if f"{name}_boxes" in batch:
          batch[name] = device_crops(image, batch.pop(f"{name}_boxes"),
                                     batch.pop(f"{name}_flips"), size)
    batch["global"] = crops(k_global, batch["global"], (blur_g, blur_2), (sol_g, sol_2))
    if "local" in batch:
      batch["local"] = crops(k_local, batch["local"], blur_l, sol_l)
    return batch

  return augment


def normalize(images: jax.Array) -> jax.Array:
  """uint8 or [0, 1] float (..., 3) -> ImageNet-normalised float32: every network's input (the
  release's final transforms.Normalize), on the device."""
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 255.0
  return (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
