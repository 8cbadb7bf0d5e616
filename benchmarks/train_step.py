"""Speed of the jitted DINO step (multi-crop, K, batch from the config), on random uint8 crops.

  python benchmarks/train_step.py --config configs/vit_small_imagenet.py \
      --config.batch_size=16 --config.model.arch=vit_tiny --config.model.dtype=float32 --steps 10

Prints a table and, as its last line, one JSON object: images_per_sec, step_ms (median after
warm-up), compile_s, flops_per_image (XLA cost analysis of the whole step, its micro-batch loop
counted grad_accum_steps times), mfu (against --peak_tflops when given), peak memory (device
memory stats on GPU/TPU; process RSS on CPU) and the compiled step's temporary buffers (XLA
memory analysis: activations kept for the backward pass and scratch).

With --compile_only, each variant is compiled and not run: one JSON line each with its
temporaries, e.g. the memory of the one-GPU folder config on a machine without one:

  python benchmarks/train_step.py --config configs/vit_small_folder.py --compile_only \
      --ab 'grad_accum_steps=2' --ab 'grad_accum_steps=1'

With --ab, each --ab override set is a variant timed against the config in the same process, the
variants' steps called in turn (a machine whose speed drifts then drifts alike for each):

  python benchmarks/train_step.py --config configs/default.py --noaugment --steps 20 \
      --ab 'model.attention=matmul' --ab 'model.num_heads=16'

prints each variant's step ms, images/s and ratio to the config, and last one JSON object
{"images_per_sec": the config's, "variants": [one object as above for each]}. An --ab item
whose key starts with xla_ is an XLA compiler option for that variant's compile, not a config
key (--ab 'xla_cpu_prefer_vector_width=512'): XLA flags compared in one process, where separate
processes would differ by the machine's drift.
"""
import collections
import copy
import glob
import gzip
import json
import os
import resource
import shlex
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dino_jax import config as config_lib
from dino_jax import host_memory
from dino_jax import sharding as sharding_lib
from dino_jax import train
from timing import time_interleaved

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Training config.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after 2 warm-up steps.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak dense TFLOP/s of the device, for MFU.")
_AUGMENT = flags.DEFINE_bool("augment", True, "Include the on-device photometric augmentation.")
_AB = flags.DEFINE_multi_string(
    "ab", [], "Another variant to time against the config, in the same process: overrides as "
    "'KEY=VALUE KEY=VALUE' (e.g. --ab 'model.attention=matmul'). Repeatable. The variants' steps "
    "are called in turn, so that this VM's drift in speed falls alike on each.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile the config (and each --ab variant) and print the temporaries "
    "XLA assigns its step, running no step: memory of configs too big to run here.")
_PROFILE = flags.DEFINE_string("profile_dir", "", "Also trace 3 steps with jax.profiler into this "
                               "folder (TensorBoard / Perfetto) and print the ops taking most time.")


def print_top_ops(trace_dir: str, steps: int, top: int = 25) -> None:
  """The XLA ops of the newest Perfetto trace under trace_dir, by total time a step."""
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                key=os.path.getmtime)[-1]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  total = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "hlo_op" in e.get("args", {}):
      total[e["name"]] += e.get("dur", 0) / 1e3 / steps
  all_ms = sum(total.values())
  print(f"XLA ops: {all_ms:.1f} ms a step in all ({path})")
  for name, ms in total.most_common(top):
    print(f"  {ms:8.2f} ms  {100 * ms / all_ms:5.1f} %  {name}")


def compile_step(config, compiler_options: dict | None = None
                 ) -> tuple[Callable[[], dict], dict]:
  """The config's jitted DINO step compiled (with these XLA options) for a fixed random uint8
  batch: a call that runs one step (the state donated and replaced in place) and returns its
  metrics, and XLA's figures for the compiled step (compile_s, flops, temp_bytes)."""
  mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
  batch_sh = sharding_lib.batch_sharding(mesh)
  init, update = train.make_step(config, 100, 10000, with_augment=_AUGMENT.value)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  state_sh = sharding_lib.state_shardings(mesh, abstract)
  state = jax.jit(init, out_shardings=state_sh)(jax.random.PRNGKey(0))
  b, g, l = config.batch_size, config.global_crops_size, config.local_crops_size
  rng = np.random.default_rng(0)
  batch = {"global": rng.integers(0, 256, (b, 2, g, g, 3), np.uint8)}
  if config.local_crops_number:
    batch["local"] = rng.integers(0, 256, (b, config.local_crops_number, l, l, 3), np.uint8)
  batch = jax.device_put(batch, batch_sh)
  step = jax.jit(
      update, in_shardings=(state_sh, batch_sh, sharding_lib.replicated(mesh)),
      out_shardings=(state_sh, sharding_lib.replicated(mesh)), donate_argnums=0)
  key = jax.random.PRNGKey(1)

  t = time.perf_counter()
  compiled = step.lower(state, batch, key).compile(compiler_options or None)
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()  # XLA's buffer assignment: the step's temporaries
  xla = {"compile_s": compile_s, "flops": float(cost.get("flops", 0.0)) if cost else 0.0,
         "temp_bytes": getattr(mem, "temp_size_in_bytes", float("nan")) if mem else float("nan")}
  holder = {"state": state}

  def run() -> dict:
    holder["state"], metrics = compiled(holder["state"], batch, key)
    return metrics

  return run, xla


def main(argv):
  del argv
  host_memory.keep_freed_memory()  # the trainer's malloc policy, before jax starts its threads
  variants, options = {"config": _CONFIG.value}, {"config": {}}
  for item in _AB.value:  # each --ab: the config with these overrides more, before any compile
    words = shlex.split(item)
    options[item] = {k: config_lib.parse_value(v) for k, _, v in
                     (w.partition("=") for w in words if w.startswith("xla_"))}
    variants[item] = config_lib.apply_overrides(
        copy.deepcopy(_CONFIG.value), [w for w in words if not w.startswith("xla_")],
        where=f"--ab {item!r}")
  for name, config in variants.items():
    config_lib.validate(config, jax.device_count())
    if options[name]:  # a misspelt XLA option fails here, before any step compiles
      try:
        jax.jit(lambda: 0).lower().compile(options[name])
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"--ab {name!r}: XLA rejects {options[name]}: {e}") from e
  runs, xla = {}, {}
  for name, config in variants.items():
    runs[name], xla[name] = compile_step(config, options[name])
    if _COMPILE_ONLY.value:
      print(json.dumps({"variant": name, "batch_size": config.batch_size,
                        "grad_accum_steps": config.grad_accum_steps, "out_dim": config.out_dim,
                        "temp_memory_gb": xla[name]["temp_bytes"] / 2**30,
                        "compile_s": xla[name]["compile_s"]}), flush=True)
      continue
    for _ in range(2):  # warm-up; one step at a time, as the trainer runs them on CPU
      jax.block_until_ready(runs[name]())
  if _COMPILE_ONLY.value:
    return
  times = time_interleaved(runs, _STEPS.value)
  first = next(iter(variants))
  if _PROFILE.value:
    with jax.profiler.trace(_PROFILE.value, create_perfetto_trace=True):
      for _ in range(3):
        jax.block_until_ready(runs[first]())
    print_top_ops(_PROFILE.value, steps=3)

  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform != "cpu" else None
  peak_bytes = (stats or {}).get("peak_bytes_in_use",
                                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
  results = []
  for name, config in variants.items():
    step_s = float(np.median(times[name]))
    # XLA's cost analysis counts a loop body once: with grad_accum_steps A the micro-batch step
    # runs A times. Scaling the whole step by A also counts the optimizer update A times, under
    # 0.1 % of a ViT-S step's flops.
    b, flops = config.batch_size, xla[name]["flops"] * config.grad_accum_steps
    results.append({
        "variant": name, "device": dev.device_kind, "devices": jax.device_count(),
        "arch": config.model.arch, "patch_size": config.model.patch_size,
        "dtype": config.model.dtype, "batch_size": b,
        "crops": f"2x{config.global_crops_size}+{config.local_crops_number}x"
                 f"{config.local_crops_size}", "out_dim": config.out_dim,
        "step_ms": 1e3 * step_s, "images_per_sec": b / step_s,
        "compile_s": xla[name]["compile_s"], "flops_per_image": flops / b,
        "tflops_per_sec": flops / step_s / 1e12,
        "mfu": (flops / step_s / 1e12 / (_PEAK.value * jax.device_count())) if _PEAK.value
               else None,
        "peak_memory_gb": peak_bytes / 2**30,  # of the process: all variants together
        "memory": "device peak" if stats else "process max RSS",
        "temp_memory_gb": xla[name]["temp_bytes"] / 2**30,
        "loss_finite": bool(jnp.isfinite(runs[name]()["loss"])),
    })
  if len(results) == 1:
    for k, v in results[0].items():
      print(f"{k:>16}: {v:.4g}" if isinstance(v, float) else f"{k:>16}: {v}")
    print(json.dumps(results[0]))
    return
  base = results[0]["step_ms"]
  print(f"{dev.device_kind}: {_STEPS.value} steps of each variant, called in turn (median)")
  print(f"{'step ms':>9} {'img/s':>8} {'vs config':>9} {'compile s':>9}  variant")
  for r in results:
    r["ratio_to_config"] = r["step_ms"] / base
    print(f"{r['step_ms']:9.1f} {r['images_per_sec']:8.1f} {r['ratio_to_config']:9.3f} "
          f"{r['compile_s']:9.1f}  {r['variant']}")
  print(json.dumps({"images_per_sec": results[0]["images_per_sec"], "variants": results}))


if __name__ == "__main__":
  app.run(main)
