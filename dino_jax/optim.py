"""DINO's optimizer as one optax chain.

per-tensor gradient clipping -> AdamW with per-step lr and weight-decay schedules (decay masked off
for biases and all 1-D params) -> the last layer frozen for `freeze_last_layer` epochs, exactly as
the release drops its gradient: AdamW neither moves nor decays it nor updates its moments, and its
own Adam step count (bias correction) starts when the freeze ends, as PyTorch's per-parameter state.

The release's convnet optimizers take AdamW's place, same schedules, clipping and freeze:
- 'sgd': torch.optim.SGD(momentum 0.9): d = grad + wd p (decayed tensors only), mu = 0.9 mu + d,
  p -= lr mu.
- 'lars': the release's utils.LARS (momentum 0.9, eta 0.001): on tensors of 2 or more dims,
  d = (grad + wd p) x eta ||p|| / ||grad + wd p|| (x 1 where a norm is 0); 1-D tensors get neither
  decay nor the trust ratio; then mu = 0.9 mu + d, p -= lr mu.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from dino_jax import config as config_lib
from dino_jax import schedules as schedules_lib


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
  """Rescales each gradient tensor whose L2 norm exceeds max_norm by max_norm / (norm + 1e-6)."""

  def clip(g):
    norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
    coef = max_norm / (norm + 1e-6)
    return jnp.where(coef < 1, g * coef.astype(g.dtype), g)

  return optax.stateless(lambda updates, params: jax.tree.map(clip, updates))


def param_labels(params: Any, norm_last_layer: bool) -> Any:
  """'last_layer' for the head's weight-normalised layer, 'frozen' for its g when norm_last_layer
  (the release sets requires_grad False), 'rest' for everything else."""

  def label(path, _):
    keys = [getattr(k, "key", str(k)) for k in path]
    if "last_layer" in keys:
      return "frozen" if norm_last_layer and keys[-1] == "kernel_g" else "last_layer"
    return "rest"

  return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params: Any) -> Any:
  """Weight decay on every tensor of 2 or more dims (kernels, cls token, pos embed, g); not on
  biases, LayerNorm / BatchNorm params or any other 1-D tensor (the release's rule)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)



def lars_trust_ratio(eta: float) -> optax.GradientTransformation:
  """The release's LARS adaptation: each update d of a tensor p of 2 or more dims scaled by
  eta ||p|| / ||d||, by 1 where ||p|| or ||d|| is 0; 1-D tensors (biases, BN) left as they are."""

  def scale(d, p):
    if p.ndim == 1:
      return d
    p_norm = jnp.linalg.norm(p.astype(jnp.float32))
    d_norm = jnp.linalg.norm(d.astype(jnp.float32))
    q = jnp.where(p_norm > 0, jnp.where(d_norm > 0, eta * p_norm / d_norm, 1.0), 1.0)
    return d * q.astype(d.dtype)

  return optax.stateless(lambda updates, params: jax.tree.map(scale, updates, params))


def _base(optimizer, learning_rate, weight_decay, b1, b2, eps, momentum, eta
          ) -> optax.GradientTransformation:
  """The optimizer proper, after clipping: AdamW (decoupled decay), or the release's SGD / LARS
  (decay added to the gradient, then momentum)."""
  if optimizer == "adamw":
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      *([lars_trust_ratio(eta)] if optimizer == "lars" else []),
      optax.trace(decay=momentum),  # torch's buffer: mu = momentum mu + d, the first mu = d
      optax.scale_by_learning_rate(learning_rate),
  )


def dino_optimizer(*, learning_rate, weight_decay, clip_grad: float = 3.0,
                   freeze_last_layer_steps: int = 0, norm_last_layer: bool = True,
                   optimizer: str = "adamw", b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, momentum: float = 0.9, eta: float = 0.001
                   ) -> optax.GradientTransformation:
  """The chain; learning_rate and weight_decay are floats or schedules of the global step.

  optimizer: 'adamw' (b1, b2, eps), 'sgd' (momentum) or 'lars' (momentum, eta), see above.
  Schedules are evaluated at the global step (inject_hyperparams' count), so the frozen last layer
  follows the same lr / wd as everything else once it starts moving.
  """
  if optimizer not in config_lib.OPTIMIZERS:
    raise ValueError(f"optimizer={optimizer!r}: expected one of {config_lib.OPTIMIZERS}")

  def make(learning_rate, weight_decay):
    base = lambda: _base(optimizer, learning_rate, weight_decay, b1, b2, eps, momentum, eta)
    parts = {
        "rest": base(),
        # conditionally_mask, not conditionally_transform: the latter passes the raw gradient
        # through as the update while the condition is false.
        "last_layer": optax.transforms.conditionally_mask(
            base(), lambda count: count >= freeze_last_layer_steps),
        "frozen": optax.set_to_zero(),
    }
    tx = optax.multi_transform(parts, lambda p: param_labels(p, norm_last_layer))
    if clip_grad and clip_grad > 0:
      tx = optax.chain(clip_per_tensor(clip_grad), tx)
    return tx

  return optax.inject_hyperparams(make)(learning_rate=learning_rate, weight_decay=weight_decay)


def make_optimizer(config, schedules: dict[str, schedules_lib.Schedule], steps_per_epoch: int
                   ) -> optax.GradientTransformation:
  """The chain of a training config, its lr and wd following schedules['lr'] and ['wd']
  (schedules.dino_schedules)."""
  return dino_optimizer(
      optimizer=config.optimizer, learning_rate=schedules["lr"], weight_decay=schedules["wd"],
      clip_grad=config.clip_grad,
      freeze_last_layer_steps=config_lib.epochs_to_steps(config.freeze_last_layer,
                                                         steps_per_epoch),
      norm_last_layer=config.model.norm_last_layer)
