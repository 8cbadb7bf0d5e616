"""The release's torch.optim.AdamW state <-> dino_jax's optax state, for full training checkpoints.

The release optimises the student with two param groups from get_params_groups: regularized
(weights) and not regularized (biases and 1-D tensors), in named_parameters order, without the
frozen last_layer.weight_g when norm_last_layer. Its state_dict numbers the parameters through
both groups; each parameter's state holds 'step', 'exp_avg' and 'exp_avg_sq' (torch layouts).
optax holds the same moments as trees of the params (flax layouts) with one count per Adam state.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np
import optax

from dino_jax.convert.state_dicts import (Entry, fmt_shape, get_path, shape_of, spec_from_params,
                                          to_flax_layout, to_numpy, to_torch_layout, torch_extra,
                                          torch_shape)


def _param_groups(params: Mapping[str, Any], norm_last_layer: bool, prefix: str
                  ) -> tuple[list[Entry], list[Entry]]:
  """The release's get_params_groups(student): (regularized, not_regularized) in named_parameters
  order, skipping the frozen weight_g (requires_grad False when norm_last_layer)."""
  entries = []
  for part in ("backbone", "head"):
    for e in spec_from_params(params[part]):
      if e.collection == "params":
        entries.append(e._replace(key=f"{prefix}{part}.{e.key}", path=(part,) + e.path))
  trainable = [e for e in entries
               if not (norm_last_layer and e.key.endswith("last_layer.weight_g"))]
  not_reg = lambda e: e.key.endswith(".bias") or len(shape_of(get_path(params, e.path))) == 1
  return ([e for e in trainable if not not_reg(e)], [e for e in trainable if not_reg(e)])


def _is_adam(x: Any) -> bool:
  return isinstance(x, optax.ScaleByAdamState)


def _path_keys(path) -> tuple[str, ...]:
  return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def _hyperparams(opt_state: Any) -> dict[str, Any]:
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "hyperparams"))
           if hasattr(x, "hyperparams")]
  return dict(found[0].hyperparams) if found else {}


def optimizer_to_torch(opt_state: Any, params: Mapping[str, Any], *, norm_last_layer: bool,
                       prefix: str = "module.") -> dict[str, Any]:
  """dino_jax's optax state -> the release's torch.optim.AdamW state_dict (torch tensors).

  params: the student {'backbone', 'head'}. Parameters are numbered as the release's two param
  groups (regularized, then biases / 1-D) over the student's named_parameters; each holds its
  own Adam step, so the last layer's count starts when its freeze ends, as in PyTorch. lr and
  weight_decay are this step's values, as the release leaves them in its param groups.
  """
  torch = torch_extra("torch")
  reg, not_reg = _param_groups(params, norm_last_layer, prefix)
  index = {e.path: (i, e.layout) for i, e in enumerate(reg + not_reg)}
  state = {}
  for adam in jax.tree.leaves(opt_state, is_leaf=_is_adam):
    if not _is_adam(adam) or int(adam.count) == 0:
      continue  # torch creates a parameter's state at its first update
    mus = jax.tree_util.tree_flatten_with_path(adam.mu)[0]
    nus = dict(jax.tree_util.tree_flatten_with_path(adam.nu)[0])
    for path, mu in mus:
      keys = _path_keys(path)
      if keys not in index:
        raise ValueError(f"optimizer state for {'.'.join(keys)}, which is not a trainable "
                         "parameter of the release's student")
      i, layout = index[keys]
      tensor = lambda x: torch.from_numpy(np.array(to_torch_layout(to_numpy(x), layout)))
      state[i] = {"step": torch.tensor(float(int(adam.count)), dtype=torch.float32),
                  "exp_avg": tensor(mu), "exp_avg_sq": tensor(nus[path])}
  hp = _hyperparams(opt_state)
  lr = float(hp.get("learning_rate", 0.0))
  wd = float(hp.get("weight_decay", 0.0))
  defaults = torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults
  groups = [{**defaults, "lr": lr, "weight_decay": wd, "params": list(range(len(reg)))},
            {**defaults, "lr": lr, "weight_decay": 0.0,
             "params": list(range(len(reg), len(reg) + len(not_reg)))}]
  return {"state": state, "param_groups": groups}


def optimizer_from_torch(torch_state: Mapping[str, Any], opt_state: Any, params: Mapping[str, Any],
                         *, norm_last_layer: bool) -> tuple[Any, int]:
  """The release's AdamW state_dict -> (opt_state, step), filling a template optax state.

  opt_state: dino_jax's optimizer state for `params` (e.g. a fresh one: its structure is all that
  is used). Moments of parameters without torch state (never updated) are zero. Returns the
  optimizer step: the largest Adam step held (the backbone's, which is never frozen).
  """
  reg, not_reg = _param_groups(params, norm_last_layer, "")
  groups = torch_state["param_groups"]
  sizes = [len(g["params"]) for g in groups]
  if sizes != [len(reg), len(not_reg)]:
    raise ValueError(f"optimizer param groups hold {sizes} parameters; this model's release-style "
                     f"groups (regularized, not regularized) hold {[len(reg), len(not_reg)]}: the "
                     "checkpoint's head or backbone differs (norm_last_layer?)")
  ids = [i for g in groups for i in g["params"]]
  by_path = {}
  for pid, e in zip(ids, reg + not_reg):
    if pid in torch_state["state"]:
      s = torch_state["state"][pid]
      shape = torch_shape(shape_of(get_path(params, e.path)), e.layout)
      for name in ("exp_avg", "exp_avg_sq"):
        if tuple(s[name].shape) != shape:
          raise ValueError(f"optimizer {name} of {e.key}: shape {fmt_shape(s[name].shape)}, the "
                           f"model expects {fmt_shape(shape)}")
      flax = lambda x: to_flax_layout(to_numpy(x), e.layout)  # pylint: disable=cell-var-from-loop
      by_path[e.path] = (int(to_numpy(s["step"])), flax(s["exp_avg"]), flax(s["exp_avg_sq"]))

  def fill(adam):
    if not _is_adam(adam):
      return adam
    counts = []

    def moment(i):
      def f(path, x):
        got = by_path.get(_path_keys(path))
        if got is None:
          return np.zeros(x.shape, x.dtype)
        counts.append(got[0])
        return got[i].astype(x.dtype)
      return f

    mu = jax.tree_util.tree_map_with_path(moment(1), adam.mu)
    nu = jax.tree_util.tree_map_with_path(moment(2), adam.nu)
    count = max(counts, default=0)
    return adam._replace(count=np.asarray(count, np.asarray(adam.count).dtype), mu=mu, nu=nu)

  opt_state = jax.tree.map(fill, opt_state, is_leaf=_is_adam)
  step = max((int(a.count) for a in jax.tree.leaves(opt_state, is_leaf=_is_adam) if _is_adam(a)),
             default=0)
  hp = {"learning_rate": groups[0]["lr"], "weight_decay": groups[0]["weight_decay"]}

  def rest(path, x):
    # Scalars outside the Adam states: inject_hyperparams' count, the schedules' counts and the
    # freeze's step counter count every optimizer step; hyperparams hold this step's lr and wd.
    if m := re.search(r"\.hyperparams\['(\w+)'\]$", jax.tree_util.keystr(path)):
      return np.asarray(hp.get(m.group(1), x), np.asarray(x).dtype)
    if np.ndim(x) == 0 and np.issubdtype(np.asarray(x).dtype, np.integer):
      return np.asarray(step, np.asarray(x).dtype)
    return x

  leaves, treedef = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_is_adam)
  leaves = [x if _is_adam(x) else rest(p, x) for p, x in leaves]
  return jax.tree_util.tree_unflatten(treedef, leaves), step
