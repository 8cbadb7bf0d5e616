"""Can any embedded image design show copy detection with a shapes-trained teacher?

  python studies/copy_detection_data.py --workdir WORKDIR [--distractors 2000] [--whitening 2000]

The embedded copy detection (data/copydays.py: strong copies of single shapes among shapes
distractors) finds no strong copy with any network, because a shapes image's identity is its
pose. This study runs the same protocol (copy_detection.evaluate: [CLS] + GeM features, PCA
whitening, mAP in the top 20; the 'strong', 'crops/50' and 'jpegqual/10' blocks of
copydays.strong_copy / block_copy) on three image designs, each with its own originals,
distractors and whitening images:
- shapes: the workdir's own images (copydays.embedded);
- scenes: 2 to 4 shapes of random classes at the training's scale and gray levels (those of
  the workdir's records), apart from each other, on a canvas of twice the side (identity: which
  shapes where);
- leaves: a dead-leaves image, 15 to 30 shapes of random gray levels and sizes piled up
  (identity: a texture of edges, as in photographs).
Trained teacher, the same network at random init and raw pixels. Prints a table and, as its last
line, one JSON object.
"""
import itertools
import json
import math
import zlib

import numpy as np
from absl import app, flags

from dino_jax import sharding as sharding_lib
from dino_jax.data import copydays, sources
from dino_jax.data.shapes import SHAPE_CLASSES, ShapesSource
from dino_jax.evaluate import copy_detection, features

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir trained on data.source=shapes.",
                               required=True)
_DISTRACTORS = flags.DEFINE_integer("distractors", 2000, "Distractors in each database.")
_WHITENING = flags.DEFINE_integer("whitening", 2000, "Images the whitening is learned on.")
_ORIGINALS = 157
_COPIES = 229
BLOCKS = ("strong", "crops/50", "jpegqual/10")


class Composed:
  """Image i of a design ('scenes' or 'leaves') and split: uint8 (S, S, 3), from (split, i)."""

  def __init__(self, config, design: str, split: str):
    d = config.data
    self.design, self.split_id = design, zlib.crc32(split.encode())
    self.size = d.shapes_image_size * (2 if design == "scenes" else 1)
    scale = (d.shapes_image_size / self.size) ** 2  # the training's object size in pixels
    self.area = tuple(a * scale for a in d.shapes_area)
    self.render = ShapesSource(1, split, image_size=self.size)
    self.levels = sources.make_source(config, split)  # gray levels as the workdir's records

  def _shape(self, rng, area, centre):
    return self.render.coverage(dict(label=int(rng.integers(len(SHAPE_CLASSES))), area=area,
                                     angle=rng.uniform(0, 2 * np.pi), centre=centre))

  def __call__(self, i: int) -> np.ndarray:
    rng = np.random.default_rng([self.split_id, i])
    s = self.size
    if self.design == "scenes":
      k = int(rng.integers(2, 5))
      for _ in range(200):  # until no two shapes touch
        covs = []
        for _ in range(k):
          area = rng.uniform(*self.area) * s * s
          r = 0.9 * math.sqrt(area)
          covs.append(self._shape(rng, area, [rng.uniform(r, s - r), rng.uniform(r, s - r)]))
        if not any(np.any((a > 0) & (b > 0)) for a, b in itertools.combinations(covs, 2)):
          break
      p = self.levels.params(i % len(self.levels))
      img = p["bg"] + (p["fg"] - p["bg"]) * (1 - np.prod(1 - np.stack(covs), 0))
    else:
      img = np.full((s, s), rng.uniform())
      for _ in range(int(rng.integers(15, 31))):
        cov = self._shape(rng, rng.uniform(0.01, 0.2) * s * s,
                          [rng.uniform(0, s), rng.uniform(0, s)])
        img = img * (1 - cov) + rng.uniform() * cov
    img = np.clip(img + rng.normal(0, self.render.noise, img.shape), 0, 1)
    return np.repeat(np.round(img * 255).astype(np.uint8)[..., None], 3, -1)


def copy_sets(config, design: str) -> copydays.CopySets:
  """The study's blocks over originals, distractors and whitening images of one design."""
  sizes = dict(originals=_ORIGINALS, copies=_COPIES, distractors=_DISTRACTORS.value,
               whitening=_WHITENING.value, blocks=BLOCKS)
  if design == "shapes":
    return copydays.embedded(config, config.data.shapes_image_size, **sizes)
  size = Composed(config, design, "copydays_original").size
  return copydays.generated(lambda split, n: Composed(config, design, split), size,
                            seed=config.data.shapes_seed, **sizes)


def main(argv):
  del argv
  config, backbone, trained, step = features.load_backbone(_WORKDIR.value, "teacher")
  if config.data.source != "shapes":
    raise ValueError(f"{_WORKDIR.value}: trained on data.source={config.data.source!r}; the "
                     "study draws shapes")
  models = {"trained": trained, "random_init": features.random_init_backbone(config)}
  mesh = sharding_lib.make_mesh()
  results = {}
  for design in ("shapes", "scenes", "leaves"):
    sets = copy_sets(config, design)
    grid = sets.database.imsize // backbone.patch_size
    results[design], _ = copy_detection.evaluate(
        backbone, models, sets, batch_size=config.eval.batch_size, mesh=mesh, pixel_grid=grid)
  print(f"copy detection mAP (%), teacher at step {step}, {_DISTRACTORS.value} distractors, "
        f"whitening from {_WHITENING.value} images")
  print(f"{'design':<8} {'block':<12} {'trained':>8} {'random init':>12} {'pixels':>8}")
  for design, r in results.items():
    for b in BLOCKS:
      print(f"{design:<8} {b:<12} {r['trained'][b]:8.1f} {r['random_init'][b]:12.1f} "
            f"{r[copy_detection.PIXELS][b]:8.1f}")
  print(json.dumps({"step": step, "distractors": _DISTRACTORS.value,
                    "whitening": _WHITENING.value, "mAP": results}))


if __name__ == "__main__":
  app.run(main)
