"""The main job: DINO on the embedded `shapes` images, ~10 minutes on a 2-core CPU.

  python -m dino_jax.train --config configs/default.py --workdir workdirs/default

A tiny ViT (patch 4 on 32 px images: 8 x 8 tokens) and a small head, so that in minutes on a
laptop CPU the teacher's features group the six shape classes (k-NN) and its [CLS] attention finds
the object.
Every departure from the paper's recipe (dino_jax.config.base_config) is below, with its reason;
the measurements behind each, and the commands that give them, are in docs/notes/main_job.md
("How the main job's settings were chosen").
"""
from dino_jax import config as config_lib


def get_config(arg: str | None = None):
  del arg
  c = config_lib.base_config()
  c.seed = 0
  c.data.source = "shapes"  # embedded, generated from the seed: no download
  c.data.workers = 0  # 2 CPU cores: the step needs both; crops are cheap at 32 px
  # The host draws the crop boxes and flips, the step resamples the crops on the device: less host
  # CPU time a batch. The same crops as PIL's to within two levels of 255.
  c.aug.crops_on_device = True
  # The object always the lighter gray level: with either, the [CLS] feature encodes which, and
  # the heads attend to the darker region, object or background.
  c.data.shapes_polarity = "light"
  # One gray level for every object and one for every background: a level drawn per image is a
  # shortcut (both views share it, so the teacher learns it). The colour jitter still varies it.
  c.data.shapes_fg_range = (0.75, 0.75)
  c.data.shapes_bg_range = (0.25, 0.25)
  # Training and evaluation within 10 minutes on a 2-core CPU; more steps trade the heads'
  # attention on the object for k-NN.
  c.batch_size = 32
  c.total_steps = 1200
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500

  # 32 px images: 2 global crops of 32 px and the release's 8 local crops, of 16 px (the paper:
  # 224 and 96 px); crop scales as the release's proportions allow at this size.
  c.global_crops_size = 32
  c.local_crops_size = 16
  c.local_crops_number = 8
  c.global_crops_scale = (0.4, 1.0)
  c.local_crops_scale = (0.1, 0.4)  # 0.05 of a 32 px image is a 7 px patch: too small to see
  # The release's blur sigma (0.1-2 px) is for 224 px crops; scaled by 32 / 224 here, or the
  # first global crop, always blurred, loses its shape.
  c.aug.blur_sigma = (0.015, 0.3)

  # A ViT small enough for CPU minutes: width 64, 8 heads of width 8, patch 4. Depth 3: in the
  # same time 4 blocks lost the heads' attention on the objects.
  c.model.arch = "vit_custom"
  c.model.patch_size = 4
  c.model.embed_dim = 64
  c.model.depth = 3
  c.model.num_heads = 8
  # No drop path (the release: 0.1 for ViT-S): here it raised k-NN but took the heads off the
  # objects.
  c.model.drop_path_rate = 0.0
  c.model.head_hidden_dim = 256
  c.model.head_bottleneck_dim = 64
  c.out_dim = 256  # K 65536 would cost more than the backbone here
  # BN in the head (a release option, off for ViT there): without it the teacher collapses to
  # the uniform distribution within the first epoch.
  c.model.use_bn_in_head = True
  # Attention by jax.nn.dot_product_attention: with heads of width 8 it is the faster form on
  # XLA:CPU (the written-out matmul form, the default, is faster at ViT-S's width 64).
  c.model.attention = "xla"

  # A sharper teacher than the release's 0.04 (more k-NN), softer in epoch 0, when the heads'
  # attention takes its form: the 2-epoch linspace gives 0.025 in epoch 0, then 0.02.
  c.teacher_temp = 0.02
  c.warmup_teacher_temp = 0.025
  c.warmup_teacher_temp_epochs = 2
  c.momentum_teacher = 0.99  # 0.996 -> 1 in a short run leaves the teacher nearly frozen
  # The last layer trains from the first step (the release freezes it for the first epoch):
  # released after an epoch, it sent the teacher's entropy up for good, at a cost in k-NN.
  c.freeze_last_layer = 0.0
  # lr 0.005 x 32 / 256 = 6.25e-4 effective (release: 5e-4 at batch 256): a faster head narrows
  # the heads' attention onto a few object patches.
  c.lr = 0.005
  c.warmup_epochs = 0.5  # 125 steps (release: 10 epochs)

  c.eval.after_training = True
  c.eval.compare_random_init = True
  c.eval.batch_size = 200
  # Evaluation images of a folder (data.source=folder): shorter side to 37 = 32 x 256 / 224, the
  # release's 256 / 224 ratio, then the centre 32 px (shapes images are used as generated).
  c.data.eval_resize = 37
  c.eval.linear_epochs = 10  # eval_linear on this data (release: 100 epochs of ImageNet)
  return c
