"""ViT-S/16 DINO on your own folder of images (10k to 1M of them, no labels needed) on one GPU.

  python -m dino_jax.train --config configs/vit_small_folder.py:N --workdir WORKDIR \
      --config.data.path=DIR

N: about how many images DIR holds; it picks epochs, warm-up and K (out_dim) from TABLE below
(without it, the 100k row). data.path has no default: without it the command stops before
anything compiles, naming config.data.path. DIR may be
- a flat folder (or any tree) of images: pretraining only; the closing k-NN is skipped with one
  logged line (it needs labels);
- DIR/<class>/*.jpg: the same (the class folders are read as labels, which training ignores, and
  there is no eval split to score k-NN on);
- DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg (ImageNet's layout): training on train/, and
  at the end the teacher's k-NN accuracy on val/ (eval/knn.json).
Images of any size and format PIL reads; a file that cannot be decoded is skipped and counted in
the log. The crops are made on the host (PIL) by data.workers processes.

Memory: the optimizer step sees batch_size = 256 images, fed to the device as grad_accum_steps
micro-batches (loss, gradient and centre equal the whole batch's: train.train_step). The release
trains ViT-S/16 at 64 images per GPU in fp16 autocast without asking for its 32 GB V100s (its
ViT-B command does); bf16 activations take what fp16's do. From XLA's buffer assignment of this
step (`benchmarks/train_step.py --compile_only`; benchmarks/RESULTS.md, "One-GPU folder config")
and JAX's default of 75 % of a GPU's memory: 8 micro-batches of 32 for a 24 GB GPU (the
default); --config.grad_accum_steps=4 for 40-48 GB, =2 for 80 GB, each faster. The same recipe
either way (only the random draws on the device differ).

Collapse: every log line shows the teacher's entropy, its batch-mean entropy and the KL
(dino_jax/diagnostics.py). Healthy: entropy well below ln K (9.0 at K 8192), batch-mean well above
0, kl falling. After the first epoch, three log lines in a row past a threshold print a COLLAPSE
warning with what to change:
- uniform (entropy near ln K; loss stuck near ln K): lower teacher_temp and warmup_teacher_temp
  (the release: "try decreasing it if the training loss does not decrease"), a longer
  freeze_last_layer, a smaller out_dim, a higher momentum_teacher;
- one-hot (batch-mean entropy near 0): a lower center_momentum, a slightly higher teacher_temp
  (the release finds above 0.07 unstable), a lower lr or longer warmup_epochs.
Neither says the features are good: with a labelled val/ split, eval/knn.json does.
"""
from dino_jax import config as config_lib

# images (at least) -> (epochs, warmup_epochs, out_dim). Fewer images, more epochs: a 10k-image
# run sees 8M images (31k steps of 256), a 1M-image one 100M (the release's 100 ImageNet epochs
# are 128M). K: the release's 65536 is for ImageNet ("for complex
# and large datasets large values (like 65k) work well", main_dino.py); on custom data a smaller
# K converged faster (facebookresearch/dino#279; the answer there points to iBOT's 8192), 8192
# worked for a ViT-S on 100k (time-series) samples (dino#246), and a DINOv2 author sees the gain
# of more prototypes saturate near 65k for ImageNet's 1000 classes, the need growing with the
# data's size and number of classes (dinov2#149). The warm-up keeps at least ~1000 steps on the
# smallest sets.
TABLE = (
    (0, (800, 30, 4096)),
    (30_000, (400, 20, 8192)),
    (100_000, (200, 10, 16384)),
    (300_000, (100, 10, 32768)),
)


def schedule_for(num_images: int) -> tuple[int, int, int]:
  """(epochs, warmup_epochs, out_dim) of TABLE's row for num_images images."""
  return [row for least, row in TABLE if num_images >= least][-1]


def get_config(arg: str | None = None):
  try:
    num_images = int(arg) if arg else 100_000
  except ValueError:
    raise ValueError(f"config arg {arg!r}: expected the number of images, e.g. "
                     "configs/vit_small_folder.py:50000") from None
  c = config_lib.base_config()  # the release's recipe: ViT-S/16, AdamW, its schedules and crops
  c.data.source = "folder"
  c.data.path = ""  # required: --config.data.path=DIR
  # Big photos decode at a reduced DCT scale that still gives every crop its full resolution:
  # about twice as fast on camera photos (docs/notes/data.md); with one GPU the host's decoding
  # and cropping can set the pace.
  c.data.jpeg_draft = True
  c.data.workers = 8  # crop processes: as many cores as the host can spare
  c.epochs, c.warmup_epochs, c.out_dim = schedule_for(num_images)

  c.batch_size = 256  # the release's reference batch for lr: lr stays 0.0005
  c.grad_accum_steps = 8  # micro-batches of 32 for 24 GB; 4 for 40-48 GB, 2 for 80 GB
  c.local_crops_number = 10  # the paper's best ViT-S runs (the release's default: 8)
  # The teacher's EMA horizon of the release's default (0.996 at batch 1024) in images:
  # 0.996 ** (256 / 1024) = 0.999 at batch 256 (the release suggests 0.9995 there).
  c.momentum_teacher = 0.999
  c.model.dtype = "bfloat16"  # fp32's range, no loss scaling (the release: fp16 + a scaler)
  c.checkpoint_every_steps = 2000
  # k-NN on DIR/val when it has class folders; else the attention maps of the first images
  c.eval.after_training = True
  return c
