"""ViT-S/16 with the paper's stronger settings: 300 epochs, teacher temperature warmed
0.04 -> 0.07 over 30 epochs, last layer not weight-normalised, 10 local crops. Not run to
completion here.

  python -m dino_jax.train --config configs/vit_small_imagenet_300ep.py --workdir gs://BUCKET/x \
      --config.data.path=/data/imagenet
"""
from dino_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.imagenet(arg)
  c.epochs = 300
  c.teacher_temp = 0.07
  c.warmup_teacher_temp = 0.04
  c.warmup_teacher_temp_epochs = 30
  c.model.norm_last_layer = False
  c.local_crops_number = 10
  return c
