"""Evaluations of frozen backbones: features.py (sharded extraction), knn.py (weighted k-NN),
attention_maps.py ([CLS] attention and its masks against objects), scores.py (k-NN and attention
of several models in one pass), linear.py (linear probe), plots.py (their pictures), report.py
(what the trainer writes: the closing report, the rows during training)."""
