"""Speed of the same DINO step in PyTorch: the baseline a user would otherwise run.

  python benchmarks/torch_step.py --config configs/vit_small_imagenet.py \
      --config.batch_size=16 --config.model.arch=vit_tiny --steps 16 [--compile] [--threads 1]
  python benchmarks/torch_step.py --config configs/resnet50_imagenet.py --config.batch_size=8 \
      --config.global_crops_size=64 --config.local_crops_size=32 --config.model.dtype=float32

Written from the reference (../shared/dino-reference.md), as the release's train_one_epoch does it:
timm's VisionTransformer (pre-norm, exact GELU, fused SDPA attention) or torchvision's resnet50
(fc = Identity; plain BatchNorm, which is SyncBatchNorm on one process) as student and teacher, a
DINOHead (3-layer MLP, optional BatchNorm, L2 norm, weight-normalised last layer), the backbone run
once per crop resolution and the head once; the DINO loss with its centre; per-tensor gradient
clipping; AdamW (or SGD with momentum 0.9: config.optimizer) with the decay / no-decay parameter
groups; EMA teacher. On GPU, the release's fp16
autocast with a dynamic loss scaler (`--amp`, on by default there). Crops are random normalised
float tensors already on the device (the release normalises in its data loader), so this is the
step alone: compare with `train_step.py --noaugment`.

Departures, none of which changes the cost: lr, weight decay, teacher momentum and temperature are
constants (the release reads them from per-step arrays); clipping and the EMA use torch's
_foreach ops (the same arithmetic as the release's per-tensor loops, without a host sync per
tensor); the last layer trains (the release freezes it in epoch 0); timm resizes the position
embedding for the local crops with its own bicubic resampling (the release: scale factors).

Prints a table and, as its last line, one JSON object with train_step.py's keys (step_ms and
images_per_sec from the median step; step_ms_min beside them).
"""
import functools
import json
import resource
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from absl import app, flags
from ml_collections import config_flags
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import resnet50

from dino_jax.models.vit import SIZES

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Training config.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after 2 warm-up steps.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak dense TFLOP/s of the device, for MFU.")
_COMPILE = flags.DEFINE_bool("compile", False, "torch.compile the student and the teacher.")
_AMP = flags.DEFINE_bool("amp", None, "fp16 autocast + GradScaler (default: on with CUDA).")
_THREADS = flags.DEFINE_integer("threads", 0, "torch.set_num_threads (0: torch's default).")


def timm_vit(sizes: dict, patch_size: int, img_size: int, drop_path_rate: float) -> nn.Module:
  """timm's ViT as the release's (qkv bias, LayerNorm eps 1e-6, [CLS] feature out); sizes:
  embed_dim, depth, num_heads. Any crop size that is a multiple of the patch goes in."""
  return VisionTransformer(
      img_size=img_size, patch_size=patch_size, num_classes=0, global_pool="token",
      mlp_ratio=4.0, qkv_bias=True, dynamic_img_size=True, drop_path_rate=drop_path_rate,
      norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), **sizes)


def make_backbone(config, drop_path_rate: float) -> nn.Module:
  m = config.model
  if m.arch == "resnet50":  # the release: torchvision's, its fc replaced by the identity
    net = resnet50()
    net.embed_dim = net.fc.weight.shape[1]
    net.fc = nn.Identity()
    return net
  sizes = dict(SIZES.get(m.arch, {}))
  sizes.update({k: m[k] for k in ("embed_dim", "depth", "num_heads") if m[k] > 0})
  return timm_vit(sizes, m.patch_size, config.global_crops_size, drop_path_rate)


class DINOHead(nn.Module):
  """MLP (Linear, [BatchNorm1d], GELU, ...) -> F.normalize -> weight-normalised Linear, g = 1."""

  def __init__(self, in_dim, out_dim, use_bn, norm_last_layer, nlayers, hidden_dim,
               bottleneck_dim):
    super().__init__()
    dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
    layers = []
    for i in range(len(dims) - 1):
      layers.append(nn.Linear(dims[i], dims[i + 1]))
      if i < len(dims) - 2:
        layers += ([nn.BatchNorm1d(dims[i + 1])] if use_bn else []) + [nn.GELU()]
    self.mlp = nn.Sequential(*layers)
    for layer in self.mlp:
      if isinstance(layer, nn.Linear):
        nn.init.trunc_normal_(layer.weight, std=0.02)
        nn.init.zeros_(layer.bias)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # the release's (deprecated) weight_norm
      self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    self.last_layer.weight_g.data.fill_(1)
    if norm_last_layer:
      self.last_layer.weight_g.requires_grad = False

  def forward(self, x):
    return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class MultiCropWrapper(nn.Module):
  """Backbone once per crop resolution (crop-major batches), head once on all features."""

  def __init__(self, backbone, head):
    super().__init__()
    self.backbone, self.head = backbone, head

  def forward(self, crops):
    return self.head(torch.cat([self.backbone(c) for c in crops]))


def dino_loss(student_out, teacher_out, center, teacher_temp, student_temp, n_crops, n_global):
  """Mean over (teacher view i, student view v != i) of the batch-mean cross-entropy."""
  student_out = (student_out / student_temp).chunk(n_crops)
  teacher_out = F.softmax((teacher_out - center) / teacher_temp, dim=-1).detach().chunk(n_global)
  total, terms = 0, 0
  for i, t in enumerate(teacher_out):
    for v, s in enumerate(student_out):
      if v != i:
        total = total + torch.sum(-t * F.log_softmax(s, dim=-1), dim=-1).mean()
        terms += 1
  return total / terms


def main(argv):
  del argv
  config = _CONFIG.value
  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  amp = dev.type == "cuda" if _AMP.value is None else _AMP.value
  torch.manual_seed(0)
  m = config.model

  def wrapper(drop_path_rate):
    backbone = make_backbone(config, drop_path_rate)
    head = DINOHead(backbone.embed_dim, config.out_dim, m.use_bn_in_head, m.norm_last_layer,
                    m.head_nlayers, m.head_hidden_dim, m.head_bottleneck_dim)
    return MultiCropWrapper(backbone, head).to(dev)

  student, teacher = wrapper(m.drop_path_rate), wrapper(0.0)
  teacher.load_state_dict(student.state_dict())
  for p in teacher.parameters():
    p.requires_grad = False
  student.train()
  teacher.train()  # as the release: BN (if any) uses batch statistics in the teacher too
  named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
  decay = [p for n, p in named if not (n.endswith(".bias") or p.ndim == 1)]
  no_decay = [p for n, p in named if n.endswith(".bias") or p.ndim == 1]
  lr = config.lr * config.batch_size / 256
  groups = [{"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
  if config.optimizer == "adamw":
    opt = torch.optim.AdamW(groups, lr=lr)
  elif config.optimizer == "sgd":
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
  else:
    raise ValueError(f"config.optimizer={config.optimizer!r}: this benchmark runs adamw or sgd")
  scaler = torch.amp.GradScaler("cuda", enabled=amp)
  params_s = [p for _, p in named]
  pairs = [(ps, pt) for ps, pt in zip(student.parameters(), teacher.parameters())]
  center = torch.zeros(1, config.out_dim, device=dev)
  momentum, teacher_temp = config.momentum_teacher, config.teacher_temp
  run_student, run_teacher = student, teacher
  if _COMPILE.value:
    run_student, run_teacher = torch.compile(student), torch.compile(teacher)

  b, g, l, n_local = (config.batch_size, config.global_crops_size, config.local_crops_size,
                      config.local_crops_number)
  crops = [torch.randn(2 * b, 3, g, g, device=dev)]  # crop-major, normalised
  if n_local:
    crops.append(torch.randn(n_local * b, 3, l, l, device=dev))

  def step(run_student=run_student, run_teacher=run_teacher):
    nonlocal center
    with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
      teacher_out = run_teacher(crops[:1])
      student_out = run_student(crops)
      loss = dino_loss(student_out.float(), teacher_out.float(), center, teacher_temp,
                       config.student_temp, 2 + n_local, 2)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grads = [p.grad for p in params_s]
    norms = torch._foreach_norm(grads)  # pylint: disable=protected-access
    coefs = [torch.clamp(config.clip_grad / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)  # pylint: disable=protected-access
    scaler.step(opt)
    scaler.update()
    with torch.no_grad():
      ps, pt = [p for p, _ in pairs], [q for _, q in pairs]
      torch._foreach_mul_(pt, momentum)  # pylint: disable=protected-access
      torch._foreach_add_(pt, ps, alpha=1 - momentum)  # pylint: disable=protected-access
      t = teacher_out.float()
      center = center * config.center_momentum + t.mean(0, keepdim=True) * (
          1 - config.center_momentum)
    return loss

  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
  t0 = time.perf_counter()
  loss = step()
  sync()
  first_s = time.perf_counter() - t0
  loss = step()
  with FlopCounterMode(display=False) as counter:
    step(student, teacher)  # eager: the counter sees each aten op
  flops = float(counter.get_total_flops())
  if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  sync()
  times = []
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - t0)
  step_s, min_s = float(np.median(times)), float(np.min(times))
  if dev.type == "cuda":
    peak_bytes, memory = torch.cuda.max_memory_allocated(), "device peak"
  else:
    peak_bytes, memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"
  result = {
      "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
      "devices": 1, "framework": f"torch {torch.__version__}", "threads": torch.get_num_threads(),
      "arch": m.arch, "optimizer": config.optimizer, "patch_size": m.patch_size,
      "dtype": "float16 autocast" if amp else "float32",
      "compiled": _COMPILE.value, "batch_size": b, "crops": f"2x{g}+{n_local}x{l}",
      "out_dim": config.out_dim, "step_ms": 1e3 * step_s, "step_ms_min": 1e3 * min_s,
      "images_per_sec": b / step_s, "compile_s": first_s, "flops_per_image": flops / b,
      "tflops_per_sec": flops / step_s / 1e12,
      "mfu": (flops / step_s / 1e12 / _PEAK.value) if _PEAK.value else None,
      "peak_memory_gb": peak_bytes / 2**30, "memory": memory,
      "loss_finite": bool(torch.isfinite(loss)),
  }
  for k, v in result.items():
    print(f"{k:>16}: {v:.4g}" if isinstance(v, float) else f"{k:>16}: {v}")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
