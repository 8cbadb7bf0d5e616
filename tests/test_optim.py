"""The optax chain against torch.optim.AdamW, torch.optim.SGD and the release's LARS driven exactly
as the release's training loop drives them: two param groups, per-iteration lr / wd, per-tensor
clip_gradients, cancel_gradients_last_layer, weight_g with requires_grad False when
norm_last_layer."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from dino_jax import optim, schedules
import release

# A tree shaped like ours: flax path -> (torch name, flax shape).
LEAVES = {
    ("backbone", "cls_token"): ("backbone.cls_token", (1, 1, 8)),
    ("backbone", "pos_embed"): ("backbone.pos_embed", (1, 5, 8)),
    ("backbone", "patch_embed", "kernel"): ("backbone.patch_embed.proj.weight", (2, 2, 3, 8)),
    ("backbone", "patch_embed", "bias"): ("backbone.patch_embed.proj.bias", (8,)),
    ("backbone", "blocks_0", "attn", "qkv", "kernel"): ("backbone.blocks.0.attn.qkv.weight",
                                                        (8, 24)),
    ("backbone", "blocks_0", "attn", "qkv", "bias"): ("backbone.blocks.0.attn.qkv.bias", (24,)),
    ("backbone", "norm", "scale"): ("backbone.norm.weight", (8,)),
    ("backbone", "norm", "bias"): ("backbone.norm.bias", (8,)),
    ("head", "mlp_0", "kernel"): ("head.mlp.0.weight", (8, 6)),
    ("head", "mlp_0", "bias"): ("head.mlp.0.bias", (6,)),
    ("head", "last_layer", "kernel_v"): ("head.last_layer.weight_v", (6, 10)),
    ("head", "last_layer", "kernel_g"): ("head.last_layer.weight_g", (1, 10)),
}


def to_torch_layout(x):
  """Flax layout -> PyTorch layout: (in, out) -> (out, in); HWIO -> OIHW."""
  x = np.asarray(x)
  return x.T if x.ndim == 2 else x.transpose(3, 2, 0, 1) if x.ndim == 4 else x


def tree_from(flat):
  tree = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


def flat_of(tree):
  return {tuple(k.key for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# How main_dino.py builds each optimizer from the param groups.
TORCH_OPTIMIZERS = {
    "adamw": lambda groups: torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8),
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0, momentum=0.9),
    "lars": release.LARS,
}


@pytest.mark.parametrize('optimizer,norm_last_layer', [("adamw", True), ("adamw", False),
                                                       ("sgd", True), ("lars", False)])
def test_matches_torch_as_the_release_drives_it(optimizer, norm_last_layer):
  rng = np.random.default_rng(0)
  per_epoch, epochs, freeze_epochs = 3, 3, 1
  total = per_epoch * epochs
  # The release's ViT-S peak lr. (optax's bias correction 1 - b2^t is float32, torch's float64:
  # at lr 0.05 that alone gives ~1e-6 relative differences at the second step.)
  lr = schedules.warmup_cosine(2e-3, 1e-6, total, 2)
  wd = schedules.warmup_cosine(0.04, 0.4, total)
  # The release's float64 tables (test_schedules pins ours to them).
  lr_np = np.concatenate([np.linspace(0, 2e-3, 2),
                          1e-6 + 0.5 * (2e-3 - 1e-6) * (1 + np.cos(np.pi * np.arange(total - 2)
                                                                   / (total - 2)))])
  wd_np = 0.4 + 0.5 * (0.04 - 0.4) * (1 + np.cos(np.pi * np.arange(total) / total))

  init = {path: rng.normal(size=shape).astype(np.float32) * 0.5
          for path, (_, shape) in LEAVES.items()}
  init[("head", "last_layer", "kernel_g")] = np.ones((1, 10), np.float32)
  if optimizer != "adamw":  # (Adam's eps makes near-zero updates rounding noise)
    # A tensor at zero with a zero gradient: LARS's trust ratio falls back to 1 at the first step.
    init[("backbone", "pos_embed")] = np.zeros((1, 5, 8), np.float32)
  if not norm_last_layer:
    init[("head", "last_layer", "kernel_g")] += rng.uniform(0, 1, (1, 10)).astype(np.float32)
  # Gradients large enough that some tensors are clipped (norm > 3) and some are not.
  grads = [{path: (rng.normal(size=shape) * rng.choice([0.05, 0.3, 3.0])).astype(np.float32)
            for path, (_, shape) in LEAVES.items()} for _ in range(total)]
  if optimizer != "adamw":
    grads[0][("backbone", "pos_embed")][:] = 0

  # --- PyTorch, the release's way.
  named = [(name, torch.nn.Parameter(torch.from_numpy(to_torch_layout(init[path]).copy())))
           for path, (name, _) in LEAVES.items()]
  if norm_last_layer:
    dict(named)["head.last_layer.weight_g"].requires_grad = False
  opt = TORCH_OPTIMIZERS[optimizer](release.get_params_groups(named))
  paths = list(LEAVES)

  # --- Ours.
  tx = optim.dino_optimizer(learning_rate=lr, weight_decay=wd, clip_grad=3.0,
                            freeze_last_layer_steps=freeze_epochs * per_epoch,
                            norm_last_layer=norm_last_layer, optimizer=optimizer)
  params = tree_from(init)
  opt_state = jax.jit(tx.init)(params)

  def step(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # LLVM optimisation off: half the compile time, same arithmetic.
  step = jax.jit(step).lower(params, opt_state, params).compile(
      {"xla_backend_optimization_level": 0})

  for it in range(total):
    epoch = it // per_epoch
    for i, group in enumerate(opt.param_groups):
      group["lr"] = lr_np[it]
      if i == 0:
        group["weight_decay"] = wd_np[it]
    for (_, p), path in zip(named, paths):
      p.grad = (torch.from_numpy(to_torch_layout(grads[it][path]).copy()) if p.requires_grad
                else None)
    release.clip_gradients(named, 3.0)
    release.cancel_gradients_last_layer(epoch, named, freeze_epochs)
    opt.step()

    params, opt_state = step(tree_from(grads[it]), opt_state, params)

    ours = flat_of(params)
    for (name, p), path in zip(named, paths):
      want = p.detach().numpy()
      got = to_torch_layout(ours[path])
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(),
                                 err_msg=f"{name} after step {it}")
      if "last_layer" in name and (epoch < freeze_epochs or name.endswith("weight_g")
                                   and norm_last_layer):
        np.testing.assert_array_equal(got, to_torch_layout(init[path]), err_msg=name)


def test_clip_per_tensor_is_not_global():
  g = {"a": jnp.full((4,), 3.0), "b": jnp.full((9,), 0.5), "c": jnp.zeros((2, 2))}
  tx = optim.clip_per_tensor(3.0)
  out, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(out["a"], np.full(4, 3.0 * 3.0 / (6.0 + 1e-6)), rtol=1e-7)  # norm 6
  np.testing.assert_array_equal(out["b"], g["b"])  # norm 1.5: untouched
  np.testing.assert_array_equal(out["c"], g["c"])


def test_decay_mask_and_labels_follow_the_release_rule():
  params = jax.tree.map(jnp.asarray, tree_from({p: np.zeros(s, np.float32)
                                                for p, (_, s) in LEAVES.items()}))
  mask = flat_of(optim.decay_mask(params))
  for path, (name, shape) in LEAVES.items():
    assert bool(mask[path]) == (not (name.endswith(".bias") or len(shape) == 1)), name
  for norm_last_layer in (True, False):
    labels = flat_of(optim.param_labels(params, norm_last_layer))
    for path, (name, _) in LEAVES.items():
      want = ("frozen" if norm_last_layer and name.endswith("weight_g") else
              "last_layer" if "last_layer" in name else "rest")
      assert labels[path] == want, name
