"""dino_loss, update_center and entropy against NumPy loops of the reference's formulas and a
transcription of the release's DINOLoss in PyTorch."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dino_jax import losses

# Jitted: compiling each program once is cheaper than op-by-op dispatch of every new shape.
dino_loss = jax.jit(losses.dino_loss, static_argnames=("student_temp", "n_global"))
update_center = jax.jit(losses.update_center, static_argnames=("momentum",))
entropy = jax.jit(losses.entropy)


def _logits(seed, n_crops=6, b=5, k=7, scale=3.0):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(n_crops * b, k)) * scale
  t = rng.normal(size=(2 * b, k)) * scale
  c = rng.normal(size=(1, k))
  return s.astype(np.float32), t.astype(np.float32), c.astype(np.float32)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def numpy_loss(s, t, c, teacher_temp, student_temp=0.1, n_global=2):
  """The reference, pair by pair, in float64: mean over (i global, v != i) of
  mean_b sum_k -P_t[i] log P_s[v]."""
  s, t, c = (np.float64(x) for x in (s, t, c))
  b = t.shape[0] // n_global
  n = s.shape[0] // b
  terms = []
  for i in range(n_global):
    p_t = _softmax((t[i * b:(i + 1) * b] - c) / teacher_temp)
    for v in range(n):
      if v == i:
        continue
      z = s[v * b:(v + 1) * b] / student_temp
      log_p_s = z - z.max(-1, keepdims=True)
      log_p_s -= np.log(np.exp(log_p_s).sum(-1, keepdims=True))
      terms.append(np.mean(np.sum(-p_t * log_p_s, -1)))
  assert len(terms) == 2 * (n - 1)
  return np.mean(terms)


class TorchDINOLoss(torch.nn.Module):
  """The release's DINOLoss (single process: the all_reduce is the identity)."""

  def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
               warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9):
    super().__init__()
    self.student_temp = student_temp
    self.center_momentum = center_momentum
    self.ncrops = ncrops
    self.register_buffer("center", torch.zeros(1, out_dim))
    self.teacher_temp_schedule = np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))

  def forward(self, student_output, teacher_output, epoch):
    student_out = (student_output / self.student_temp).chunk(self.ncrops)
    temp = self.teacher_temp_schedule[epoch]
    teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
      for v in range(len(student_out)):
        if v == iq:
          continue
        loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
        total_loss += loss.mean()
        n_loss_terms += 1
    total_loss /= n_loss_terms
    self.update_center(teacher_output)
    return total_loss

  @torch.no_grad()
  def update_center(self, teacher_output):
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
    self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


@pytest.mark.parametrize("n_crops,b,teacher_temp", [(2, 3, 0.04), (6, 5, 0.07), (10, 4, 0.04)])
def test_dino_loss_matches_numpy_pairs_in_both_layouts(n_crops, b, teacher_temp):
  s, t, c = _logits(n_crops, n_crops, b, k=11)
  want = numpy_loss(s, t, c, teacher_temp)
  flat = dino_loss(s, t, c, teacher_temp)
  stacked = dino_loss(s.reshape(n_crops, b, -1), t.reshape(2, b, -1), c, teacher_temp)
  np.testing.assert_allclose(flat, want, rtol=1e-6)
  np.testing.assert_allclose(stacked, want, rtol=1e-6)


def test_dino_loss_student_temp_and_mixed_layouts():
  s, t, c = _logits(1, 4, 3)
  want = numpy_loss(s, t, c, 0.05, student_temp=0.2)
  got = dino_loss(s, t.reshape(2, 3, -1), c, 0.05, student_temp=0.2)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_dino_loss_and_gradient_match_the_release_dinoloss():
  s, t, c = _logits(2, 10, 4, k=16)
  ref = TorchDINOLoss(16, 10, 0.04, 0.07, 3, 10)
  ref.center = torch.from_numpy(c)
  for epoch in (0, 1, 5):  # the warm-up of the teacher temperature, by epoch
    ref.center = torch.from_numpy(c)
    s_t = torch.from_numpy(s).requires_grad_(True)
    want = ref(s_t, torch.from_numpy(t), epoch)
    want.backward()
    temp = float(ref.teacher_temp_schedule[epoch])
    loss_fn = functools.partial(losses.dino_loss, teacher_out=jnp.asarray(t),
                                center=jnp.asarray(c), teacher_temp=temp)
    got, grad = jax.jit(jax.value_and_grad(loss_fn))(jnp.asarray(s))
    np.testing.assert_allclose(got, want.item(), rtol=1e-6)
    np.testing.assert_allclose(grad, s_t.grad.numpy(), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(update_center(c, t), ref.center.numpy(), rtol=1e-6, atol=1e-7)


def test_dino_loss_has_no_gradient_through_the_teacher():
  s, t, c = _logits(3, 4, 3)
  g = jax.jit(jax.grad(losses.dino_loss, argnums=1))(s, t, c, 0.04)
  assert not np.any(np.asarray(g))


def test_dino_loss_is_the_mean_of_teacher_entropy_and_kl():
  # CE = H(P_t) + KL(P_t || P_s): with the student equal to the teacher's logits at the same
  # temperature on each global view, the two global pairs' KL terms vanish.
  s, t, c = _logits(4, 2, 6)
  tt = 0.1
  s = ((t.reshape(2, 6, -1)[::-1] - c) / tt * 0.1).reshape(12, -1)  # student view v = teacher 1-v
  p_t = _softmax((np.float64(t) - c) / tt)
  h = np.mean(-np.sum(p_t * np.log(p_t), -1))
  np.testing.assert_allclose(dino_loss(s, t, c, tt), h, rtol=1e-5)


@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_update_center_both_layouts(momentum):
  _, t, c = _logits(5, b=6, k=9)
  want = momentum * np.float64(c) + (1 - momentum) * np.float64(t).mean(0, keepdims=True)
  np.testing.assert_allclose(update_center(c, t, momentum=momentum), want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(update_center(c, t.reshape(2, 6, -1), momentum=momentum), want,
                             rtol=1e-6, atol=1e-7)
  assert update_center(c, t).shape == (1, 9)


def test_centre_and_loss_are_global_batch_means_on_8_devices():
  devices = np.array(jax.devices())
  assert devices.size == 8
  mesh = Mesh(devices.reshape(8, 1), ("data", "fsdp"))
  b, k = 16, 10
  s, t, c = _logits(6, 4, b, k)
  # Crop-major (n, B, K) with B sharded: each device holds 2 images of every crop.
  rows = NamedSharding(mesh, P(None, ("data", "fsdp")))
  repl = NamedSharding(mesh, P())
  t_sh = jax.device_put(t.reshape(2, b, k), rows)
  s_sh = jax.device_put(s.reshape(4, b, k), rows)
  assert {sh.data.shape for sh in t_sh.addressable_shards} == {(2, 2, k)}
  center_fn = jax.jit(losses.update_center, in_shardings=(repl, rows), out_shardings=repl)
  loss_fn = jax.jit(functools.partial(losses.dino_loss, teacher_temp=0.04),
                    in_shardings=(rows, rows, repl), out_shardings=repl)
  c_sh = jax.device_put(c, repl)
  want_c = 0.9 * np.float64(c) + 0.1 * np.float64(t).mean(0, keepdims=True)
  np.testing.assert_allclose(center_fn(c_sh, t_sh), want_c, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(loss_fn(s_sh, t_sh, c_sh), numpy_loss(s, t, c, 0.04), rtol=1e-6)
  # The 2-D (2B, K) layout, rows sharded.
  t2 = jax.device_put(t, NamedSharding(mesh, P(("data", "fsdp"))))
  np.testing.assert_allclose(jax.jit(losses.update_center)(c_sh, t2), want_c, rtol=1e-6,
                             atol=1e-7)


def test_entropy_in_nats():
  rng = np.random.default_rng(7)
  p = _softmax(rng.normal(size=(3, 4, 12)) * 2)
  want = -np.sum(p * np.log(p), -1)
  np.testing.assert_allclose(entropy(p.astype(np.float32)), want, rtol=1e-5)
  k = 64
  np.testing.assert_allclose(entropy(np.full((k,), 1.0 / k, np.float32)), np.log(k), rtol=1e-6)
  one_hot = np.zeros(k, np.float32)
  one_hot[3] = 1.0  # 0 log 0 = 0, not NaN
  assert float(entropy(one_hot)) == 0.0


def test_teacher_probs_centre_and_temperature():
  _, t, c = _logits(8, b=3, k=5)
  want = _softmax((np.float64(t) - c) / 0.07).reshape(2, 3, 5)
  probs = jax.jit(losses.teacher_probs)(t, c, 0.07)
  np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-7)
