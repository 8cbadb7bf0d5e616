"""Speed of the input side: the grain multi-crop pipeline against a torchvision DataLoader.

  python benchmarks/input_pipeline.py [--images 2000] [--workers 1,2] [--batches 20]

1. A folder of --images generated JPEGs of 500 x 375 (written once to --dir). The full DINO
   multi-crop recipe (2 x 224 + 10 x 96), per worker count:
   - dino_jax: the grain pipeline (decode, RandomResizedCrop, flip on the host, one thread a
     worker) and, separately, the photometric ops (dino_jax.data.augment.device_augment) jitted
     on this CPU: on an accelerator they run inside the step instead.
   - torchvision: a DataLoader with the release's recipe written from the reference (PIL colour
     jitter, grayscale, PIL GaussianBlur, solarize, ToTensor, Normalize), same workers and batch.
2. The embedded shapes source: images generated per second on one core.
3. The main job (configs/default.py, in-process), with the crops resampled on the host (PIL) and
   on the device (aug.crops_on_device, the host drawing only the boxes): host CPU time per batch
   in the first epoch (images generated) and later (cached), the device augmentation per batch
   (crops included where on the device), and the train step (with the device augmentation) fed a
   fixed batch or the pipeline, interleaved; each as a share of the step.

Prints one JSON object as its last line.
"""
import json
import os
import random
import time

import jax
import numpy as np
from absl import app, flags
from PIL import Image, ImageFilter, ImageOps

from dino_jax import config as config_lib
from dino_jax import sharding as sharding_lib
from dino_jax import train
from dino_jax.data import augment, pipeline, shapes

_DIR = flags.DEFINE_string("dir", "/tmp/dino_jax_bench_jpegs", "Where the JPEGs are written.")
_IMAGES = flags.DEFINE_integer("images", 2000, "JPEGs of 500 x 375.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Worker process counts to time.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images a batch in the folder benchmark.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches after 3 warm-up batches.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time the torchvision DataLoader.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Main job: rounds of 5 steps, fixed batch vs fed.")


def make_jpegs(root: str, n: int) -> None:
  """n smooth random 500 x 375 photos-like JPEGs (blobs plus grain), quality 90."""
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    path = os.path.join(root, f"{i:05d}.jpg")
    if os.path.exists(path):
      continue
    blobs = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize(
        (500, 375), Image.BICUBIC)
    grain = rng.normal(0, 12, (375, 500, 3))
    img = np.clip(np.asarray(blobs) + grain, 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)


def _rate(it, batch_size: int, batches: int) -> float:
  for _ in range(3):  # warm-up: worker start, first batches
    next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch_size / (time.perf_counter() - t)


def folder_config(root: str, workers: int):
  c = config_lib.base_config()
  c.batch_size = _BATCH.value
  c.local_crops_number = 10
  c.data.source, c.data.path = "folder", root
  c.data.workers = workers
  with c.data.unlocked():
    c.data.threads = 1  # one core a worker, as the DataLoader's
  return c


def ours(root: str, workers: int) -> float:
  it = iter(pipeline.train_dataset(folder_config(root, workers), process_index=0,
                                   process_count=1))
  try:
    return _rate(it, _BATCH.value, _BATCHES.value)
  finally:
    it.close()


def _device_ms(config, batch, repeats: int = 10) -> float:
  """Median ms of device_augment on batch, jitted on the default device."""
  fn = jax.jit(augment.device_augment(config))
  batch = jax.device_put(batch)
  jax.block_until_ready(fn(jax.random.PRNGKey(0), batch))
  times = []
  for i in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(jax.random.PRNGKey(i), batch))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def _crops(config, b):
  g, l, n = config.global_crops_size, config.local_crops_size, config.local_crops_number
  rng = np.random.default_rng(0)
  return {"global": rng.integers(0, 256, (b, 2, g, g, 3), np.uint8),
          "local": rng.integers(0, 256, (b, n, l, l, 3), np.uint8)}


# ----------------------------------------------------------------------------------------------
# The release's augmentation with torchvision, written from the reference (dino-reference.md).
# ----------------------------------------------------------------------------------------------
def torch_loader(root: str, workers: int):
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision import transforms as T  # pylint: disable=g-import-not-at-top

  class RandomBlur:
    def __init__(self, p):
      self.p = p

    def __call__(self, img):
      if random.random() > self.p:
        return img
      return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))

  class RandomSolarize:
    def __init__(self, p):
      self.p = p

    def __call__(self, img):
      return ImageOps.solarize(img) if random.random() < self.p else img

  bicubic = T.InterpolationMode.BICUBIC
  jitter = T.Compose([T.RandomHorizontalFlip(0.5),
                      T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                      T.RandomGrayscale(0.2)])
  norm = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
  global1 = T.Compose([T.RandomResizedCrop(224, (0.4, 1.0), interpolation=bicubic), jitter,
                       RandomBlur(1.0), norm])
  global2 = T.Compose([T.RandomResizedCrop(224, (0.4, 1.0), interpolation=bicubic), jitter,
                       RandomBlur(0.1), RandomSolarize(0.2), norm])
  local = T.Compose([T.RandomResizedCrop(96, (0.05, 0.4), interpolation=bicubic), jitter,
                     RandomBlur(0.5), norm])
  files = sorted(os.path.join(root, f) for f in os.listdir(root))

  class Dataset(torch.utils.data.Dataset):
    def __len__(self):
      return len(files)

    def __getitem__(self, i):
      with open(files[i], "rb") as f:
        img = Image.open(f).convert("RGB")
      return [global1(img), global2(img)] + [local(img) for _ in range(10)]

  return torch.utils.data.DataLoader(Dataset(), batch_size=_BATCH.value, shuffle=True,
                                     num_workers=workers, drop_last=True,
                                     persistent_workers=True)


# ----------------------------------------------------------------------------------------------
# The main job's input.
# ----------------------------------------------------------------------------------------------
def main_job(crops_on_device: bool) -> dict:
  c = config_lib.from_file(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                      "configs", "default.py"),
                           [f"aug.crops_on_device={crops_on_device}"])
  steps_per_epoch = c.data.shapes_train_size // c.batch_size
  it = iter(pipeline.train_dataset(c, process_index=0, process_count=1))
  device = _device_ms(c, next(it))

  def cpu_ms(n):  # process CPU time (every thread) per batch consumed
    t = time.process_time()
    for _ in range(n):
      next(it)
    return 1e3 * (time.process_time() - t) / n

  next(it)
  first_epoch = cpu_ms(steps_per_epoch - 20)
  for _ in range(25):  # into the second epoch: every image cached
    next(it)
  cached = cpu_ms(100)
  it.close()

  # The step itself, fed a fixed batch or the pipeline (fresh: images generated as it goes),
  # interleaved so that the load of a shared machine hits both alike.
  mesh = sharding_lib.make_mesh()
  batch_sh = sharding_lib.batch_sharding(mesh)
  init, update = train.make_step(c, steps_per_epoch, c.total_steps)
  step = jax.jit(update, donate_argnums=0)
  state = jax.jit(init)(jax.random.PRNGKey(0))
  it = iter(pipeline.train_dataset(c, process_index=0, process_count=1))
  fixed = pipeline.global_batch(next(it), batch_sh)
  key = jax.random.PRNGKey(1)
  state, metrics = step(state, fixed, key)
  times = {"fixed batch": [], "pipeline": []}
  for _ in range(_ROUNDS.value):
    for name in times:
      t = time.perf_counter()
      for _ in range(5):
        batch = fixed if name == "fixed batch" else pipeline.global_batch(next(it), batch_sh)
        state, metrics = step(state, batch, key)
      jax.block_until_ready(metrics)
      times[name].append((time.perf_counter() - t) / 5)
  it.close()
  step_fixed, step_fed = (1e3 * float(np.median(v)) for v in times.values())
  return {
      "setting": f"batch {c.batch_size}, 2x{c.global_crops_size} + "
                 f"{c.local_crops_number}x{c.local_crops_size} crops of "
                 f"{c.data.shapes_image_size} px shapes, workers {c.data.workers}, crops on the "
                 f"{'device' if crops_on_device else 'host'}",
      "host_cpu_ms_per_batch_first_epoch": first_epoch,
      "host_cpu_ms_per_batch_cached": cached,
      "device_augment_ms_per_batch": device,
      "step_ms_fixed_batch_with_device_augment": step_fixed,
      "step_ms_fed_by_pipeline": step_fed,
      "step_ms_rounds": {k: [round(1e3 * x) for x in v] for k, v in times.items()},
      "share_host_first_epoch": first_epoch / step_fixed,
      "share_host_cached": cached / step_fixed,
      "share_device_augment": device / step_fixed,
      "share_slowdown_fed_vs_fixed": step_fed / step_fixed - 1,
  }


def main(argv):
  del argv
  result = {"load_average": os.getloadavg(), "cpus": os.cpu_count()}
  t = time.perf_counter()
  make_jpegs(_DIR.value, _IMAGES.value)
  result["jpegs"] = f"{_IMAGES.value} of 500x375 in {_DIR.value} ({time.perf_counter() - t:.0f} s)"

  src = shapes.ShapesSource(3000, "train")
  t = time.perf_counter()
  for i in range(3000):
    src[i]
  result["shapes_images_per_sec"] = 3000 / (time.perf_counter() - t)

  c = folder_config(_DIR.value, 0)
  result["device_augment_cpu_images_per_sec"] = _BATCH.value / _device_ms(
      c, _crops(c, _BATCH.value), repeats=3) * 1e3
  for w in map(int, _WORKERS.value):
    result[f"dino_jax_host_images_per_sec_{w}_workers"] = ours(_DIR.value, w)
    if _TORCH.value:
      result[f"torchvision_images_per_sec_{w}_workers"] = _rate(
          iter(torch_loader(_DIR.value, w)), _BATCH.value, _BATCHES.value)
  for on_device in (False, True):
    result[f"main_job_{'device' if on_device else 'host'}_crops"] = main_job(on_device)
  result["load_average_end"] = os.getloadavg()
  for k, v in result.items():
    print(f"{k:>45}: {v}")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
