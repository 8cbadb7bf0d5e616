"""A prepared TFDS dataset's split, read with random access (ArrayRecord).

Records: {'image': uint8 (H, W, 3) (grayscale repeated to three channels, alpha dropped),
'label': int32 scalar (-1 without config.data.label_key)}.

(The module is dino_jax.data.tfds; `import tensorflow_datasets as tfds` inside it is absolute and
binds the library, not this module.)
"""
from __future__ import annotations

import numpy as np


class TfdsSource:
  """A prepared TFDS dataset's split through tfds.data_source (ArrayRecord random access)."""

  has_masks = False

  def __init__(self, name: str, split: str, *, data_dir: str = "", image_key: str = "image",
               label_key: str = "label"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # slow; tfds only

    if not name:
      raise ValueError("config.data.name is empty: set it to a TFDS dataset name")
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # pylint: disable=broad-except  # tfds raises many kinds here
      where = data_dir or "the default TFDS data_dir"
      raise ValueError(
          f"TFDS dataset {name!r} split {split!r} is not prepared in {where} in a random-access "
          f"format ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Prepare it "
          f"with `tfds build {name} --file_format=array_record`.") from e
    features = self._ds.dataset_info.features
    if image_key not in features:
      raise ValueError(f"TFDS {name!r} has no feature {image_key!r} (config.data.image_key); "
                       f"features: {sorted(features.keys())}")
    self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
    self.has_labels = label_key in features
    self.num_classes = getattr(features[label_key], "num_classes", 0) if self.has_labels else 0

  def __len__(self) -> int:
    return len(self._ds)

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split {self.split!r}: {len(self)} images)"

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self._ds[index]
    image = np.asarray(record[self.image_key])
    if image.ndim == 2:
      image = image[..., None]
    image = np.repeat(image, 3, -1) if image.shape[-1] == 1 else image[..., :3]
    label = record[self.label_key] if self.has_labels else -1
    return {"image": image, "label": np.int32(label)}
