"""The one place a config picks its data source: `make_source(config, split)`.

Every source is a grain random-access data source (`len`, `[index]`) of records
{'image': uint8 (H, W, 3), 'label': int32 scalar (-1 without labels)}, plus
'object_mask': bool (H, W) for `shapes`; and tells `num_classes`, `has_labels`, `has_masks`.
The sources themselves live in shapes.py, folder.py and tfds.py.
"""
from __future__ import annotations

import ml_collections as mlc

from dino_jax.data.folder import FolderSource, split_dir
from dino_jax.data.shapes import ShapesSource
from dino_jax.data.tfds import TfdsSource

SOURCES = ("shapes", "folder", "tfds")


def make_source(config: mlc.ConfigDict, split: str, *, min_side: int = 0
                ) -> ShapesSource | FolderSource | TfdsSource:
  """The source of `split` as config.data says.

  Args:
    config: the training config (data.source and its keys).
    split: a split name (config.data.train_split, config.data.eval_split, ...).
    min_side: folder JPEGs may be decoded at a reduced scale (Image.draft) as long as their
      shorter side stays >= min_side; 0 decodes at full size.
  Raises:
    ValueError / FileNotFoundError naming the source, path, name or split that is wrong.
  """
  d = config.data
  if d.source == "shapes":
    size = d.shapes_train_size if split == d.train_split else d.shapes_eval_size
    return ShapesSource(size, split, seed=d.shapes_seed, image_size=d.shapes_image_size,
                        classes=tuple(d.shapes_classes),
                        area=tuple(d.shapes_area), polarity=d.shapes_polarity,
                        fg_range=tuple(d.shapes_fg_range), bg_range=tuple(d.shapes_bg_range))
  if d.source == "folder":
    return FolderSource(split_dir(d.path, split, d.train_split), min_side=min_side,
                        cache_dir=d.cache_dir)
  if d.source == "tfds":  # data.path, if set, is the TFDS data_dir
    return TfdsSource(d.name, split, data_dir=d.path, image_key=d.image_key, label_key=d.label_key)
  raise ValueError(f"config.data.source={d.source!r}: unknown source; expected one of {SOURCES}")
