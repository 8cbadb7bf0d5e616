"""DINO training: the jitted step and the loop. `python -m dino_jax.train --config ... --workdir DIR`.

Shapes: B global batch, G = 2 global crops, L local crops, K head outputs.
"""
from __future__ import annotations

import functools
import math
import signal
import sys
import threading
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import flags, logging
from ml_collections import config_flags

from dino_jax import checkpoint
from dino_jax import cli
from dino_jax import config as config_lib
from dino_jax import diagnostics
from dino_jax import host_memory
from dino_jax import losses
from dino_jax import metrics as metrics_lib
from dino_jax import optim
from dino_jax import paths
from dino_jax import schedules as schedules_lib
from dino_jax import sharding as sharding_lib
from dino_jax import state as state_lib
from dino_jax.data import augment as augment_lib
from dino_jax.data import pipeline
from dino_jax.evaluate import features, report
from dino_jax.models import build_models


# ----------------------------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------------------------
def _micro_step(params, state: state_lib.TrainState, batch: dict[str, jax.Array], rng: jax.Array,
                *, student: nn.Module, teacher: nn.Module, teacher_temp: jax.Array,
                student_temp: float, augment: Callable | None):
  """Loss and gradient on one (micro-)batch. Returns (loss, grads, aux)."""
  aug_rng, drop_rng = jax.random.split(rng)
  if augment is not None:
    batch = augment(aug_rng, batch)
  crops = [augment_lib.normalize(batch["global"])]  # (B, G, H, W, 3)
  if "local" in batch:
    crops.append(augment_lib.normalize(batch["local"]))  # (B, L, h, w, 3)
  n_global = crops[0].shape[1]

  t_logits, t_vars = teacher.apply(
      {"params": state.teacher_params, "batch_stats": state.teacher_batch_stats}, crops[:1],
      train=True, mutable=["batch_stats"])
  t_logits = jax.lax.stop_gradient(jnp.swapaxes(t_logits, 0, 1))  # (G, B, K), crop-major

  def loss_fn(p):
    s_logits, s_vars = student.apply(
        {"params": p, "batch_stats": state.batch_stats}, crops, train=True,
        rngs={"drop_path": drop_rng}, mutable=["batch_stats"])
    s_logits = jnp.swapaxes(s_logits, 0, 1)  # (G + L, B, K)
    loss = losses.dino_loss(s_logits, t_logits, state.center, teacher_temp,
                            student_temp=student_temp, n_global=n_global)
    return loss, s_vars

  (loss, s_vars), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  probs = losses.teacher_probs(t_logits, state.center, teacher_temp, n_global)
  aux = {
      "teacher_mean": jnp.mean(t_logits.reshape(-1, t_logits.shape[-1]), 0, keepdims=True),
      "teacher_probs_mean": jnp.mean(probs, axis=(0, 1)),
      "entropy": jnp.mean(losses.entropy(probs)),
      "batch_stats": s_vars.get("batch_stats", {}),
      "teacher_batch_stats": t_vars.get("batch_stats", {}),
  }
  return loss, grads, aux


def train_step(state: state_lib.TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               student: nn.Module, teacher: nn.Module, tx: optax.GradientTransformation,
               schedules: dict[str, Callable], student_temp: float = 0.1,
               center_momentum: float = 0.9, grad_accum_steps: int = 1,
               augment: Callable | None = None) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """One DINO iteration: student on all crops, teacher on the global ones, loss, AdamW, EMA, centre.

  Args:
    state: the TrainState (donated by the caller's jit).
    batch: {'global': (B, G, H, W, 3), 'local': (B, L, h, w, 3)} crops, uint8 or [0, 1] float;
      normalised here, on device. Sharded along B.
    rng: base key; this step's key is fold_in(rng, state.step), so a resumed run repeats it.
    augment: optional on-device augmentation (rng, batch) -> batch, applied before normalising.
    grad_accum_steps: split B into this many micro-batches (rows j, j + A, ...: each device keeps
      its rows) and accumulate; loss, gradient and centre equal the whole batch's (BatchNorm
      statistics, if any, are per micro-batch).
  Returns:
    (new state, metrics): loss, lr, wd, momentum, teacher_temp, grad_norm, entropy, batch_entropy,
    kl (the collapse diagnostics, see losses.entropy).
  """
  step = state.step
  rng = jax.random.fold_in(rng, step)
  teacher_temp = schedules["teacher_temp"](step)
  micro = functools.partial(_micro_step, student=student, teacher=teacher,
                            teacher_temp=teacher_temp, student_temp=student_temp, augment=augment)
  if grad_accum_steps == 1:
    loss, grads, aux = micro(state.params, state, batch, rng)
  else:
    a = grad_accum_steps
    # (B, ...) -> (A, B / A, ...) taking rows j, j + A, ...: a transpose of the unsharded axis.
    split = lambda x: jnp.swapaxes(x.reshape((x.shape[0] // a, a) + x.shape[1:]), 0, 1)
    micro_batches = jax.tree.map(split, batch)

    def body(carry, xs):
      st, acc = carry
      mb, i = xs
      loss, grads, aux = micro(st.params, st, mb, jax.random.fold_in(rng, i))
      st = st.replace(batch_stats=aux.pop("batch_stats"),
                      teacher_batch_stats=aux.pop("teacher_batch_stats"))
      acc = jax.tree.map(lambda s, x: s + x / a, acc, (loss, grads, aux))
      return (st, acc), None

    zero_aux = {"teacher_mean": jnp.zeros_like(state.center),
                "teacher_probs_mean": jnp.zeros(state.center.shape[-1]),
                "entropy": jnp.zeros(())}
    zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params), zero_aux)
    (st, (loss, grads, aux)), _ = jax.lax.scan(body, (state, zeros),
                                               (micro_batches, jnp.arange(a)))
    aux.update(batch_stats=st.batch_stats, teacher_batch_stats=st.teacher_batch_stats)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  momentum = schedules["momentum"](step)
  metrics = {
      "loss": loss,
      "lr": schedules["lr"](step),
      "wd": schedules["wd"](step),
      "momentum": momentum,
      "teacher_temp": teacher_temp,
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "entropy": aux["entropy"],
      "batch_entropy": losses.entropy(aux["teacher_probs_mean"]),
      "kl": loss - aux["entropy"],  # KL(teacher || student), mean over the loss's pairs
  }
  new_state = state.replace(
      step=step + 1,
      params=params,
      opt_state=opt_state,
      teacher_params=state_lib.update_teacher(state.teacher_params, params, momentum),
      center=losses.update_center(state.center, aux["teacher_mean"], center_momentum),
      batch_stats=aux["batch_stats"],
      teacher_batch_stats=aux["teacher_batch_stats"],
  )
  return new_state, metrics


def make_step(config, steps_per_epoch: int, total_steps: int, *, with_augment: bool = True
              ) -> tuple[Callable[[jax.Array], state_lib.TrainState], Callable]:
  """(init, step) of a training config: init(rng) -> a fresh TrainState; step(state, batch, rng)
  -> (state, metrics), train_step with this config's models, optimizer, schedules and on-device
  augmentation (without it with_augment=False). Jit both with the mesh's shardings."""
  student, teacher = build_models(config)
  schedules = schedules_lib.dino_schedules(config, steps_per_epoch, total_steps)
  tx = optim.make_optimizer(config, schedules, steps_per_epoch)
  step = functools.partial(
      train_step, student=student, teacher=teacher, tx=tx, schedules=schedules,
      student_temp=config.student_temp, center_momentum=config.center_momentum,
      grad_accum_steps=config.grad_accum_steps,
      augment=augment_lib.device_augment(config) if with_augment else None)
  return state_lib.init_fn(config, tx), step


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------
class _Preemption:
  """SIGTERM (a preempted VM) asks the loop to checkpoint and exit; multi-host runs ask orbax."""

  def __init__(self):
    self.requested = False
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint and exiting")
    self.requested = True

  def __call__(self, mngr, step: int) -> bool:
    if jax.process_count() > 1:
      return mngr.reached_preemption(step)
    return self.requested


def _format_duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else (
      f"{seconds // 60}m{seconds % 60:02d}s")


def train_and_evaluate(config, workdir: str) -> state_lib.TrainState:
  """Trains DINO as configured, checkpointing into workdir; resumes from workdir's checkpoints."""
  # -- Checks, before anything compiles. -------------------------------------------------------
  config_lib.validate(config, jax.device_count())
  pipeline.resolve(config)  # what the data cannot give is turned off, with a logged line each
  pipeline.validate(config)
  paths.check(workdir)  # on every process: a missing client stops them all
  cli.quiet_library_logs()
  is_main = jax.process_index() == 0
  if is_main:
    checkpoint.save_config(workdir, config)

  # -- Mesh. -------------------------------------------------------------------------------------
  mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
  batch_sh, repl = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
  logging.info("mesh %s over %d devices, %d processes", dict(mesh.shape), jax.device_count(),
               jax.process_count())

  num_images = pipeline.num_examples(config, config.data.train_split)
  steps_per_epoch, total_steps = config_lib.steps(config, num_images)

  # -- Model, optimizer, state shapes and shardings. -------------------------------------------
  init, update = make_step(config, steps_per_epoch, total_steps)
  init_rng, step_rng = state_lib.seed_rngs(config.seed)
  step_rng = jax.device_put(step_rng, repl)
  abstract = jax.eval_shape(init, init_rng)
  state_sh = sharding_lib.state_shardings(mesh, abstract)
  n_params = sum(x.size for x in jax.tree.leaves(abstract.params["backbone"]))
  n_head = sum(x.size for x in jax.tree.leaves(abstract.params["head"]))
  logging.info("student: backbone %.2fM params, head %.2fM; %d steps (%d per epoch, %d images)",
               n_params / 1e6, n_head / 1e6, total_steps, steps_per_epoch, num_images)
  logging.info(diagnostics.explain(config.out_dim))

  # -- Restore, or initialise directly sharded. --------------------------------------------------
  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, state_sh)
  run_topology = checkpoint.topology(mesh)
  restored = checkpoint.restore(mngr, target)
  random_init = None  # the backbone at init, for the closing report's comparison
  if restored is not None:
    start_step, state = restored
    logging.info("resumed from %s/checkpoints/%d", workdir, start_step)
    saved = checkpoint.saved_topology(mngr, start_step)
    if saved != run_topology:
      logging.info("the checkpoint was written by %s, this run is %s: the state is laid out on "
                   "this mesh, the data continue at step %d as before", saved or "an older run",
                   run_topology, start_step)
  else:
    start_step = 0
    state = jax.jit(init, out_shardings=state_sh)(init_rng)
    if config.eval.after_training and config.eval.knn and config.eval.compare_random_init:
      replicate = jax.jit(lambda p: p, out_shardings=repl)  # readable on every process
      random_init = jax.device_get(replicate(
          features.evaluation_params(state.params, state.batch_stats)))
    if config.init_from:
      state = checkpoint.init_from(state, config.init_from, state_sh)
  writer = metrics_lib.Writer(workdir, start_step)

  # -- Input: from the step on (data/pipeline.py). -------------------------------------------------
  data_iter = iter(pipeline.train_dataset(config, process_index=jax.process_index(),
                                          process_count=jax.process_count(),
                                          start_step=start_step))

  # -- The jitted step. --------------------------------------------------------------------------
  step_fn = jax.jit(
      update, in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl),
      donate_argnums=0)

  # -- Loop. -------------------------------------------------------------------------------------
  preempted = _Preemption()
  pending = []  # per-step losses since the last check: no NaN may reach a checkpoint
  collapse_streak = 0
  t0, t0_step, t_start = None, start_step, time.time()
  step, metrics = start_step, None
  # On CPU one step at a time: the next batch is made while a step runs, then the loop waits for
  # that step before dispatching the next. XLA:CPU mallocs each step's temporaries, and a step
  # queued behind another starts before the other's are freed, so the heap (never trimmed:
  # dino_jax/__init__.py) would grow by a set of temporaries at a time, for no gain in speed
  # (docs/notes/training.md, "One step at a time on CPU").
  # Accelerators keep asynchronous dispatch: their allocators order a free before the next use.
  one_at_a_time = jax.default_backend() == "cpu"
  try:
    with jax.transfer_guard("disallow"):
      while step < total_steps:
        with jax.transfer_guard_host_to_device("allow"):  # the one intended transfer
          batch = pipeline.global_batch(next(data_iter), batch_sh)
        if one_at_a_time and step > start_step:
          jax.block_until_ready(metrics)  # the previous step's
        state, metrics = step_fn(state, batch, step_rng)
        step += 1
        pending.append(metrics["loss"])
        if t0 is None:  # the first step compiles: throughput is timed from its end
          jax.block_until_ready(metrics)
          t0, t0_step = time.time(), step
          logging.info("first step (compilation included) took %.1f s", t0 - t_start)
        log_now = step % config.log_every_steps == 0 or step == total_steps
        save_now = step % config.checkpoint_every_steps == 0 or step == total_steps
        stop = preempted(mngr, step)
        if log_now or save_now or stop:
          checkpoint.check_saved(mngr)  # a background save that failed stops the run here
          losses_seen = jax.device_get(pending)
          pending = []
          bad = [i for i, v in enumerate(losses_seen) if not math.isfinite(float(v))]
          if bad:
            first = step - len(losses_seen) + bad[0] + 1
            raise FloatingPointError(
                f"non-finite loss at step {first}; training stopped, nothing saved after it. The "
                f"last good checkpoint is {workdir}/checkpoints/{mngr.latest_step()}.")
        if log_now and is_main:
          m = {k: float(v) for k, v in jax.device_get(metrics).items()}
          elapsed = time.time() - t0
          ips = (step - t0_step) * config.batch_size / elapsed if elapsed > 0 else float("nan")
          eta = (total_steps - step) * elapsed / max(step - t0_step, 1)
          row = {"step": step, "epoch": step / steps_per_epoch, **m, "images_per_sec": ips}
          writer.append(metrics_lib.TRAIN_LOG, row)
          writer.scalars("train", {k: v for k, v in row.items() if k != "step"}, step)
          logging.info(
              "step %d/%d (epoch %.1f) loss %.4f | teacher entropy %.3f, batch-mean %.3f, kl %.3f "
              "| lr %.2e wd %.3f m %.4f tt %.3f | %.0f img/s ETA %s", step, total_steps,
              row["epoch"], m["loss"], m["entropy"], m["batch_entropy"], m["kl"], m["lr"], m["wd"],
              m["momentum"], m["teacher_temp"], ips, _format_duration(eta))
          warning = (diagnostics.collapse_warning(m, config.out_dim)
                     if step >= steps_per_epoch else None)
          collapse_streak = collapse_streak + 1 if warning else 0
          if collapse_streak >= diagnostics.STREAK:
            logging.warning("COLLAPSE: %s", warning)
        if config.eval.every_steps and step % config.eval.every_steps == 0:
          t_eval = time.time()
          with jax.transfer_guard("allow"):  # the evaluation feeds its own batches
            report.during_training(config, features.evaluation_params(
                state.teacher_params, state.teacher_batch_stats), step, mesh, writer)
          t0 += time.time() - t_eval  # images/s and ETA count training only
        if save_now or stop:
          checkpoint.save(mngr, step, state, run_topology)
        if stop:
          logging.warning("preempted at step %d: checkpoint saved, exiting", step)
          break
  finally:
    mngr.wait_until_finished()
    mngr.close()
    data_iter.close()  # stops grain's worker processes and frees their shared memory
    writer.close()
  if step == total_steps and config.eval.after_training:
    report.run(config, workdir, random_init=random_init)
  return state


# ----------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------
def _define_flags():
  config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]); "
                                  "override keys with --config.KEY=VALUE.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, metrics and evaluations go here; rerunning "
                      "the same command resumes from its latest checkpoint.")
  flags.DEFINE_bool("print_config", False, "Print every config key with its value (after the "
                    "--config.KEY overrides) and what it does, then exit.")
  cli.define_distributed_flags()
  flags.mark_flags_as_required(["config"])
  flags.register_validator("workdir", lambda w: w or flags.FLAGS.print_config,
                           "--workdir is required (but with --print_config)")


def main(argv) -> None:
  del argv
  host_memory.keep_freed_memory()  # before jax starts its threads
  f = flags.FLAGS
  if f.print_config:
    print(config_lib.describe(f.config))
    return
  cli.initialize_distributed()
  try:  # bad config values and data paths: one clear line, before anything compiles
    config_lib.validate(f.config, jax.device_count())
    pipeline.resolve(f.config)
    pipeline.validate(f.config)
    paths.check(f.workdir)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  try:
    train_and_evaluate(f.config, f.workdir)
  except checkpoint.UnreadableCheckpoint as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
