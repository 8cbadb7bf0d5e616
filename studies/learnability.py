"""The main job's ViT trained *with labels* for the same wall time: the ceiling for k-NN on the
embedded data, and the proof that the data is learnable.

  python studies/learnability.py --seconds 480 [--steps N] [--config configs/default.py]

Training stops after --seconds or --steps (default: the config's total_steps; also the length of
the lr schedule), whichever comes first (--config: a config file, read by
dino_jax.config.from_file). A supervised step costs a fraction of a DINO step (one crop, no
teacher), so matching the main job's wall time takes more steps than its total_steps.

Same backbone, same host crops and on-device photometric augmentation (first global crop only),
a linear classifier on the final-LN [CLS] trained with cross-entropy by AdamW (the config's lr
scaling, warm-up and cosine over the planned steps, weight decay 0.05). Then the main job's own
evaluation of the backbone (scores.evaluate: k-NN on [CLS], attention Jaccard), printed with the
supervised classifier's accuracy, as a table and one JSON line.
"""
import argparse
import functools
import json
import os
import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dino_jax import config as config_lib
from dino_jax import host_memory
from dino_jax import schedules
from dino_jax import sharding as sharding_lib
from dino_jax.data import augment, pipeline, sources
from dino_jax.evaluate import scores
from dino_jax.models import build_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Supervised(nn.Module):
  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes)(self.backbone(x))


def main():
  host_memory.keep_freed_memory()  # the trainer's malloc policy, before jax starts its threads
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seconds", type=float, default=480.0, help="training wall time")
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "default.py"))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=0, help="planned steps (default: the config's "
                      "total_steps)")
  args = parser.parse_args()
  config = config_lib.from_file(args.config)
  config.seed = args.seed
  config.local_crops_number = 0

  source = sources.make_source(config, config.data.train_split)
  crop = augment.MultiCrop.from_config(config)
  with_label = lambda e, rng: {**crop.random_map(e, rng), "label": e["label"]}
  ds = (grain.MapDataset.source(source).seed(config.seed).shuffle().repeat()
        .random_map(with_label).batch(config.batch_size, drop_remainder=True))
  data = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))

  student, _ = build_models(config)
  model = Supervised(student.backbone, source.num_classes)
  g = config.global_crops_size
  params = model.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, g, g, 3)))["params"]
  planned = args.steps or int(config.total_steps)  # the lr schedule's length
  lr = schedules.warmup_cosine(config.lr * config.batch_size / 256, config.min_lr, planned,
                               int(config.warmup_epochs * len(source) // config.batch_size))
  tx = optax.adamw(lr, weight_decay=0.05)
  opt_state = tx.init(params)
  photometric = augment.device_augment(config)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, batch, rng):
    crops = {k: v for k, v in batch.items() if k != "label"}  # crops, or the image and its boxes
    images = photometric(rng, crops)["global"][:, 0]

    def loss_fn(p):
      logits = model.apply({"params": p}, augment.normalize(images))
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return optax.apply_updates(params, updates), opt_state, loss, acc

  t0, n = time.time(), 0
  while time.time() - t0 < args.seconds and n < planned:
    params, opt_state, loss, acc = step(params, opt_state, next(data),
                                        jax.random.fold_in(jax.random.PRNGKey(1), n))
    n += 1
    if n % 100 == 0:
      print(f"step {n}: loss {float(loss):.3f}, batch accuracy {float(acc):.3f}, "
            f"{time.time() - t0:.0f} s", flush=True)
  train_s = time.time() - t0

  # The classifier's accuracy on the eval split, then the main job's evaluation of the backbone.
  correct = total = 0
  for batch in pipeline.eval_batches(config, config.data.eval_split, 200):
    logits = model.apply({"params": params}, augment.normalize(jnp.asarray(batch["image"])))
    ok = (np.argmax(logits, -1) == batch["label"]) & batch["valid"]
    correct, total = correct + int(ok.sum()), total + int(batch["valid"].sum())
  results, _ = scores.evaluate(config, student.backbone, {"supervised": params["backbone"]},
                               ks=config.eval.nb_knn, temperature=config.eval.knn_temperature,
                               mesh=sharding_lib.make_mesh())
  print(scores.format_table(results))
  att = results["supervised"]["attention"]
  out = {"seed": args.seed, "steps": n, "train_seconds": train_s,
         "classifier_top1": 100.0 * correct / total,
         "knn20_top1": results["supervised"]["knn"]["top1"]["20"],
         "jaccard_best_head": att["jaccard"], "jaccard_head_mean": att["jaccard_head_mean"]}
  print(f"supervised classifier: {out['classifier_top1']:.1f}% on the eval split after {n} steps "
        f"({train_s:.0f} s)")
  print(json.dumps(out))


if __name__ == "__main__":
  main()
