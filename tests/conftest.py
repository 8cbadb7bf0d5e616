"""Test setup: 8 virtual CPU devices (set before jax is imported), so sharding runs on every test."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import sys  # noqa: E402

import pytest  # noqa: E402
import runs  # noqa: E402


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted run of runs.TINY (12 steps) on 8 devices (mesh data 8)."""
  workdir = tmp_path_factory.mktemp("reference")
  runs.train(workdir)
  return workdir


@pytest.fixture(autouse=True)
def one_torch_thread():
  """One torch thread in tests that use torch: on CI's few shared cores its intra-op threads
  mostly wait on each other (element-wise ops measured 200x slower with 2 threads)."""
  torch = sys.modules.get("torch")
  if torch is None:
    yield
    return
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)
