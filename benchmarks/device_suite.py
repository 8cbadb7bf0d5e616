"""The GPU measurements in one call: dino_jax's step against torch_step.py, MFU, memory, the
attention forms. Each measurement runs in its own process, most important first, under one
time budget. Partial results survive a timeout, a crash or an out-of-memory run.

On a lent GPU machine (the `device` tool, from the repository root). That image has jax, flax,
optax, orbax, chex, torch and timm. It lacks grain, ml_collections and tensorboardX, so carry wheels
(`.whl`, in .gitignore; the download command is in benchmarks/RESULTS.md, "GPU suite"):

  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
  PYTHONUNBUFFERED=1 python3 benchmarks/device_suite.py --out $OUT --budget_s 420

Here, on the CPU, every run at the main job's size (a check of the script, not a measurement):

  python benchmarks/device_suite.py --smoke --out /tmp/suite

Prints each run's start and end (and the last lines of a run that fails). Writes to --out:
suite.log (every run's output), results.jsonl (one object per run: its name,
command, seconds, return code and the last JSON line it printed) and table.md (the comparison,
also printed). Three files, so they fit what the device tool returns.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense bf16 / fp16 tensor-core TFLOP/s by device name (NVIDIA's data sheets, SXM parts).
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}

# The GPU configurations compared: ViT-S/16 and ViT-B/16, 2 x 224 + 10 x 96 crops, K 65536.
VIT_S = ["--config", "configs/vit_small_imagenet.py", "--config.batch_size=256",
         "--config.local_crops_number=10", "--config.model.dtype=bfloat16"]
VIT_B = ["--config", "configs/vit_base_imagenet.py", "--config.batch_size=128",
         "--config.local_crops_number=10", "--config.model.dtype=bfloat16"]
# --smoke: the main job's config (every code path on the CPU, in seconds).
SMOKE = ["--config", "configs/default.py", "--config.batch_size=16"]
JPEGS = "/tmp/dino_jax_bench_jpegs"  # written by the input-pipeline run, read by the trainer run


def print_env() -> None:
  """One JSON line: the devices and the versions of what the runs use (in its own process: jax
  takes the GPU's memory when it starts)."""
  import importlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  out = {"devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "grain", "torch",
               "timm", "numpy"):
    try:
      out[name] = importlib.import_module(name).__version__
    except Exception as e:  # pylint: disable=broad-except
      out[name] = f"missing: {e}"
  try:  # clocks and power limit: what the MFU is measured against
    out["nvidia-smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,power.limit",
         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
  except (OSError, subprocess.SubprocessError) as e:
    out["nvidia-smi"] = f"missing: {e}"
  print(json.dumps(out))


def runs(smoke: bool, peak: float) -> list[tuple[str, list[str], int]]:
  """(name, command, timeout s) of the measurements, in the order they run: the step against
  PyTorch's first. peak: the device's TFLOP/s, for MFU (0: none)."""
  s, b = (SMOKE, SMOKE) if smoke else (VIT_S, VIT_B)
  steps = ["--steps", "2" if smoke else "20"]
  fast = "xla" if smoke else "cudnn"  # cudnn flash attention: GPU only
  jax_step = [sys.executable, "benchmarks/train_step.py", "--noaugment", "--peak_tflops",
              str(peak)] + steps
  torch_step = [sys.executable, "benchmarks/torch_step.py", "--peak_tflops", str(peak)] + steps
  attention = [sys.executable, "benchmarks/attention.py", "--repeats", "5" if smoke else "20",
               "--batch", "32" if smoke else "512"]
  pipeline = [sys.executable, "benchmarks/input_pipeline.py", "--dir", JPEGS, "--batches", "5",
              "--rounds", "1"] + (
      ["--workers", "2", "--batch_size", "32", "--images", "400"] if smoke else
      ["--workers", "16", "--batch_size", "256", "--images", "2600"])  # >= 8 batches of JPEGs
  # The trainer end to end, fed by the grain pipeline from the input-pipeline run's JPEGs: the
  # images/s of its last log line (timed from the end of the first step) against the step alone.
  small = ["--config.data.workers=2", "--config.aug.crops_on_device=False"] if smoke else []
  end_to_end = ["bash", "-c", "rm -rf /tmp/device_suite_e2e && " + " ".join(
      [sys.executable, "-m", "dino_jax.train", "--workdir", "/tmp/device_suite_e2e"] + s +
      [f"--config.model.attention={fast}", "--config.data.source=folder",
       f"--config.data.path={JPEGS}", "--config.eval.after_training=False",
       f"--config.total_steps={20 if smoke else 60}", "--config.log_every_steps=10",
       "--config.checkpoint_every_steps=1000"] + small)
      + " && tail -n 1 /tmp/device_suite_e2e/metrics.jsonl"]
  return [
      ("jax vit_s", jax_step + s + [f"--config.model.attention={fast}"], 240),
      ("torch vit_s", torch_step + s, 180),
      ("jax vit_b", jax_step + b + [f"--config.model.attention={fast}"], 240),
      ("torch vit_b", torch_step + b, 180),
      ("attention vit_s", attention, 120),
      ("input pipeline", pipeline, 240),
      ("trainer vit_s", end_to_end, 240),
      ("jax vit_s matmul", jax_step + s + ["--config.model.attention=matmul"], 240),
      ("torch vit_s compiled", torch_step + s + ["--compile"], 300),
  ]


def run_one(name: str, cmd: list[str], timeout: float, log) -> dict:
  """Runs cmd from the repository root, its output streamed to log (and its last lines printed if
  it fails); returns the run's record with the last line of its output that parses as a JSON
  object (None if none did)."""
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  header = f"==== {name}: {' '.join(cmd[1:])} (timeout {timeout:.0f} s)"
  print(header, flush=True)
  log.write(header + "\n")
  t = time.time()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  killed = threading.Event()

  def kill() -> None:  # at the timeout, also when the run hangs without printing
    killed.set()
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass

  timer = threading.Timer(timeout, kill)
  timer.start()
  last_json, tail = None, collections.deque(maxlen=25)
  for line in proc.stdout:
    log.write(line)
    log.flush()
    tail.append(line)
    if line.startswith("{"):
      try:
        last_json = json.loads(line)
      except json.JSONDecodeError:
        pass
  proc.wait()
  timer.cancel()
  timed_out = killed.is_set()
  record = {"name": name, "cmd": cmd[1:], "seconds": round(time.time() - t, 1),
            "returncode": proc.returncode, "timed_out": timed_out, "result": last_json}
  if proc.returncode or not last_json:  # the end of a failed run's output: the cause
    sys.stdout.writelines(tail)
  print(f"==== {name}: {'timed out' if timed_out else f'exit {proc.returncode}'} after "
        f"{record['seconds']} s", flush=True)
  return record


def fmt(value, spec: str = ".1f") -> str:
  return "-" if value is None else format(value, spec)


def table(records: list[dict]) -> str:
  """Markdown: one row per step run, then JAX over PyTorch per model, then the attention forms."""
  res = {r["name"]: r["result"] for r in records if r["result"]}
  lines = ["| run | step ms | images/s | TFLOP/s | MFU | peak GiB | GiB / image | compile s |",
           "|---|---|---|---|---|---|---|---|"]
  for name, r in res.items():
    if "step_ms" not in r:
      continue
    mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f} %"
    lines.append(f"| {name} | {fmt(r['step_ms'])} | {fmt(r['images_per_sec'])} | "
                 f"{fmt(r.get('tflops_per_sec'))} | {mfu} | {fmt(r['peak_memory_gb'], '.2f')}"
                 f" | {fmt(r['peak_memory_gb'] / r['batch_size'], '.3f')} | "
                 f"{fmt(r.get('compile_s'))} |")
  lines += ["", "| model | JAX / PyTorch images/s | JAX / PyTorch memory per image |",
            "|---|---|---|"]
  for model in ("vit_s", "vit_b"):
    j, t = res.get(f"jax {model}"), res.get(f"torch {model}")
    if j and t:
      lines.append(f"| {model} | {j['images_per_sec'] / t['images_per_sec']:.2f}x | "
                   f"{j['peak_memory_gb'] / t['peak_memory_gb']:.2f}x |")
  attention = res.get("attention vit_s")
  if attention:
    lengths = sorted({t for row in attention["results"].values() for t in row}, key=int)
    lines += ["", f"Attention layer forward + backward, ms ({attention['dtype']}, batch "
              f"{attention['batch']}):", "", "| impl | " + " | ".join(f"T={t}" for t in lengths)
              + " |", "|---" * (len(lengths) + 1) + "|"]
    for impl, row in attention["results"].items():
      lines.append(f"| {impl} | " + " | ".join(fmt(row.get(t), ".2f") for t in lengths) + " |")
  trainer, step = res.get("trainer vit_s"), res.get("jax vit_s")
  if trainer:
    lines += ["", f"Trainer end to end (grain pipeline from JPEGs, step {trainer['step']}): "
              f"{trainer['images_per_sec']:.1f} images/s"
              + (f", the step alone {step['images_per_sec']:.1f}" if step else "")]
  pipeline = res.get("input pipeline")
  if pipeline:  # images/s of the host side, to set against the steps' images/s above
    lines += ["", "Input pipeline, images/s: " + ", ".join(
        f"{k.replace('_images_per_sec', '')} {v:.0f}" for k, v in pipeline.items()
        if k.endswith("images_per_sec") or "images_per_sec_" in k)]
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.environ.get("OUT", "device_suite"), help="output folder")
  parser.add_argument("--budget_s", type=float, default=420.0,
                      help="runs stop starting once this much time is spent; each run's timeout "
                           "is cut to what is left")
  parser.add_argument("--smoke", action="store_true", help="CPU check of the script: tiny sizes")
  parser.add_argument("--only", nargs="*", default=None, help="run only these names")
  parser.add_argument("--env", action="store_true", help="print the devices and versions, exit")
  args = parser.parse_args()
  if args.env:
    print_env()
    return
  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  records: list[dict] = []
  with open(os.path.join(args.out, "suite.log"), "w") as log, \
       open(os.path.join(args.out, "results.jsonl"), "w") as jsonl:
    def record(name: str, cmd: list[str], timeout: float) -> dict | None:
      left = args.budget_s - (time.time() - t0)
      if left < 30:
        print(f"==== {name}: skipped, {left:.0f} s of the budget left", flush=True)
        return None
      records.append(run_one(name, cmd, min(timeout, left), log))
      jsonl.write(json.dumps(records[-1]) + "\n")
      jsonl.flush()
      return records[-1]["result"]

    env = record("env", [sys.executable, os.path.abspath(__file__), "--env"], 90) or {}
    kind = env.get("device_kind", "unknown")
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in kind), 0.0)
    print(f"==== {kind}: peak {peak} TFLOP/s for MFU", flush=True)
    for name, cmd, timeout in runs(args.smoke, peak):
      if args.only is None or name in args.only:
        record(name, cmd, timeout)
  text = table(records)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
