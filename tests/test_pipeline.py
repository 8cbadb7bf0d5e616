"""grain pipelines: determinism, workers, resume, per-process slices, eval padding, sharding."""
import io

import jax
import numpy as np
import pytest
from PIL import Image

from dino_jax import config as config_lib
from dino_jax import sharding as sharding_lib
from dino_jax.data import augment, pipeline, sources
import helpers


class IndexSource:
  """Images whose red channel is the record's index everywhere (a crop tells which image it came
  from) and whose green and blue channels are ramps along x and y (they tell where)."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    image = np.zeros((20, 24, 3), np.uint8)
    image[..., 0] = i
    image[..., 1] = np.arange(24)[None, :] * 10
    image[..., 2] = np.arange(20)[:, None] * 10
    return {"image": image, "label": np.int32(i)}


def _config(**overrides):
  """The tiny config on 32 px shapes (crops resample them); dotted keys override."""
  return helpers.tiny_config(**{"data.shapes_image_size": 32, "data.shapes_eval_size": 50,
                                **overrides})


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _images(batch):
  """(B,) source indices of an IndexSource batch, read off the first global crop."""
  return batch["global"][:, 0, 0, 0, 0].astype(int)


def test_batches_have_the_train_step_format():
  c = _config()
  b = next(iter(pipeline.train_dataset(c, process_index=0, process_count=1)))
  assert b["global"].shape == (16, 2, 16, 16, 3) and b["global"].dtype == np.uint8
  assert b["local"].shape == (16, 2, 8, 8, 3) and b["local"].dtype == np.uint8
  c = _config(local_crops_number=0)
  b = next(iter(pipeline.train_dataset(c, process_index=0, process_count=1)))
  assert set(b) == {"global"}


def test_crops_on_device_give_the_host_batches_once_augmented(tmp_path):
  """aug.crops_on_device moves only the resampling: the device's crops of a batch are the host
  pipeline's (to PIL's rounding), and device_augment turns both into the same training crops."""
  host = next(iter(pipeline.train_dataset(_config(), process_index=0, process_count=1)))
  c = _config(**{"aug.crops_on_device": True})
  draws = next(iter(pipeline.train_dataset(c, process_index=0, process_count=1)))
  assert draws["image"].shape == (16, 32, 32, 3) and draws["global_boxes"].shape == (16, 2, 4)
  assert draws["local_flips"].shape == (16, 2)
  for name, size in (("global", 16), ("local", 8)):
    crops = augment.device_crops(draws["image"], draws[f"{name}_boxes"], draws[f"{name}_flips"],
                                 size)
    np.testing.assert_allclose(np.asarray(crops) * 255, host[name], atol=2.001)
  fn = jax.jit(augment.device_augment(c))
  a, b = fn(jax.random.PRNGKey(0), host), fn(jax.random.PRNGKey(0), draws)
  assert set(a) == set(b) == {"global", "local"}
  for k in a:
    assert a[k].shape == b[k].shape
    assert np.abs(np.asarray(a[k]) - np.asarray(b[k])).mean() < 1e-3, k
  Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(tmp_path / "a.png")  # any sizes
  with pytest.raises(ValueError, match="crops_on_device.*'folder'"):
    pipeline.validate(_config(**{"aug.crops_on_device": True, "data.source": "folder",
                                 "data.path": str(tmp_path), "batch_size": 1,
                                 "eval.after_training": False}))


def test_same_seed_same_batches_other_seed_other_batches():
  first = _take(iter(pipeline.train_dataset(_config(), process_index=0, process_count=1)), 3)
  again = _take(iter(pipeline.train_dataset(_config(), process_index=0, process_count=1)), 3)
  _assert_same(first, again)
  other = _take(iter(pipeline.train_dataset(_config(seed=1), process_index=0, process_count=1)), 1)
  assert not np.array_equal(first[0]["global"], other[0]["global"])


def test_epochs_reshuffle_and_recrop_and_cover_every_image_once():
  c = _config(batch_size=8)
  it = iter(pipeline.train_dataset(c, process_index=0, process_count=1, source=IndexSource(48)))
  epochs = [np.concatenate([_images(b) for b in _take(it, 6)]) for _ in range(2)]
  for e in epochs:
    assert sorted(e) == list(range(48))  # each image once an epoch
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled
  # An image's crops differ between epochs: its random draws depend on the epoch.
  crops = [{i: b["global"][j] for b in _take(it, 6) for j, i in enumerate(_images(b))}
           for _ in range(2)]
  assert sum(np.array_equal(crops[0][i], crops[1][i]) for i in range(48)) <= 1


@pytest.mark.parametrize("processes", [2, 4])
def test_process_slices_are_the_rows_of_the_one_process_batch(processes):
  """Process p holds rows p*B/P .. of the single-process global batch, in order: the assembled
  global array (and the per-row device augmentation) is the same whatever the process count."""
  c = _config(batch_size=8)
  whole = _take(iter(pipeline.train_dataset(c, process_index=0, process_count=1,
                                            source=IndexSource(40))), 10)
  parts = [_take(iter(pipeline.train_dataset(c, process_index=p, process_count=processes,
                                             source=IndexSource(40))), 10)
           for p in range(processes)]
  for step in range(10):
    got = np.concatenate([_images(parts[p][step]) for p in range(processes)])
    assert parts[0][step]["global"].shape[0] == 8 // processes
    np.testing.assert_array_equal(got, _images(whole[step]))
    for key in whole[step]:  # the crops too, not only which images
      np.testing.assert_array_equal(
          np.concatenate([parts[p][step][key] for p in range(processes)]), whole[step][key])
  seen = np.concatenate([_images(b) for p in parts for b in p[:5]])  # 5 steps = one epoch
  assert sorted(seen) == list(range(40))


def test_resume_mid_epoch_repeats_the_following_batches_exactly():
  c = _config()  # 96 images, batch 16: 6 steps an epoch; resume at step 4, run into epoch 2
  it = iter(pipeline.train_dataset(c, process_index=0, process_count=1))
  _take(it, 4)
  expected = _take(it, 4)
  resumed = iter(pipeline.train_dataset(c, process_index=0, process_count=1, start_step=4))
  _assert_same(_take(resumed, 4), expected)


@pytest.mark.parametrize("processes", [2, 4])
def test_a_start_step_gives_the_same_global_batches_on_any_process_count(processes):
  """Resuming at step 5 on P processes: their rows, stacked in process order, are the global
  batches one process makes from step 0 (a run resumed on another topology sees the same data)."""
  c = _config()
  one = _take(iter(pipeline.train_dataset(c, process_index=0, process_count=1)), 8)[5:]
  parts = [_take(iter(pipeline.train_dataset(c, process_index=p, process_count=processes,
                                             start_step=5)), 3) for p in range(processes)]
  for s in range(3):
    stacked = {k: np.concatenate([parts[p][s][k] for p in range(processes)]) for k in one[s]}
    _assert_same([stacked], [one[s]])


def test_worker_processes_give_the_same_batches_and_resume(tmp_path):
  """Two worker processes: the same batches as in-process, from any start step, and corrupt files
  skipped inside the workers."""
  serial = _take(iter(pipeline.train_dataset(_config(), process_index=0, process_count=1)), 5)
  it = iter(pipeline.train_dataset(_config(**{"data.workers": 2}), process_index=0,
                                   process_count=1))
  _assert_same(_take(it, 3), serial[:3])
  _assert_same(_take(it, 2), serial[3:])
  it.close()
  resumed = iter(pipeline.train_dataset(_config(**{"data.workers": 2}), process_index=0,
                                        process_count=1, start_step=3))
  _assert_same(_take(resumed, 2), serial[3:])
  resumed.close()
  # A folder of 16 JPEGs, three of them unreadable: workers skip them and keep going.
  buf = io.BytesIO()
  Image.new("RGB", (30, 20), (0, 90, 200)).save(buf, "JPEG")
  for i in range(16):
    data = buf.getvalue() if i % 5 else (b"", b"junk", buf.getvalue()[:200], b"")[i // 5]
    (tmp_path / f"{i:02d}.jpg").write_bytes(data)
  c = _config(**{"data.source": "folder", "data.path": str(tmp_path), "data.workers": 1})
  pipeline.validate(c)
  it = iter(pipeline.train_dataset(c, process_index=0, process_count=1))
  for b in _take(it, 3):
    assert b["global"].shape == (16, 2, 16, 16, 3)
    np.testing.assert_allclose(b["global"].reshape(-1, 3).mean(0), (0, 90, 200), atol=4)
  it.close()


def test_eval_batches_pad_and_mask_every_image_once():
  c = _config()
  src = sources.make_source(c, c.data.eval_split)
  batches = list(pipeline.eval_batches(c, c.data.eval_split, 16))
  assert len(batches) == 4 and all(b["image"].shape == (16, 32, 32, 3) for b in batches)
  assert batches[-1]["valid"].tolist() == [True, True] + [False] * 14
  images = np.concatenate([b["image"] for b in batches])[:50]
  np.testing.assert_array_equal(images, np.stack([src[i]["image"] for i in range(50)]))
  labels = np.concatenate([b["label"] for b in batches])[:50]
  assert labels.dtype == np.int32 and labels.tolist() == [src[i]["label"] for i in range(50)]
  masks = np.concatenate([b["object_mask"] for b in batches])[:50]
  np.testing.assert_array_equal(masks, np.stack([src[i]["object_mask"] for i in range(50)]))
  # Three processes: the same number of batches each; together every image exactly once.
  per = [list(pipeline.eval_batches(c, c.data.eval_split, 8, process_index=p, process_count=3))
         for p in range(3)]
  assert len({len(b) for b in per}) == 1
  got = np.concatenate([b["image"][b["valid"]] for bs in per for b in bs])
  np.testing.assert_array_equal(got, images)


def test_eval_batches_of_a_folder_use_the_eval_transform(tmp_path):
  rng = np.random.default_rng(0)
  arrays = [(rng.random((60 + 10 * i, 80, 3)) * 255).astype(np.uint8) for i in range(5)]
  for i, a in enumerate(arrays):
    Image.fromarray(a).save(tmp_path / f"{i}.png")
  c = _config(**{"data.source": "folder", "data.path": str(tmp_path), "data.eval_resize": 40,
                 "global_crops_size": 32})
  batches = list(pipeline.eval_batches(c, c.data.train_split, 4))
  assert [b["valid"].sum() for b in batches] == [4, 1] and "object_mask" not in batches[0]
  assert (np.concatenate([b["label"] for b in batches])[:5] == -1).all()  # flat: no labels
  for i, a in enumerate(arrays):
    expected = augment.eval_transform(a, 40, 32)
    np.testing.assert_array_equal(batches[i // 4]["image"][i % 4], expected)


@pytest.mark.parametrize("draft", [False, True])
def test_large_jpegs_are_decoded_whole_unless_jpeg_draft(tmp_path, draft):
  """By default every JPEG is decoded at full size (the release's pixels); data.jpeg_draft lets
  a large one be decoded at a reduced DCT scale that still covers the eval resize."""
  rng = np.random.default_rng(0)
  big = Image.fromarray((rng.random((400, 600, 3)) * 255).astype(np.uint8))
  buf = io.BytesIO()
  big.save(buf, "JPEG", quality=90)
  (tmp_path / "a.jpg").write_bytes(buf.getvalue())
  c = _config(**{"data.source": "folder", "data.path": str(tmp_path), "data.eval_resize": 64,
                 "global_crops_size": 48, "data.jpeg_draft": draft})
  got = next(iter(pipeline.eval_batches(c, c.data.train_split, 1)))["image"][0]
  with Image.open(io.BytesIO(buf.getvalue())) as img:
    if draft:
      img.draft("RGB", (150, 100))  # 1/4 scale: 100 px, the smallest >= 64
    expected = augment.eval_transform(np.asarray(img.convert("RGB")), 64, 48)
  np.testing.assert_array_equal(got, expected)



def test_probe_train_batches_cover_each_image_once_an_epoch_on_any_process_count(monkeypatch):
  """37 images, global batch 12: 4 steps an epoch on every process; process p holds every P-th
  image of the one-process stream with the same crop; reshuffled each epoch."""
  monkeypatch.setattr(pipeline, "make_source", lambda config, split, **kw: IndexSource(37))
  c = _config(global_crops_size=8)

  def epoch(e, processes=1, p=0):
    return list(pipeline.probe_train_batches(c, e, 12, process_index=p, process_count=processes))

  def valid(batches, key):
    return np.concatenate([b[key][b["valid"]] for b in batches])

  one = epoch(0)
  assert len(one) == 4 and [int(b["valid"].sum()) for b in one] == [12, 12, 12, 1]
  assert one[0]["image"].shape == (12, 8, 8, 3) and one[0]["image"].dtype == np.uint8
  labels = valid(one, "label")
  assert sorted(labels) == list(range(37))
  assert (valid(one, "image")[..., 0] == labels[:, None, None]).all()  # each crop of its image
  assert not np.array_equal(valid(epoch(1), "label"), labels)
  _assert_same(one, epoch(0))
  for processes in (2, 3):
    per = [epoch(0, processes, p) for p in range(processes)]
    assert {len(b) for b in per} == {4}
    for p, batches in enumerate(per):
      assert batches[0]["image"].shape[0] == 12 // processes
      np.testing.assert_array_equal(valid(batches, "label"), labels[p::processes])
      np.testing.assert_array_equal(valid(batches, "image"), valid(one, "image")[p::processes])
    assert not per[-1][-1]["valid"].any()  # a shorter share ends with an invalid batch

def test_global_batch_builds_sharded_arrays_without_implicit_transfers():
  mesh = sharding_lib.make_mesh()
  sh = sharding_lib.batch_sharding(mesh)
  local = next(iter(pipeline.train_dataset(_config(), process_index=0, process_count=1)))
  with jax.transfer_guard("disallow"):
    batch = pipeline.global_batch(local, sh)
  assert batch["global"].sharding == sh and len(batch["local"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(batch["local"]), local["local"])


def test_train_min_side_keeps_the_smallest_crop_at_full_resolution():
  c = config_lib.base_config()  # 224 from scale 0.4, 96 from scale 0.05, ratio down to 3/4
  side = pipeline._train_min_side(c)  # pylint: disable=protected-access
  assert side == 496  # ceil(96 / sqrt(0.05 * 3 / 4))
  rng = np.random.default_rng(0)
  for _ in range(2000):  # the smallest local crop of a side x side image still has >= 96 px
    _, _, h, w = augment.random_resized_crop_box(rng, side, side, (0.05, 0.4))
    assert min(h, w) >= 96 - 1
