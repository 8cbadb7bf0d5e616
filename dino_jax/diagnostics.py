"""The collapse diagnostics in the trainer's log lines: what each means, when the trainer warns,
and what to change then.

They come from the step's own tensors (train.train_step, losses.entropy), K = out_dim, in nats:
- `entropy`: the mean entropy of the teacher's centred, sharpened distribution over K, per image.
  Near ln K: every image gets the uniform distribution (uniform collapse).
- `batch_entropy`: the entropy of the batch-mean teacher distribution. Near 0: every image gets
  the same prototype (one-hot collapse).
- `kl`: loss - entropy = KL(teacher || student), mean over the loss's crop pairs. It falls as the
  student learns to predict the teacher; it is 0 under either collapse (nothing left to learn).
A healthy run keeps `entropy` well below ln K and `batch_entropy` well above 0 (the paper's
study of collapse: centring alone drives the teacher to uniform, sharpening alone to one-hot).
"""
from __future__ import annotations

import math

# Thresholds, as fractions of ln K, and how many log steps in a row must cross one to warn.
UNIFORM = 0.95
ONE_HOT = 0.05
STREAK = 3


def explain(out_dim: int) -> str:
  """One line for the start of training: what the diagnostics are and when they fire."""
  ln_k = math.log(out_dim)
  return (f"collapse diagnostics in each log line: teacher entropy (uniform collapse above "
          f"{UNIFORM * ln_k:.2f}, {UNIFORM:.0%} of ln K = {ln_k:.2f}), batch-mean entropy (one-hot "
          f"collapse below {ONE_HOT * ln_k:.2f}), kl (0 under either); after the first epoch, "
          f"{STREAK} log steps in a row past a threshold log a collapse warning saying what to "
          "change")


def collapse_warning(metrics: dict[str, float], out_dim: int) -> str | None:
  """What is wrong and what usually helps, if a logged step's metrics show a collapse, else None.

  metrics: at least 'entropy' and 'batch_entropy' (nats), as train_step returns them.
  """
  ln_k = math.log(out_dim)
  if metrics["entropy"] > UNIFORM * ln_k:
    return (f"teacher entropy {metrics['entropy']:.2f} is within {1 - UNIFORM:.0%} of ln K = "
            f"{ln_k:.2f}: uniform collapse (the teacher is too flat). Usually helps: a lower "
            "teacher_temp / warmup_teacher_temp, a longer freeze_last_layer, a smaller out_dim, "
            "a higher momentum_teacher, BN in the head (model.use_bn_in_head)")
  if metrics["batch_entropy"] < ONE_HOT * ln_k:
    return (f"entropy of the batch-mean teacher distribution {metrics['batch_entropy']:.2f} is "
            "near 0: one-hot collapse (every image gets the same prototype). Usually helps: a "
            "lower center_momentum (the centre follows new batches faster), a higher teacher_temp "
            "(above 0.07 the release found unstable), a lower lr or longer warmup_epochs, a "
            "larger out_dim")
  return None
