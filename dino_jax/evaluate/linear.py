"""Linear probe on frozen features, the release's protocol (eval_linear.py).

Features: the [CLS] tokens of the last `n_last_blocks` blocks concatenated (4 for ViT-S; every
block of a shallower backbone), or with `avgpool_patchtokens` the last block's [CLS] and mean
patch token (ViT-B), each final-LN-normed (features.linear_features). A linear layer (weights
normal std 0.01, zero bias) trained with SGD (momentum 0.9, no weight decay), lr = base_lr x
batch / 256, cosine-annealed to 0 once an epoch (torch's CosineAnnealingLR(T_max=epochs)
stepped per epoch: constant within an epoch); cross-entropy.
Train images (data.pipeline.probe_train_batches): RandomResizedCrop (scale (0.08, 1), bilinear,
as torchvision's default) + flip, reshuffled every epoch, no image dropped (the last batch padded
and masked); eval images (data.pipeline.eval_batches): the eval transform (resize + centre crop).
Checkpointed after every epoch (checkpoint.probe_manager) and resumed.
The release reports the best epoch's top-1 on the eval split; here `top1` / `top5` are the last
epoch's and `best_top1` the release's figure.

Shapes: B batch, F = D x (n_last_blocks + avgpool) features, C classes.
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Callable, Iterable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from dino_jax import checkpoint
from dino_jax import paths
from dino_jax import sharding as sharding_lib
from dino_jax.data import pipeline
from dino_jax.data.sources import make_source
from dino_jax.evaluate import features as features_lib

Batches = Iterable[dict[str, np.ndarray]]


class LinearClassifier(nn.Module):
  """(B, F) -> logits (B, C); weights normal std 0.01, bias zero, as the release."""
  num_labels: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(self.num_labels, kernel_init=nn.initializers.normal(0.01),
                    bias_init=nn.initializers.zeros)(x.reshape(x.shape[0], -1))


def learning_rate(base_lr: float, batch_size: int) -> float:
  """The release's linear scaling: base_lr x global batch / 256."""
  return base_lr * batch_size / 256


def make_optimizer(base_lr: float, batch_size: int, epochs: int, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(SGD with momentum 0.9, its lr schedule): lr = base_lr x batch / 256, times
  (1 + cos(pi e / epochs)) / 2 in epoch e = step // steps_per_epoch, i.e. torch's
  SGD(momentum=0.9, weight_decay=0) with CosineAnnealingLR(T_max=epochs, eta_min=0) stepped once
  an epoch, as the release."""
  lr = learning_rate(base_lr, batch_size)
  schedule = lambda step: lr * 0.5 * (1 + jnp.cos(jnp.pi * (step // steps_per_epoch) / epochs))
  return optax.sgd(schedule, momentum=0.9), schedule


@flax.struct.dataclass
class LinearState:
  step: jax.Array
  params: Any
  opt_state: optax.OptState


def _train_step(state: LinearState, backbone_params: Any, batch: dict[str, jax.Array], *,
                featurize, classifier: nn.Module, tx: optax.GradientTransformation,
                schedule: optax.Schedule):
  """One SGD step on the valid rows of a batch; returns (state, {'loss', 'lr'})."""
  feats = jax.lax.stop_gradient(featurize(backbone_params, batch["image"]))
  valid = batch["valid"].astype(jnp.float32)

  def loss_fn(params):
    logits = classifier.apply({"params": params}, feats)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)  # the mean over real images

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state), {"loss": loss, "lr": schedule(state.step)}


def accuracy_fn(featurize: Callable[[Any, jax.Array], jax.Array], classifier: nn.Module
                ) -> Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]:
  """(params {'backbone', 'linear'}, batch) -> per-image top-1 / top-5 hits, for extract()."""

  def hits(p, batch):
    logits = classifier.apply({"params": p["linear"]}, featurize(p["backbone"], batch["image"]))
    top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hit = top == batch["label"][:, None]
    return {"top1": hit[:, 0], "top5": hit.any(axis=1)}

  return hits


def train(featurize: Callable[[Any, jax.Array], jax.Array], backbone_params: Any, *,
          num_features: int, num_labels: int, train_batches: Callable[[int], Batches],
          eval_batches: Callable[[], Batches], epochs: int, steps_per_epoch: int, batch_size: int,
          base_lr: float = 0.001, mesh=None, ckpt_dir: str | None = None, seed: int = 0,
          val_freq: int = 1, settings: dict[str, Any] | None = None) -> dict[str, Any]:
  """Trains a linear classifier on featurize(backbone_params, images), frozen.

  Args:
    featurize: (backbone params, images (B, ...)) -> features (B, F), jit-traceable.
    train_batches: epoch -> that epoch's batches {'image', 'label', 'valid'} (this process's
      rows), steps_per_epoch of them.
    eval_batches: () -> the eval split's batches.
    batch_size: the global batch, for the lr scaling.
    ckpt_dir: with it, the state and history are saved after every epoch and a rerun resumes.
    settings: what else defines the probe (data, network, features: JSON values), saved with
      it; a rerun resumes only a probe of the same settings, lr, batch size, epochs and widths,
      and otherwise raises naming what differs (its checkpoints are kept).
    val_freq: evaluate every this many epochs (and after the last).
  Returns:
    {'top1', 'top5' (last evaluation), 'best_top1', 'per_epoch': [{'epoch', 'loss', 'lr',
    'top1'?, 'top5'?}, ...]}, accuracies in percent.
  """
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
  batch_sh, repl = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
  classifier = LinearClassifier(num_labels)
  tx, schedule = make_optimizer(base_lr, batch_size, epochs, steps_per_epoch)

  def init(seed):
    params = classifier.init(jax.random.PRNGKey(seed), jnp.zeros((1, num_features)))["params"]
    return LinearState(jnp.zeros((), jnp.int32), params, tx.init(params))

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                          jax.eval_shape(init, seed))
  settings = {**(settings or {}), "base_lr": base_lr, "batch_size": batch_size, "epochs": epochs,
              "steps_per_epoch": steps_per_epoch, "num_features": num_features,
              "num_labels": num_labels, "seed": seed}
  settings = json.loads(json.dumps(settings))  # as the checkpoint reads it back (tuples: lists)
  mngr = None if ckpt_dir is None else checkpoint.probe_manager(ckpt_dir)
  start, history = 0, []
  if mngr is not None and mngr.latest_step() is not None:
    start = mngr.latest_step()
    saved = mngr.restore(start, args=ocp.args.Composite(history=ocp.args.JsonRestore()))[
        "history"]  # first: other settings may mean other shapes
    if isinstance(saved, dict):  # {'settings', 'per_epoch'}; a bare list: no settings saved
      differ = {k: (saved["settings"].get(k), v) for k, v in settings.items()
                if saved["settings"].get(k) != v}
      if differ:
        mngr.close()
        raise ValueError(
            f"the linear probe checkpoints in {ckpt_dir} were made with other settings ("
            + ", ".join(f"{k} {a!r}, now {b!r}" for k, (a, b) in differ.items())
            + "): rerun with those, or delete the folder to start a new probe")
      saved = saved["per_epoch"]
    state = mngr.restore(start, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
    history = list(saved)
    logging.info("linear probe: resumed after epoch %d from %s", start, ckpt_dir)
  else:
    state = jax.jit(init, static_argnums=0, out_shardings=repl)(seed)

  step = jax.jit(functools.partial(_train_step, featurize=featurize, classifier=classifier, tx=tx,
                                   schedule=schedule),
                 in_shardings=(repl, repl, batch_sh), out_shardings=(repl, repl), donate_argnums=0)
  backbone_params = features_lib.replicate(backbone_params, mesh)  # no cross-process transfer
  hits = accuracy_fn(featurize, classifier)
  try:
    for epoch in range(start, epochs):
      metrics = []
      for batch in train_batches(epoch):
        state, m = step(state, backbone_params, pipeline.global_batch(batch, batch_sh))
        metrics.append(m)
      metrics = jax.device_get(metrics)
      row = {"epoch": epoch, "loss": float(np.mean([m["loss"] for m in metrics])),
             "lr": float(metrics[0]["lr"])}  # one lr an epoch
      if (epoch + 1) % val_freq == 0 or epoch + 1 == epochs:
        out, _ = features_lib.extract(hits, {"backbone": backbone_params, "linear": state.params},
                                      eval_batches(), mesh)
        row.update({k: 100.0 * float(np.mean(out[k])) for k in ("top1", "top5")})
      history.append(row)
      logging.info("linear probe epoch %d/%d: %s", epoch + 1, epochs, row)
      if mngr is not None:
        mngr.save(epoch + 1, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            history=ocp.args.JsonSave({"settings": settings, "per_epoch": history})))
  finally:  # an interrupted run still completes the epoch checkpoint in flight
    if mngr is not None:
      mngr.wait_until_finished()
      mngr.close()
  evaluated = [r for r in history if "top1" in r]
  return {"top1": evaluated[-1]["top1"], "top5": evaluated[-1]["top5"],
          "best_top1": max(r["top1"] for r in evaluated), "per_epoch": history}


# ----------------------------------------------------------------------------------------------
# The command's run.
# ----------------------------------------------------------------------------------------------
def run(config: mlc.ConfigDict, workdir: str, which: str = "teacher", step: int | None = None
        ) -> dict[str, Any]:
  """The linear probe of a workdir's teacher (or student), of its latest (or given) checkpoint:
  writes eval/linear.json."""
  e = config.eval
  mesh = sharding_lib.make_mesh()
  pi, pc = jax.process_index(), jax.process_count()
  local = features_lib.local_batch_size(e.linear_batch_size, mesh)
  batch_size = local * pc
  epochs = e.linear_epochs
  avgpool = e.linear_avgpool_patchtokens
  _, backbone, params, step = features_lib.load_backbone(workdir, which, step)
  # As the release's get_intermediate_layers: every block when the backbone has fewer (the main
  # job's depth 3 under the default 4). A ResNet: its pooled feature (n_last 1 = one embed_dim).
  vit = features_lib.has_attention(backbone)
  n_last = min(e.linear_n_last_blocks, backbone.depth) if vit else 1
  avgpool = avgpool and vit
  if vit and n_last < e.linear_n_last_blocks:
    logging.info("linear probe: eval.linear_n_last_blocks=%d > depth %d: the [CLS] tokens of all "
                 "%d blocks", e.linear_n_last_blocks, backbone.depth, n_last)
  source = make_source(config, config.data.train_split)
  if not getattr(source, "has_labels", True):
    raise ValueError(f"{source!r} has no labels: the linear probe needs them")
  num_labels = source.num_classes
  featurize = functools.partial(features_lib.linear_features, backbone, n_last_blocks=n_last,
                                avgpool_patchtokens=avgpool)
  logging.info("linear probe of the %s at step %d: %d epochs, batch %d, %d labels", which, step,
               epochs, batch_size, num_labels)
  result = train(
      featurize, params,
      num_features=backbone.embed_dim * (n_last + int(avgpool)), num_labels=num_labels,
      train_batches=lambda ep: pipeline.probe_train_batches(config, ep, batch_size,
                                                            process_index=pi, process_count=pc),
      eval_batches=lambda: pipeline.eval_batches(config, config.data.eval_split, local,
                                                 process_index=pi, process_count=pc),
      epochs=epochs, steps_per_epoch=math.ceil(len(source) / batch_size), batch_size=batch_size,
      base_lr=e.linear_lr, mesh=mesh, seed=config.seed,
      ckpt_dir=os.path.join(workdir, "eval", f"linear_checkpoints_{which}"),
      val_freq=e.linear_val_freq,
      settings={"step": step, "n_last_blocks": n_last, "avgpool_patchtokens": avgpool,
                **{f"data.{k}": config.data[k] for k in ("source", "path", "name",
                                                          "train_split", "eval_split")}})
  result = {**result, "which": which, "step": step}
  if pi == 0:
    paths.write_json(os.path.join(workdir, "eval", "linear.json" if which == "teacher" else
                                  "linear_student.json"), result)
  return result
