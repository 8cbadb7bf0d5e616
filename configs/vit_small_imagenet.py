"""ViT-S/16 DINO on ImageNet-1k with the release's default arguments: 100 epochs, global batch
1024 (the paper's 16 GPUs x 64), K 65536, teacher temperature 0.04. The paper's headline for
ViT-S/16 (74.5 k-NN, 77.0 linear) comes from longer training: see vit_small_imagenet_300ep.py.
Not run to completion here.

  python -m dino_jax.train --config configs/vit_small_imagenet.py --workdir gs://BUCKET/vits16 \
      --config.data.path=/data/imagenet      # train/<class>/*.JPEG and val/<class>/*.JPEG
  python -m dino_jax.train --config configs/vit_small_imagenet.py:tfds --workdir ...
"""
from dino_jax import config as config_lib


def get_config(arg: str | None = None):
  return config_lib.imagenet(arg)  # base_config() is this recipe
