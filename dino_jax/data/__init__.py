"""Input side: data sources (sources.py), multi-crop augmentation (augment.py), grain pipelines
(pipeline.py)."""
