"""How linearly separable a workdir's features are, beside the release's SGD linear probe.

  python studies/linear_separability.py --workdir workdirs/default

The eval_linear probe follows the release (SGD on raw, augmented features, a fixed number of
epochs). This fits a logistic regression to convergence instead, on the features of un-augmented
images (the eval transform, as the k-NN uses): each feature standardised on the train split,
full-batch Adam, an L2 penalty. Two feature sets: the final-LN [CLS] (L2-normalised, the k-NN's)
and the probe's concatenated [CLS] tokens of the last eval.linear_n_last_blocks blocks; for the
trained teacher and for the same network at random init. Prints a table and, as its last line,
one JSON object.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from dino_jax import sharding as sharding_lib
from dino_jax.data import pipeline
from dino_jax.evaluate import features

_WORKDIR = flags.DEFINE_string("workdir", None, "A dino_jax workdir.", required=True)
_STEPS = flags.DEFINE_integer("steps", 3000, "Full-batch Adam steps (lr 0.01).")
_L2 = flags.DEFINE_multi_float("l2", [1e-4, 1e-2], "L2 penalties on the weights.")


def fit(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray,
        num_classes: int, l2: float, steps: int) -> dict[str, float]:
  """Logistic regression on standardised x (N, F); accuracies in percent and the final loss."""
  mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
  x_train, x_eval = (x_train - mu) / sd, (x_eval - mu) / sd

  def loss_fn(wb):
    logits = x_train @ wb[0] + wb[1]
    return (optax.softmax_cross_entropy_with_integer_labels(logits, y_train).mean()
            + l2 * jnp.sum(wb[0] ** 2))

  tx = optax.adam(0.01)

  @jax.jit
  def step(wb, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(wb)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(wb, updates), opt_state, loss

  wb = (jnp.zeros((x_train.shape[1], num_classes)), jnp.zeros(num_classes))
  opt_state = tx.init(wb)
  for _ in range(steps):
    wb, opt_state, loss = step(wb, opt_state)
  acc = lambda x, y: 100 * float(jnp.mean(jnp.argmax(x @ wb[0] + wb[1], 1) == y))
  return {"loss": float(loss), "train_top1": acc(x_train, y_train),
          "eval_top1": acc(x_eval, y_eval)}


def main(argv):
  del argv
  config, backbone, params, step = features.load_backbone(_WORKDIR.value)
  n_last = min(config.eval.linear_n_last_blocks, backbone.depth)
  fns = {
      "final [CLS], L2-normalised": lambda p, b: {
          "f": features.l2_normalize(features.cls_features(backbone, p, b["image"]))},
      f"[CLS] of the last {n_last} blocks": lambda p, b: {
          "f": features.linear_features(backbone, p, b["image"], n_last)},
  }
  mesh = sharding_lib.make_mesh()
  d = config.data
  results = []
  networks = {"trained": params, "random init": features.random_init_backbone(config)}
  for network, p in networks.items():
    for name, fn in fns.items():
      (train, _), (evals, _) = (
          features.extract(fn, p, pipeline.eval_batches(config, split, config.eval.batch_size),
                           mesh) for split in (d.train_split, d.eval_split))
      x_train, x_eval = (np.asarray(o["f"]).reshape(len(o["label"]), -1) for o in (train, evals))
      num_classes = int(max(train["label"].max(), evals["label"].max())) + 1
      for l2 in _L2.value:
        r = fit(x_train, train["label"], x_eval, evals["label"], num_classes, l2, _STEPS.value)
        results.append({"network": network, "features": name, "dim": x_train.shape[1], "l2": l2,
                        **r})
  print(f"{_WORKDIR.value}, teacher at step {step}: logistic regression, {_STEPS.value} steps")
  print(f"{'network':>12} {'features':>34} {'dim':>5} {'l2':>7} {'loss':>6} {'train %':>8} "
        f"{'eval %':>7}")
  for r in results:
    print(f"{r['network']:>12} {r['features']:>34} {r['dim']:5d} {r['l2']:7.0e} {r['loss']:6.3f} "
          f"{r['train_top1']:8.1f} {r['eval_top1']:7.1f}")
  print(json.dumps({"workdir": _WORKDIR.value, "step": step, "results": results}))


if __name__ == "__main__":
  app.run(main)
