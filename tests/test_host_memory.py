"""dino_jax's import-time malloc setting (dino_jax._keep_freed_memory): XLA:CPU's per-execution
temporaries are reused between steps instead of being unmapped and page-faulted in again."""
import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, resource, sys, time
import dino_jax
import jax, jax.numpy as jnp

class MallInfo2(ctypes.Structure):  # glibc >= 2.33; every field a size_t, in bytes
  _fields_ = [(name, ctypes.c_size_t) for name in (
      "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
      "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def malloced():  # bytes in use: in the heap and in mmapped blocks
  info = libc.mallinfo2()
  return info.uordblks + info.hblkhd

def loss(w, x):  # an MLP layer's gradient on (65536, 64) tokens: ~340 MB of temporaries
  return jnp.sum(jnp.tanh(jax.nn.gelu(x @ w[0], approximate=False) @ w[1]))

if sys.argv[1] == "big":  # one (65536, 8704) float32 array, 2.28 GB, malloc'd and freed each call
  f = jax.jit(lambda w, x: (jnp.tanh(x @ w[0]),))
  x, w, warm_up, calls = jnp.ones((65536, 8)), (jnp.full((8, 8704), 0.01),), 2, 3
else:
  f = jax.jit(jax.grad(loss))
  x, w, warm_up, calls = jnp.ones((65536, 64)), (jnp.full((64, 256), 0.01),
                                                 jnp.full((256, 64), 0.01)), 6, 8
for _ in range(warm_up):
  f(w, x)[0].block_until_ready()
time.sleep(0.5)
settled = malloced()
faults = []
for _ in range(calls):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(w, x)[0].block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  # jax frees an output on a worker thread after its last reference goes, ~1 ms later here and
  # longer under load; the next call could malloc before that free and grow the heap instead.
  deadline = time.monotonic() + 60
  while malloced() > settled + 2**24:
    assert time.monotonic() < deadline, ("not freed", malloced(), settled)
    time.sleep(0.001)
print(dino_jax.MALLOC_TUNED, min(faults))
"""


def _faults_per_call(malloc: str | None, size: str = "mlp") -> tuple[bool, float]:
  """(MALLOC_TUNED, the fewest page faults of the calls after warm-up). The minimum, not the mean:
  the kernel may reclaim idle pages of a loaded machine (this VM runs DAMON's kdamond) and any
  call can then fault some back in; the glibc default faults the temporaries in on every call."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "DINO_JAX_MALLOC")}
  if malloc:
    env["DINO_JAX_MALLOC"] = malloc
  out = subprocess.run([sys.executable, "-c", PROBE, size], env=env, capture_output=True,
                       text=True, check=True, timeout=300).stdout.split()
  return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_large_temporaries_are_not_faulted_in_again_each_call():
  pages = 65536 * 256 * 4 // 4096  # one (65536, 256) float32 temporary, in 4 KiB pages
  # The control: glibc's default maps and unmaps the temporaries, faulting them in each call.
  tuned, default_faults = _faults_per_call("default")
  assert not tuned
  assert default_faults > 0.5 * pages, default_faults
  # Kept in the heap: the calls reuse it; some call of the eight faults (almost) nothing.
  tuned, faults = _faults_per_call(None)
  assert tuned
  assert faults < 0.3 * default_faults, (faults, default_faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_blocks_above_2_gib_are_kept_too():
  # A (65536, 8704) float32 array is 2.28 GB: above 2 GiB, the largest trim threshold mallopt
  # takes, so only never trimming keeps it (ViT-Tiny/16 at batch 16 has 3.9 GB of temporaries).
  pages = 65536 * 8704 * 4 // 4096
  tuned, default_faults = _faults_per_call("default", "big")
  assert not tuned and default_faults > 0.5 * pages, default_faults
  tuned, faults = _faults_per_call(None, "big")
  assert tuned and faults < 0.3 * default_faults, (faults, default_faults)
