"""ResNet-50 DINO on ImageNet-1k with the release's convnet command (its README's ResNet-50 run):

  main_dino.py --arch resnet50 --optimizer sgd --lr 0.03 --weight_decay 1e-4
      --weight_decay_end 1e-4 --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14

i.e. SGD (momentum 0.9), base lr 0.03 for a global batch of 256 (scaled linearly, warm-up and
cosine to min_lr as every optimizer), weight decay 1e-4 constant, smaller global crops and local
crops below 0.14 of the image; every other key the release's default (100 epochs, global batch
1024, K 65536, teacher temperature 0.04, 8 local crops, clip 3.0, no BN in the head,
norm_last_layer). BatchNorm statistics over the global batch, as the release's SyncBatchNorm.
The paper does not give every value of its ResNet-50 run (67.5 k-NN, 75.3 linear); 'lars' is
the release's other convnet optimizer (--config.optimizer=lars).

  python -m dino_jax.train --config configs/resnet50_imagenet.py --workdir gs://BUCKET/rn50 \
      --config.data.path=/data/imagenet      # train/<class>/*.JPEG and val/<class>/*.JPEG
  python -m dino_jax.train --config configs/resnet50_imagenet.py:tfds --workdir ...
"""
from dino_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.imagenet(arg)
  c.model.arch = "resnet50"
  c.optimizer = "sgd"
  c.lr = 0.03
  c.weight_decay = 1e-4
  c.weight_decay_end = 1e-4
  c.global_crops_scale = (0.14, 1.0)
  c.local_crops_scale = (0.05, 0.14)
  return c
