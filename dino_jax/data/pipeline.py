"""grain input pipelines: multi-crop training batches, the linear probe's training batches, padded
evaluation batches, sharded arrays.

Training: source -> shuffle (seed, reshuffled each epoch) -> repeat -> MultiCrop (host crops and
flips, deterministic from (seed, epoch, index)) -> batch -> this process's batches -> threads or
`config.data.workers` processes. The one global stream is cut into per-process batches and process
p takes every P-th (p, p + P, ...): global step s is positions s*B .. s*B + B - 1, process p holding
rows p*B/P .. (p+1)*B/P - 1 of it, so the global batch is the same array, rows in the same order,
whatever the number of processes (and so are the per-row augmentations drawn on device), and the
batches the same whatever the number of workers. Batches run across epoch
boundaries (no image is dropped; an epoch is len(source) // batch_size steps, as the release's
drop_last). The stream is random access, so step s's batch is found from s alone: a resumed run
starts it at its step, on any number of processes, and needs no iterator state in its checkpoint.
grain's own process sharding is not used: it would give each process other images at each step
whenever the process count changed. Sources are random access (folders, TFDS ArrayRecord), so each
process decodes only its own rows' images.

Linear probe (`probe_train_batches`) and evaluation (`eval_batches`): one pass over a split, every
image once, each process padding its shorter share with invalid batches so that all take part in
every global step.

Shapes: B per-process batch, G = 2 global crops, L local crops.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterable, Iterator

import grain
import jax
import ml_collections as mlc
import numpy as np
from absl import flags, logging

from dino_jax.data import augment
from dino_jax.data.sources import make_source


def train_dataset(config: mlc.ConfigDict, *, process_index: int, process_count: int,
                  start_step: int = 0, source=None) -> grain.IterDataset:
  """Endless multi-crop batches for this process, from global step `start_step` on.

  Elements: {'global': uint8 (B, G, H, W, 3), 'local': uint8 (B, L, h, w, 3)} (no 'local' without
  local crops), B = config.batch_size // process_count. `source` overrides
  make_source(config, config.data.train_split).
  """
  if config.batch_size % process_count:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{process_count} processes")
  d = config.data
  if source is None:
    source = make_source(config, d.train_split,
                         min_side=_train_min_side(config) if d.jpeg_draft else 0)
  ds = (grain.MapDataset.source(source).seed(config.seed).shuffle().repeat()
        .random_map(augment.MultiCrop.from_config(config)))
  first = start_step * process_count + process_index
  ds = ds.batch(config.batch_size // process_count, drop_remainder=True)[first::process_count]
  return _prefetch(ds, d.threads, d.prefetch, d.workers)


def eval_batches(config: mlc.ConfigDict, split: str, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every image of `split` once, in order, in batches of this process's share (padded_share).

  Elements: {'image': uint8 (B, H, W, 3), 'label': int32 (B,) (-1 without labels), 'valid': bool
  (B,)} plus 'object_mask': bool (B, H, W) where the source has masks. Images are the eval
  transform's (shorter side resized to data.eval_resize, bicubic, centre crop global_crops_size),
  `shapes` images as generated.
  """
  d = config.data
  source = make_source(config, split, min_side=d.eval_resize if d.jpeg_draft else 0)
  transform = functools.partial(_eval_record, resize=None if d.source == "shapes" else
                                d.eval_resize, crop=config.global_crops_size)
  return padded_share(source, batch_size, process_index=process_index,
                      process_count=process_count, transform=transform, threads=d.threads,
                      workers=d.workers, prefetch=d.prefetch)


def padded_share(source, batch_size: int, *, process_index: int = 0, process_count: int = 1,
                 transform: Callable[[dict], dict] | None = None, threads: int = 1,
                 workers: int = 0, prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """Every record of a random-access source (len, [index]) once, in order, for features.extract:
  process p reads a contiguous share, in batches of batch_size, and every process yields as many
  batches, the last ones padded with 'valid' False.

  Elements: transform(record) (the record itself without one), batched, with 'valid': bool (B,).
  threads / workers / prefetch: as config.data's (grain threads, worker processes, buffer).
  """
  n = len(source)
  share = math.ceil(n / process_count)
  start, stop = min(process_index * share, n), min((process_index + 1) * share, n)
  record = functools.partial(_valid_record, transform=transform)
  pad = functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size)
  ds = grain.MapDataset.source(source)[start:stop].map(record).batch(batch_size, batch_fn=pad)
  batches = _prefetch(ds, threads, prefetch, workers) if stop > start else ()
  return _padded(batches, math.ceil(share / batch_size), lambda: pad([record(source[0])]))


def probe_train_batches(config: mlc.ConfigDict, epoch: int, batch_size: int, *,
                        process_index: int = 0, process_count: int = 1
                        ) -> Iterator[dict[str, np.ndarray]]:
  """This process's batches of the train split for one epoch of the linear probe.

  Elements: {'image': uint8 (B, S, S, 3), 'label': int32 (B,), 'valid': bool (B,)},
  B = batch_size // process_count, S = global_crops_size: augment.RandomResizedCropFlip crops
  (scale eval.linear_crop_scale). A fresh shuffle each epoch (seed from (config.seed, epoch));
  process p takes every P-th image of it. ceil(N / batch_size) batches on every process, no image
  dropped: the last ones padded with valid = False.
  """
  source = make_source(config, config.data.train_split)
  seed = int(np.random.SeedSequence([config.seed, epoch]).generate_state(1)[0])
  crop = augment.RandomResizedCropFlip(config.global_crops_size,
                                       tuple(config.eval.linear_crop_scale))
  local = batch_size // process_count
  ds = grain.MapDataset.source(source).shuffle(seed=seed).random_map(crop, seed=seed)
  ds = ds[process_index::process_count]
  pad = functools.partial(grain.experimental.batch_and_pad, batch_size=local)
  ds = _prefetch(ds.batch(local, batch_fn=pad), config.data.threads, 4, 0)
  yield from _padded(ds, math.ceil(len(source) / batch_size),
                     lambda: pad([crop.random_map(source[0], np.random.default_rng(0))]))


def global_batch(local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding
                 ) -> dict[str, jax.Array]:
  """This process's rows of every key -> global arrays laid out with `sharding` (batch axis)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def num_examples(config: mlc.ConfigDict, split: str) -> int:
  return len(make_source(config, split))


def resolve(config: mlc.ConfigDict) -> None:
  """Turns off, in place, what config asks for and its data cannot give, one logged line each:

  - aug.crops_on_device for every source but `shapes` (a folder's or TFDS's images may differ in
    size, and a batch cropped on the device needs one size): the crops are made on the host;
  - k-NN (eval.knn) and the evaluation during training (eval.every_steps) for a folder without
    a labelled eval split (no data.path/<eval_split>, or no class folders in it or in the
    training split): k-NN needs labels on both sides, and a folder has no object masks. The
    closing evaluation (eval.after_training) then draws the teacher's attention maps only
    (evaluate/report.py).

  Run before validate; calling it again changes nothing. Raises as make_source for a missing
  or empty folder.
  """
  if config.aug.crops_on_device and config.data.source != "shapes":
    logging.info("config.aug.crops_on_device=True asks for images of one size, which "
                 "data.source=%r does not promise: the crops are made on the host (PIL) instead",
                 config.data.source)
    config.aug.crops_on_device = False
  e = config.eval
  why = _no_labelled_eval_split(config) if e.knn and (e.after_training or e.every_steps) else None
  if why:
    logging.warning("%s: no k-NN evaluation during or after training (eval.knn and "
                    "eval.every_steps turned off)%s", why,
                    "; after training, the teacher's attention maps of the first "
                    f"{e.attention_images} images go to WORKDIR/eval/attention.png"
                    if e.after_training else "")
    e.knn, e.every_steps = False, 0


def _no_labelled_eval_split(config: mlc.ConfigDict) -> str | None:
  """Why a folder source has no split to score k-NN on, or None (other sources: None)."""
  d = config.data
  if d.source != "folder":
    return None
  bank = make_source(config, d.train_split)  # a missing data.path raises here, not below
  try:
    queries = make_source(config, d.eval_split)
  except FileNotFoundError as err:
    return str(err)
  unlabelled = [s for s in (bank, queries) if not s.has_labels]
  if unlabelled:
    return "no class folders in " + " nor in ".join(f"{s!r}" for s in unlabelled)
  return None


def validate(config: mlc.ConfigDict) -> None:
  """Raises, naming the path / name / count / key, for data that training (and the evaluations it
  is configured to run) cannot use: unknown source, missing or empty folder, unprepared TFDS
  dataset, crops on the device for images of many sizes (see resolve), fewer training images
  than one global batch, training and eval folders with different class folders."""
  source = make_source(config, config.data.train_split)
  if config.aug.crops_on_device and config.data.source != "shapes":
    raise ValueError(f"config.aug.crops_on_device=True needs images of one size (data.source "
                     f"'shapes'), not data.source={config.data.source!r}: set "
                     "config.aug.crops_on_device=False")
  if len(source) < config.batch_size:
    raise ValueError(f"{source!r}: {len(source)} training images, fewer than one global batch "
                     f"(config.batch_size={config.batch_size})")
  if config.eval.knn and (config.eval.after_training or config.eval.every_steps):
    check_classes(config, "; or set config.eval.knn=False")


def check_classes(config: mlc.ConfigDict, hint: str = "") -> None:
  """Raises, naming both folders and some of the classes that differ, where a folder source's
  train and eval splits hold different class folders: labels are class indices in sorted order,
  so k-NN or a probe would compare unrelated classes. Raises as make_source for a missing split;
  other sources pass."""
  if config.data.source != "folder":
    return
  bank = make_source(config, config.data.train_split)
  queries = make_source(config, config.data.eval_split)
  if bank.classes != queries.classes:
    differ = sorted(set(bank.classes) ^ set(queries.classes))[:3]
    raise ValueError(f"{bank!r} and {queries!r}: different class folders (e.g. "
                     f"{', '.join(differ)}), so their labels would not match; give both splits "
                     f"the same class folders{hint}")


def _train_min_side(config: mlc.ConfigDict) -> int:
  """The shorter image side below which the smallest crop (min scale, most extreme ratio) would
  have fewer pixels than its output: JPEGs may be decoded down to it (Image.draft)."""
  return max(math.ceil(size / math.sqrt(min(augment.RATIO) * scale[0])) for size, scale in (
      (config.global_crops_size, config.global_crops_scale),
      (config.local_crops_size, config.local_crops_scale)))


def _valid_record(record: dict, transform: Callable[[dict], dict] | None) -> dict:
  return {**(record if transform is None else transform(record)), "valid": np.True_}


def _eval_record(record: dict, resize: int | None, crop: int) -> dict[str, np.ndarray]:
  image = record["image"] if resize is None else augment.eval_transform(record["image"], resize,
                                                                          crop)
  out = {"image": image, "label": np.int32(record["label"])}
  if "object_mask" in record:
    out["object_mask"] = record["object_mask"]
  return out


def _padded(batches: Iterable[dict[str, np.ndarray]], num_batches: int,
            padding: Callable[[], dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
  """`batches`, then one invalid batch (padding() with 'valid' all False) repeated up to
  num_batches: a process with a shorter share yields as many batches as the others, so that
  every process takes part in every global step."""
  done = 0
  for batch in batches:
    done += 1
    yield batch
  if done < num_batches:
    invalid = padding()
    invalid["valid"][:] = False
    for _ in range(num_batches - done):
      yield invalid


def _prefetch(ds: grain.MapDataset, threads: int, prefetch: int, workers: int
              ) -> grain.IterDataset:
  """Batches computed ahead: `prefetch` of them by `threads` threads, in each of `workers`
  processes if > 0, else in this one."""
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                            prefetch_buffer_size=max(prefetch, threads)))
  if workers > 0:
    # grain 0.2.18 reads an absl flag when starting workers and raises if flags are unparsed,
    # as outside absl.app (tests, notebooks): google/grain#1355, fixed upstream.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=prefetch))
  return it
