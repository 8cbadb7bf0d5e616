"""What a shapes-trained teacher's [CLS] features encode: the class, or the nuisance factors?

  python studies/factors.py --workdir WORKDIR [--which teacher]

Weighted 20-NN (as the main job's k-NN: T 0.07, train split as the bank, eval split as queries)
predicting, from the same features, the shape class and each factor the generator draws: polarity
(object lighter than the background), object gray level (terciles of its range), object area
(terciles) and horizontal position (left / right half) and
rotation (quadrant). A factor predicted far above its chance
(the majority share) is something the features encode; the trained row next to the random-init row
shows what training added. This is the measurement behind the main job's data choices
(docs/notes/main_job.md). Prints a table and, as its last line, one JSON object.
"""
import json

import jax
import numpy as np
from absl import app, flags

from dino_jax.data import shapes, sources
from dino_jax.evaluate import features, knn

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir trained on data.source=shapes.",
                               required=True)
_WHICH = flags.DEFINE_enum("which", "teacher", ["teacher", "student"], "Which network.")


def factors(src: shapes.ShapesSource) -> dict[str, np.ndarray]:
  """{factor: (N,) int labels} of every record of src (from its draws, not its pixels)."""
  p = [src.params(i) for i in range(len(src))]
  tercile = lambda x, lo, hi: np.digitize(x, [lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3])
  return {
      "class": np.array([q["label"] for q in p]),
      "polarity": np.array([int(q["fg"] > q["bg"]) for q in p]),
      "object level": tercile([q["fg"] for q in p], *src.fg_range),
      "area": tercile([q["area"] / src.image_size**2 for q in p], *src.area),
      "x half": np.array([int(q["centre"][0] > src.image_size / 2) for q in p]),
      "rotation": np.array([int(q["angle"] // (np.pi / 2)) for q in p]),  # quadrant of 4
  }


def main(argv):
  del argv
  config, backbone, trained, step = features.load_backbone(_WORKDIR.value, _WHICH.value)
  if config.data.source != "shapes":
    raise ValueError(f"{_WORKDIR.value}: trained on data.source={config.data.source!r}; this "
                     "probe reads the shapes generator's draws")
  apply = jax.jit(lambda params, x: features.cls_features(backbone, params, x))
  split = {}
  for name in (config.data.train_split, config.data.eval_split):
    src = sources.make_source(config, name)
    images = np.stack([src[i]["image"] for i in range(len(src))])
    split[name] = (images, factors(src))
  models = {"trained": trained, "random init": features.random_init_backbone(config)}
  results = {}
  for model, params in models.items():
    feats = {name: np.concatenate([np.asarray(apply(params, images[i:i + 500]))
                                   for i in range(0, len(images), 500)])
             for name, (images, _) in split.items()}
    bank, queries = feats[config.data.train_split], feats[config.data.eval_split]
    labels_bank, labels_q = split[config.data.train_split][1], split[config.data.eval_split][1]
    results[model] = {
        f: knn.knn_classify(bank, labels_bank[f], queries, labels_q[f], ks=(20,))["top1"]["20"]
        for f in labels_q}
  chance = {f: 100.0 * np.bincount(y).max() / len(y)
            for f, y in split[config.data.eval_split][1].items()}
  print(f"{_WORKDIR.value} ({_WHICH.value}, step {step}): 20-NN top-1 (%) of each factor")
  print(f"{'factor':14s}{'trained':>10s}{'random init':>13s}{'chance':>9s}")
  for f in chance:
    print(f"{f:14s}{results['trained'][f]:10.1f}{results['random init'][f]:13.1f}"
          f"{chance[f]:9.1f}")
  print(json.dumps({"workdir": _WORKDIR.value, "step": step, "chance": chance, **results}))


if __name__ == "__main__":
  app.run(main)
