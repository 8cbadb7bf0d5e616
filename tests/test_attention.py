"""Attention maps, 60%-mass masks, upsampling and Jaccard (dino_jax.attention)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from dino_jax.evaluate import attention_maps, plots
from dino_jax.models import VisionTransformer
from test_knn import random_params


def test_mass_mask_hand_example():
  # Sorted ascending 0.1 0.2 0.3 0.4, cumsum 0.1 0.3 0.6 1.0 > 0.4: the 0.3 and 0.4 patches
  # (0.7 of the mass: the smallest set holding 60%).
  maps = jnp.array([[0.1, 0.4], [0.2, 0.3]])
  np.testing.assert_array_equal(attention_maps.mass_masks(maps, 0.6), [[False, True], [False, True]])
  # Unnormalised maps are normalised first; exactly the threshold is enough (binary fractions:
  # cumsum 0.125 0.5 1.0, and 0.5 > 0.5 is false): only the 0.5 patch for threshold 0.5.
  maps = jnp.array([[[1.0, 3.0], [4.0, 0.0]]]) / 4  # 0.25, 0.75, 1.0, 0 -> sum 2
  np.testing.assert_array_equal(attention_maps.mass_masks(maps, 0.5), [[[False, False], [True, False]]])
  np.testing.assert_array_equal(attention_maps.mass_masks(maps, 0.51), [[[False, True], [True, False]]])
  # Equal values: the lower-index patch counts as smaller and goes first.
  np.testing.assert_array_equal(attention_maps.mass_masks(jnp.full((1, 4), 0.25), 0.5),
                                [[False, False, True, True]])


def test_mass_mask_matches_release_rule_in_torch():
  rng = np.random.default_rng(0)
  maps = rng.random((3, 6, 7)).astype(np.float32)  # distinct values: the torch sort is unambiguous
  att = torch.from_numpy(maps.reshape(3, -1))
  val, idx = torch.sort(att)
  val /= torch.sum(val, dim=1, keepdim=True)
  th_attn = torch.cumsum(val, dim=1) > (1 - 0.6)
  idx2 = torch.argsort(idx)
  for head in range(3):
    th_attn[head] = th_attn[head][idx2[head]]
  np.testing.assert_array_equal(attention_maps.mass_masks(jnp.asarray(maps), 0.6),
                                th_attn.reshape(3, 6, 7).numpy())


def test_upsample_alignment():
  maps = jnp.arange(6.0).reshape(1, 2, 3)
  up = np.asarray(attention_maps.upsample(maps, 4))
  assert up.shape == (1, 8, 12)
  assert up[0, 5, 9] == maps[0, 1, 2] and up[0, 3, 4] == maps[0, 0, 1] and up[0, 4, 3] == 3
  ref = torch.nn.functional.interpolate(torch.arange(6.0).reshape(1, 1, 2, 3), scale_factor=4,
                                        mode="nearest")
  np.testing.assert_array_equal(up, ref[0].numpy())


def test_jaccard_and_object_scores_by_hand():
  a = np.zeros((4, 4), bool)
  a[:2, :2] = True  # 4 pixels
  b = np.zeros((4, 4), bool)
  b[1:3, 1:3] = True  # 4 pixels, 1 shared
  assert float(attention_maps.jaccard(a, b)) == pytest.approx(1 / 7)
  assert float(attention_maps.jaccard(np.zeros((2, 2), bool), np.zeros((2, 2), bool))) == 1.0

  # 2 x 2 patches of 2 px; the object covers patch (0, 0) and half of patch (0, 1).
  obj = np.zeros((1, 4, 4), bool)
  obj[0, :2, :3] = True
  maps = np.array([[[[0.4, 0.3], [0.1, 0.0]],  # head 0: mask = patches (0,0), (0,1)
                    [[0.0, 0.1], [0.2, 0.5]]]], np.float32)  # head 1: (1,0), (1,1)
  s = attention_maps.object_scores(jnp.asarray(maps), jnp.asarray(obj), patch_size=2, threshold=0.6)
  # head 0: mask 8 px, object 6 px, all inside: 6 / 8; head 1: disjoint.
  np.testing.assert_allclose(s["jaccard"], [[6 / 8, 0.0]])
  # mass: head 0 = (0.4 * 4 + 0.3 * 2) / (0.8 * 4); head 1 = 0.1 * 2 / (0.8 * 4).
  np.testing.assert_allclose(s["mass_on_object"], [[2.2 / 3.2, 0.2 / 3.2]], rtol=1e-6)
  np.testing.assert_allclose(s["object_area"], [6 / 16])
  # Head mean 0.2 0.2 / 0.15 0.25: sorted shares 0.1875 0.25 0.25 0.3125 -> all but the 0.15
  # patch: 12 px holding the 6 object px.
  np.testing.assert_allclose(s["jaccard_mean_map"], [6 / 12])
  summary = attention_maps.summarize(jax.device_get(s))
  assert summary["jaccard"] == pytest.approx(0.75) and summary["per_head"] == [0.75, 0.0]
  assert summary["jaccard_head_mean"] == pytest.approx(0.375)
  assert summary["mass_on_object"] == pytest.approx(2.2 / 3.2)
  assert summary["object_area"] == pytest.approx(6 / 16)


def test_cls_attention_is_the_last_blocks_cls_row_and_plots(tmp_path):
  vit = VisionTransformer(patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16)
  images = np.random.default_rng(0).integers(0, 256, (2, 16, 12, 3), dtype=np.uint8)
  params = random_params(vit, (1, 16, 16, 3))
  maps = jax.jit(lambda p, x: attention_maps.cls_attention(vit, p, x))(params, images)
  assert maps.shape == (2, 2, 4, 3)
  normed = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  full = jax.jit(lambda p, x: vit.apply({"params": p}, x, method="get_last_selfattention"))(
      params, normed)
  np.testing.assert_allclose(maps[1, 1, 2, 0], full[1, 1, 0, 1 + 2 * 3], rtol=1e-5)
  plots.plot_grid(str(tmp_path / "grid.png"), images, np.asarray(maps), 4,
                      object_masks=images[..., 0] > 128)
  paths = plots.save_heads(str(tmp_path / "one"), images[0], np.asarray(maps[0]), 4)
  assert (tmp_path / "grid.png").stat().st_size > 0 and len(paths) == 5
  assert Image.open(paths[1]).size == (12, 16)


def test_load_image_resizes_like_the_release(tmp_path):
  Image.fromarray(np.zeros((50, 80, 3), np.uint8)).save(tmp_path / "x.png")
  assert attention_maps.load_image(str(tmp_path / "x.png"), (480, 480), 16).shape == (480, 480, 3)
  # One size: shorter side 36, longer 36 * 80 / 50 = 57.6 -> 57, then cut to multiples of 8.
  assert attention_maps.load_image(str(tmp_path / "x.png"), (36,), 8).shape == (32, 56, 3)
  # A PIL image or an array gives what its file gives; a gray (H, W) array becomes RGB.
  rgb = np.random.default_rng(0).integers(0, 256, (50, 80, 3), np.uint8)
  Image.fromarray(rgb).save(tmp_path / "y.png")
  want = attention_maps.load_image(tmp_path / "y.png", (36,), 8)
  np.testing.assert_array_equal(attention_maps.load_image(rgb, (36,), 8), want)
  np.testing.assert_array_equal(attention_maps.load_image(Image.fromarray(rgb), (36,), 8), want)
  gray = attention_maps.load_image(rgb[..., 0], (36,), 8)
  assert gray.shape == (32, 56, 3) and (gray == gray[..., :1]).all()
  with pytest.raises(ValueError, match="float32"):
    attention_maps.load_image(rgb.astype(np.float32), (36,), 8)
