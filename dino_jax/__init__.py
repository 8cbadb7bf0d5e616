"""dino_jax: DINO (self-distillation with no labels) in JAX / Flax."""
__version__ = "0.1.0"
