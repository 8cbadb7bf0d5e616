"""bf16 compute against fp32: the same run's training curves, side by side.

  python studies/precision_curve.py --root /tmp/precision [--steps 200] [--config.KEY=VALUE ...]

Runs `python -m dino_jax.train --config configs/default.py` for --steps steps twice, with
model.dtype float32 and bfloat16 (params, optimizer state, head and loss stay float32 in both),
logging every 10 steps with the closing evaluation off, and compares their metrics.jsonl: loss,
teacher entropy and KL at every logged step. Noise scale: the same fp32 run with another seed.
Prints a table, saves ROOT/precision_curve.png, and as its last line one JSON object.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("loss", "entropy", "kl")


def run(workdir: str, steps: int, overrides: list[str]) -> list[dict]:
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    cmd = [sys.executable, "-m", "dino_jax.train", "--config",
           os.path.join(REPO, "configs/default.py"), "--workdir", workdir,
           f"--config.total_steps={steps}", "--config.log_every_steps=10",
           f"--config.checkpoint_every_steps={steps}", "--config.eval.after_training=False",
           *overrides]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="workdirs/precision")
  parser.add_argument("--steps", type=int, default=200)
  args, overrides = parser.parse_known_args()
  runs = {
      "float32": run(os.path.join(args.root, "float32"), args.steps, overrides),
      "bfloat16": run(os.path.join(args.root, "bfloat16"), args.steps,
                      overrides + ["--config.model.dtype=bfloat16"]),
      "float32, seed 1": run(os.path.join(args.root, "float32_seed1"), args.steps,
                             overrides + ["--config.seed=1"]),
  }
  steps = [r["step"] for r in runs["float32"]]
  table = {name: {k: np.array([r[k] for r in rows]) for k in KEYS + ("images_per_sec",)}
           for name, rows in runs.items()}
  print(f"{'step':>5s}" + "".join(f"{f'{k} {n}':>26s}" for k in KEYS for n in ("fp32", "bf16")))
  for i, s in enumerate(steps):
    print(f"{s:5d}" + "".join(f"{table[n][k][i]:26.4f}" for k in KEYS
                              for n in ("float32", "bfloat16")))
  summary = {}
  for k in KEYS:
    bf16 = float(np.mean(np.abs(table["bfloat16"][k] - table["float32"][k])))
    seed = float(np.mean(np.abs(table["float32, seed 1"][k] - table["float32"][k])))
    summary[k] = {"mean_abs_diff_bf16": bf16, "mean_abs_diff_other_seed": seed}
    print(f"{k}: mean |bf16 - fp32| {bf16:.4f}; mean |seed 1 - seed 0| (fp32) {seed:.4f}")
  speed = {n: float(table[n]["images_per_sec"][-1]) for n in table}
  print("images/s:", ", ".join(f"{n} {v:.0f}" for n, v in speed.items()))

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(KEYS), figsize=(4 * len(KEYS), 3.2))
  for ax, k in zip(axes, KEYS):
    for name, style in (("float32", "-"), ("bfloat16", "--"), ("float32, seed 1", ":")):
      ax.plot(steps, table[name][k], style, label=name)
    ax.set_title(k)
    ax.set_xlabel("step")
  axes[0].legend()
  fig.tight_layout()
  path = os.path.join(args.root, "precision_curve.png")
  fig.savefig(path, dpi=100)
  print("saved", path)
  print(json.dumps({"steps": steps, "summary": summary, "images_per_sec": speed}))


if __name__ == "__main__":
  main()
