"""train_step on a tiny ViT: 8 devices vs 1, gradient accumulation, EMA teacher, centre, frozen last
layer and the collapse metrics, each against NumPy computed here from the reference's formulas."""
import functools
import zlib

import jax
import numpy as np
import helpers
from helpers import assert_trees_close
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dino_jax import optim, schedules, train
from dino_jax import state as state_lib
from dino_jax.models import build_models

B, G, L, K = 32, 2, 2, 64
STEPS_PER_EPOCH, TOTAL = 2, 40
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def tiny_config():
  return helpers.tiny_config(
      model__drop_path_rate=0.0,  # deterministic: the comparisons need the same forward
      local_crops_number=L, out_dim=K, batch_size=B,
      lr=0.008,  # x 32 / 256 = 1e-3
      warmup_epochs=0,
      momentum_teacher=0.9,  # a visible EMA step
      freeze_last_layer=1)  # epoch 0 = steps 0 and 1


def cosine(base, final, total):
  i = np.arange(total)
  return final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / total))


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _init_like(path, x):
  """The reference's init in spirit: N(0, 0.02) weights, zero biases, LN 1, weight-norm g 1."""
  name = jax.tree_util.keystr(path)
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  if name.endswith(("['scale']", "['kernel_g']")):
    return np.ones(x.shape, np.float32)
  if name.endswith("['bias']"):
    return np.zeros(x.shape, np.float32)
  std = 0.1 if "patch_embed" in name or "kernel_v" in name else 0.02
  return (rng.normal(size=x.shape) * std).astype(np.float32)


def compile_fast(jitted, *args):
  """Compiles with LLVM optimisation off: half the compile time of these one-off programs, same
  arithmetic (XLA CPU keeps fast-math off either way)."""
  return jitted.lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


class Setup:
  """Models, optimizer, a fresh state (host copy) and a fixed uint8 batch."""

  def __init__(self, **overrides):
    self.config = c = tiny_config()
    c.update(overrides)
    self.student, self.teacher = build_models(c)
    self.schedules = schedules.dino_schedules(c, STEPS_PER_EPOCH, TOTAL)
    self.tx = optim.make_optimizer(c, self.schedules, STEPS_PER_EPOCH)
    init = functools.partial(state_lib.create_train_state, student=self.student, tx=self.tx,
                             crop_shapes=[(G, 16, 16, 3), (L, 8, 8, 3)], out_dim=K)
    # The state's structure from create_train_state; weights drawn here with NumPy (init's RNG
    # costs seconds of compilation).
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map_with_path(_init_like, abstract.params)
    self.state0 = abstract.replace(
        step=np.zeros((), np.int32), params=params, opt_state=host(self.tx.init(params)),
        teacher_params=jax.tree.map(np.copy, params), center=np.zeros((1, K), np.float32))
    rng = np.random.default_rng(0)
    self.batch = {"global": rng.integers(0, 256, (B, G, 16, 16, 3), np.uint8),
                  "local": rng.integers(0, 256, (B, L, 8, 8, 3), np.uint8)}
    self.rng = np.asarray(jax.random.PRNGKey(1))
    self._forward = {}

  def step_fn(self, n_devices, grad_accum_steps=1):
    """A jitted, donating step over a (n_devices, 1) mesh; takes and returns host trees."""
    mesh = Mesh(np.array(jax.devices()[:n_devices]).reshape(n_devices, 1), ("data", "fsdp"))
    batch_sh, repl = NamedSharding(mesh, P(("data", "fsdp"))), NamedSharding(mesh, P())
    fn = jax.jit(
        functools.partial(train.train_step, student=self.student, teacher=self.teacher,
                          tx=self.tx, schedules=self.schedules, grad_accum_steps=grad_accum_steps),
        in_shardings=(repl, batch_sh, repl), out_shardings=(repl, repl), donate_argnums=0)

    def run(state, batch, steps=1):
      state = jax.device_put(state, repl)
      batch, rng = jax.device_put(batch, batch_sh), jax.device_put(self.rng, repl)
      assert batch["global"].sharding.shard_shape(batch["global"].shape)[0] == B // n_devices
      compiled = compile_fast(fn, state, batch, rng)
      states, metrics = [], []
      with jax.transfer_guard("disallow"):
        for _ in range(steps):
          state, m = compiled(state, batch, rng)
          states.append(host(state))  # before the next call donates it
          metrics.append(host(m))
      return states, metrics

    return run

  def logits(self, params, images, which):
    """Backbone then head, applied here on NumPy-normalised crops (B, n, H, W, 3) -> (n*B, K),
    crop-major."""
    model = self.teacher if which == "teacher" else self.student
    x = ((images / 255.0 - MEAN) / STD).astype(np.float32)
    x = np.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])
    key = (which, x.shape)
    if key not in self._forward:
      fn = lambda p, x: model.head.apply({"params": p["head"]}, model.backbone.apply(
          {"params": p["backbone"]}, x))
      self._forward[key] = compile_fast(jax.jit(fn), params, x)
    return np.asarray(self._forward[key](params, x), np.float64)


@pytest.fixture(scope="module")
def setup():
  return Setup()


@pytest.fixture(scope="module")
def trajectory(setup):
  """10 steps on the fixed batch over 8 devices: states 0..10 and the metrics of steps 0..9."""
  states, metrics = setup.step_fn(8)(setup.state0, setup.batch, steps=10)
  return [setup.state0] + states, metrics


def test_8_devices_equal_1_device(setup, trajectory):
  (s8, *_), (m8, *_) = trajectory[0][1:], trajectory[1]
  (s1,), (m1,) = setup.step_fn(1)(setup.state0, setup.batch)
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  assert_trees_close(s8.params, s1.params, 1e-5, norm=True, what="params")
  assert_trees_close(s8.teacher_params, s1.teacher_params, 1e-5, norm=True, what="teacher")
  assert_trees_close(s8.center, s1.center, 1e-5, what="center")
  assert_trees_close(s8.opt_state, s1.opt_state, 1e-5, what="opt_state")


def test_grad_accumulation_equals_one_big_batch(setup, trajectory):
  (s_acc,), (m_acc,) = setup.step_fn(8, grad_accum_steps=4)(setup.state0, setup.batch)
  s_one, m_one = trajectory[0][1], trajectory[1][0]
  for key in ("loss", "entropy", "batch_entropy", "kl", "grad_norm"):
    np.testing.assert_allclose(m_acc[key], m_one[key], rtol=1e-5, err_msg=key)
  assert_trees_close(s_acc.params, s_one.params, 1e-5, norm=True, what="params")
  assert_trees_close(s_acc.teacher_params, s_one.teacher_params, 1e-5, norm=True, what="teacher")
  assert_trees_close(s_acc.center, s_one.center, 1e-5, what="center")
  assert_trees_close(s_acc.opt_state, s_one.opt_state, 1e-5, what="opt_state")


def test_loss_decreases_on_a_fixed_batch(trajectory):
  # Over ~10 steps: the student learns the teacher's targets. (Later, on one fixed batch of
  # near-identical noise images, the centre catches up with the teacher's common output, the
  # teacher flattens towards uniform and the loss climbs towards ln K: DINO's collapse, not a
  # fault of the step.)
  losses = np.array([m["loss"] for m in trajectory[1]])
  assert np.all(np.isfinite(losses))
  assert losses[-3:].mean() < 0.5 * losses[0], losses


def test_teacher_moves_by_one_minus_m_towards_the_new_student(trajectory):
  states, metrics = trajectory
  momentum = cosine(0.9, 1.0, TOTAL)
  for k in (0, 1, 5):
    old, new = states[k], states[k + 1]
    m = momentum[k]
    np.testing.assert_allclose(metrics[k]["momentum"], m, rtol=1e-6)
    want = jax.tree.map(lambda t, s: m * np.float64(t) + (1 - m) * np.float64(s),
                        old.teacher_params, new.params)
    assert_trees_close(new.teacher_params, want, 1e-6, what=f"teacher after step {k}")
  # It did move: the teacher's first linear differs from the initial copy.
  assert not np.array_equal(states[2].teacher_params["head"]["mlp_0"]["kernel"],
                            states[0].teacher_params["head"]["mlp_0"]["kernel"])


def test_last_layer_frozen_in_epoch_0_only(trajectory):
  states = trajectory[0]
  last = lambda s: s.params["head"]["last_layer"]
  for k in (1, 2):  # after the steps of epoch 0
    np.testing.assert_array_equal(last(states[k])["kernel_v"], last(states[0])["kernel_v"])
    # The teacher's copy stays put too (m v + (1 - m) v, up to float32 rounding).
    np.testing.assert_allclose(states[k].teacher_params["head"]["last_layer"]["kernel_v"],
                               last(states[0])["kernel_v"], rtol=1e-6)
  assert not np.allclose(last(states[3])["kernel_v"], last(states[2])["kernel_v"])
  # norm_last_layer: g stays exactly 1 for good.
  np.testing.assert_array_equal(last(states[-1])["kernel_g"], 1.0)
  # Everything else moved in step 0.
  assert not np.allclose(states[1].params["head"]["mlp_4"]["kernel"],
                         states[0].params["head"]["mlp_4"]["kernel"])


def test_centre_is_ema_of_the_teacher_batch_mean(setup, trajectory):
  states = trajectory[0]
  for k in (0, 1):
    old, new = states[k], states[k + 1]
    t = setup.logits(old.teacher_params, setup.batch["global"], "teacher")  # (G*B, K)
    want = 0.9 * np.float64(old.center) + 0.1 * t.mean(0, keepdims=True)
    np.testing.assert_allclose(new.center, want, rtol=1e-5, atol=1e-7)
  assert np.abs(states[2].center).max() > 0


def test_metrics_against_numpy(setup, trajectory):
  states, metrics = trajectory
  k = 1  # the second step: non-zero centre
  state, m = states[k], metrics[k]
  tt = 0.04
  t = setup.logits(state.teacher_params, setup.batch["global"], "teacher").reshape(G, B, K)
  crops = [setup.batch["global"], setup.batch["local"]]
  s = np.concatenate([setup.logits(state.params, c, "student").reshape(-1, B, K) for c in crops])
  p_t = softmax((t - state.center) / tt)  # (G, B, K)
  log_p_s = np.log(softmax(s / 0.1))  # (G + L, B, K)
  entropy = np.mean(-np.sum(p_t * np.log(p_t), -1))
  mean_p = p_t.reshape(-1, K).mean(0)
  batch_entropy = -np.sum(mean_p * np.log(mean_p))
  ce, kl = [], []
  for i in range(G):
    for v in range(G + L):
      if v != i:
        ce.append(np.mean(np.sum(-p_t[i] * log_p_s[v], -1)))
        kl.append(np.mean(np.sum(p_t[i] * (np.log(p_t[i]) - log_p_s[v]), -1)))
  np.testing.assert_allclose(m["loss"], np.mean(ce), rtol=1e-5)
  np.testing.assert_allclose(m["entropy"], entropy, rtol=1e-5)
  np.testing.assert_allclose(m["batch_entropy"], batch_entropy, rtol=1e-5)
  np.testing.assert_allclose(m["kl"], np.mean(kl), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(m["teacher_temp"], tt, rtol=1e-6)
  np.testing.assert_allclose(m["lr"], cosine(setup.config.lr * B / 256, 1e-6, TOTAL)[k], rtol=1e-6)
  np.testing.assert_allclose(m["wd"], cosine(0.04, 0.4, TOTAL)[k], rtol=1e-6)
  assert int(state.step) == k and int(states[k + 1].step) == k + 1
