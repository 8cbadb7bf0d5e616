"""The release's PyTorch pieces the tests compare against, transcribed from the reference's
description (the published code cannot be downloaded here). One copy for every test file."""
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
  """The release's DINOHead: nn.Sequential MLP (Linear, [BatchNorm1d], GELU, ...), F.normalize,
  nn.utils.weight_norm(nn.Linear(bottleneck, K, bias=False)) with g filled with 1 (frozen with
  norm_last_layer). parametrized: torch's newer weight_norm API (keys
  parametrizations.weight.original0 / original1). Init left out: tests load weights."""

  def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3,
               hidden_dim=2048, bottleneck_dim=256, parametrized=False):
    super().__init__()
    nlayers = max(nlayers, 1)
    if nlayers == 1:
      self.mlp = nn.Linear(in_dim, bottleneck_dim)
    else:
      layers = [nn.Linear(in_dim, hidden_dim)]
      if use_bn:
        layers.append(nn.BatchNorm1d(hidden_dim))
      layers.append(nn.GELU())
      for _ in range(nlayers - 2):
        layers.append(nn.Linear(hidden_dim, hidden_dim))
        if use_bn:
          layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
      layers.append(nn.Linear(hidden_dim, bottleneck_dim))
      self.mlp = nn.Sequential(*layers)
    linear = nn.Linear(bottleneck_dim, out_dim, bias=False)
    if parametrized:
      self.last_layer = nn.utils.parametrizations.weight_norm(linear)
    else:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of the parametrizations API
        self.last_layer = nn.utils.weight_norm(linear)
      self.last_layer.weight_g.data.fill_(1)
      if norm_last_layer:
        self.last_layer.weight_g.requires_grad = False

  def forward(self, x):
    x = self.mlp(x)
    x = F.normalize(x, dim=-1, p=2)
    return self.last_layer(x)


def get_params_groups(named_params):
  """utils.get_params_groups: no weight decay on biases and 1-D tensors; frozen ones left out."""
  regularized, not_regularized = [], []
  for name, param in named_params:
    if not param.requires_grad:
      continue
    if name.endswith(".bias") or len(param.shape) == 1:
      not_regularized.append(param)
    else:
      regularized.append(param)
  return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
  """utils.LARS (for convnets): no weight decay and no trust ratio on 1-D tensors; the others get
  dp = grad + wd p, scaled by eta ||p|| / ||dp|| (1 where either norm is 0); then
  mu = momentum mu + dp, p -= lr mu."""

  def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001):
    super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

  @torch.no_grad()
  def step(self):
    for g in self.param_groups:
      for p in g["params"]:
        dp = p.grad
        if dp is None:
          continue
        if p.ndim != 1:
          dp = dp.add(p, alpha=g["weight_decay"])
          param_norm, update_norm = torch.norm(p), torch.norm(dp)
          one = torch.ones_like(param_norm)
          q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, g["eta"] * param_norm
                                                        / update_norm, one), one)
          dp = dp.mul(q)
        state = self.state[p]
        if "mu" not in state:
          state["mu"] = torch.zeros_like(p)
        mu = state["mu"]
        mu.mul_(g["momentum"]).add_(dp)
        p.add_(mu, alpha=-g["lr"])


def clip_gradients(named_params, clip):
  """utils.clip_gradients: per tensor, factor clip / (norm + 1e-6) when below 1."""
  for _, p in named_params:
    if p.grad is not None:
      clip_coef = clip / (p.grad.data.norm(2) + 1e-6)
      if clip_coef < 1:
        p.grad.data.mul_(clip_coef)


def cancel_gradients_last_layer(epoch, named_params, freeze_last_layer):
  """utils.cancel_gradients_last_layer: drop the last layer's gradients in the first epochs."""
  if epoch >= freeze_last_layer:
    return
  for n, p in named_params:
    if "last_layer" in n:
      p.grad = None


def interpolate_pos_encoding(pos_embed: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
  """VisionTransformer.interpolate_pos_encoding: bicubic with scale factors (g + 0.1) / n."""
  n = math.isqrt(pos_embed.shape[1] - 1)
  if gh * gw == n * n and gh == gw:
    return pos_embed
  d = pos_embed.shape[-1]
  patch = pos_embed[:, 1:].reshape(1, n, n, d).permute(0, 3, 1, 2)
  patch = F.interpolate(patch, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic",
                        align_corners=False)
  assert patch.shape[-2:] == (gh, gw)
  return torch.cat([pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, gh * gw, d)], 1)
