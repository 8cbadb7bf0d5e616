"""ViT-B/16 DINO on ImageNet-1k (paper Table 2: 76.1 k-NN, 78.2 linear, with its longer schedule).

The release's default recipe with the ViT-B/16 backbone; set the paper's longer schedule with
--config.epochs, --config.teacher_temp, --config.warmup_teacher_temp_epochs. With little device
memory, shard params with --config.mesh.fsdp=N or accumulate with --config.grad_accum_steps=N.
Not run to completion here.

  python -m dino_jax.train --config configs/vit_base_imagenet.py --workdir gs://BUCKET/vitb16 \
      --config.data.path=/data/imagenet
"""
from dino_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.imagenet(arg)
  c.model.arch = "vit_base"
  # The release's ViT-B probe: the last block's [CLS] with its average-pooled patch tokens.
  c.eval.linear_n_last_blocks = 1
  c.eval.linear_avgpool_patchtokens = True
  return c
