"""The main job for several seeds: wall time, k-NN and attention figures, mean and spread.

  python studies/emergence.py --seeds 0 1 2 --root workdirs/emergence [--config.KEY=VALUE ...]

Each seed runs `python -m dino_jax.train --config configs/default.py --workdir ROOT/seedS
--config.seed=S` exactly as README block 1 does (plus any --config overrides given here) and reads
its eval/knn.json and eval/attention.json. Prints a table and, last, one JSON line.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COLUMNS = [  # (name, file, path into the JSON)
    ("knn20", "knn.json", ("top1", "20")),
    ("knn20_random", "knn.json", ("random_init", "top1", "20")),
    ("jaccard_best", "attention.json", ("jaccard",)),
    ("jaccard_head_mean", "attention.json", ("jaccard_head_mean",)),
    ("jaccard_best_random", "attention.json", ("random_init", "jaccard")),
    ("jaccard_head_mean_random", "attention.json", ("random_init", "jaccard_head_mean")),
    ("mass_on_object", "attention.json", ("mass_on_object",)),
]


def read(workdir: str) -> dict:
  row = {}
  for name, fname, path in COLUMNS:
    try:
      with open(os.path.join(workdir, "eval", fname)) as f:
        value = json.load(f)
      for key in path:
        value = value[key]
      row[name] = float(value)
    except (OSError, KeyError, TypeError):
      row[name] = float("nan")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last = json.loads(f.readlines()[-1])
  row["final_entropy"] = last["entropy"]
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--root", default="workdirs/emergence")
  parser.add_argument("--config", default=os.path.join(REPO, "configs/default.py"))
  parser.add_argument("--reuse", action="store_true", help="Read finished workdirs, do not rerun.")
  args, overrides = parser.parse_known_args()
  rows = []
  for seed in args.seeds:
    workdir = os.path.join(args.root, f"seed{seed}")
    if not args.reuse:
      cmd = [sys.executable, "-m", "dino_jax.train", "--config", args.config, "--workdir",
             workdir, f"--config.seed={seed}", *overrides]
      print("$", " ".join(cmd), flush=True)
      t = time.time()
      subprocess.run(cmd, check=True, cwd=REPO)
      wall = time.time() - t
      with open(os.path.join(workdir, "wall_seconds.txt"), "w") as f:
        f.write(f"{wall:.1f}\n")
    with open(os.path.join(workdir, "wall_seconds.txt")) as f:
      wall = float(f.read())
    rows.append({"seed": seed, "wall_s": wall, **read(workdir)})
  keys = list(rows[0])
  print(" | ".join(f"{k:>12}" for k in keys))
  for r in rows:
    print(" | ".join(f"{r[k]:12.3f}" if isinstance(r[k], float) else f"{r[k]:>12}" for k in keys))
  summary = {k: {"mean": float(np.mean([r[k] for r in rows])),
                 "min": float(np.min([r[k] for r in rows])),
                 "max": float(np.max([r[k] for r in rows]))} for k in keys if k != "seed"}
  for k, v in summary.items():
    print(f"{k:>26}: mean {v['mean']:.3f}  min {v['min']:.3f}  max {v['max']:.3f}")
  print(json.dumps({"overrides": overrides, "rows": rows, "summary": summary}))


if __name__ == "__main__":
  main()
