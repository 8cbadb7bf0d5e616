"""dino_jax: DINO (self-distillation with no labels) in JAX / Flax."""
import importlib.metadata

try:
  __version__ = importlib.metadata.version("dino_jax")
except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing
  __version__ = "0+unknown"
