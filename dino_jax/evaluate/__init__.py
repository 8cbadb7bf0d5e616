"""Evaluations of frozen backbones: features.py (sharded extraction), knn.py (weighted k-NN),
linear.py (linear probe), report.py (the main job's closing report); attention maps live in
dino_jax/attention.py."""
