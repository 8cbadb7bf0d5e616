"""Export / import to PyTorch: every format round-trips bitwise, PyTorch models reproduce ours.

A workdir holds a small model's TrainState a few optimizer steps in (random gradients, a teacher
apart from the student, a random centre; with and without a BatchNorm head). References: timm's
VisionTransformer, transformers.ViTModel, torch.optim.AdamW with the release's param groups and
gradient clipping (transcribed from the reference), the release's DINOHead (test_convert).
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from safetensors import safe_open

from dino_jax import checkpoint, convert, optim, schedules
from dino_jax import config as config_lib
from dino_jax import sharding as sharding_lib
from dino_jax import state as state_lib
from dino_jax.convert import exporting, importing
from dino_jax.models import build_models, build_vit

pytest.importorskip("timm")
# Helpers of the sibling tests (pytest puts tests/ on sys.path): the torch references.
# pylint: disable=g-import-not-at-top,wrong-import-position
from helpers import assert_trees_close, tiny_config
from test_convert import error_message
import release
from test_vit_timm import make_timm, rel_err
# pylint: enable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
FORMATS = ("pth", "safetensors", "hf", "full")
STEPS, STEPS_PER_EPOCH = 5, 2
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where python -m runs


def small_config(use_bn: bool):
  """The tiny config with timm's ViT layout (patch 16 on 224 px), so that timm runs it too."""
  return tiny_config(
      model__embed_dim=48, model__num_heads=3, model__patch_size=16, model__head_hidden_dim=40,
      global_crops_size=224, local_crops_size=96, model__use_bn_in_head=use_bn,
      model__norm_last_layer=use_bn,  # without BN: g is trained (and exported in the optimizer)
      freeze_last_layer=2.0,  # 4 steps: at step 5 the last layer has taken 1 Adam step
      batch_size=1024,  # lr 2e-3: Adam steps well above float32 rounding of the weights
      steps_per_epoch=STEPS_PER_EPOCH, total_steps=10)


def make_workdir(path: str, use_bn: bool):
  """A workdir whose checkpoint is init's structure a few steps in, every leaf non-trivial."""
  config = small_config(use_bn)
  fns = schedules.dino_schedules(config, STEPS_PER_EPOCH, config.total_steps)
  tx = optim.make_optimizer(config, fns, STEPS_PER_EPOCH)
  abstract = jax.eval_shape(state_lib.init_fn(config, tx), jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  rand = lambda tree, lo=-0.5, hi=0.5: jax.tree.map(
      lambda x: rng.uniform(lo, hi, x.shape).astype(x.dtype), tree)

  @jax.jit
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = rand(abstract.params)
  opt_state = jax.jit(tx.init)(params)
  for _ in range(STEPS):
    params, opt_state = step(params, opt_state, rand(params))
  state = state_lib.TrainState(
      step=np.asarray(STEPS, np.int32), params=params, opt_state=opt_state,
      teacher_params=jax.tree.map(lambda x: x + np.float32(0.01), params),
      center=rand(abstract.center), batch_stats=rand(abstract.batch_stats, 0.5, 1.5),
      teacher_batch_stats=rand(abstract.teacher_batch_stats, 0.5, 1.5))
  state = jax.tree.map(jnp.asarray, state)
  checkpoint.save_config(path, config)
  mngr = checkpoint.manager(path)
  checkpoint.save(mngr, STEPS, state)
  mngr.wait_until_finished()
  mngr.close()
  return config, jax.tree.map(np.asarray, state)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("interop")
  return {bn: (str(root / f"wd_bn{bn}"),) + make_workdir(str(root / f"wd_bn{bn}"), bn)
          for bn in (False, True)}


@pytest.fixture(scope="module")
def exports(workdirs, tmp_path_factory):
  """Every format of the BN-free workdir's teacher (pth / safetensors also with the head)."""
  root = tmp_path_factory.mktemp("exports")
  wd = workdirs[False][0]
  out = {}
  for fmt in FORMATS:
    out[fmt] = str(root / f"teacher.{fmt}")
    exporting.export(wd, out[fmt], fmt=fmt)
  out["pth+head"] = str(root / "teacher_head.pth")
  exporting.export(wd, out["pth+head"], fmt="pth", with_head=True)
  return out


@pytest.fixture(scope="module")
def forward():
  """The workdirs' ViT's jitted apply."""
  return jax.jit(build_vit("vit_custom", 16, embed_dim=48, depth=2, num_heads=3).apply)


def test_round_trip_every_format_bitwise(workdirs, exports, tmp_path):
  """Export -> import gives back the exported network bitwise (backbone; head with --with_head)."""
  wd, config, state = workdirs[False]
  for fmt in ("pth", "safetensors", "hf", "pth+head"):
    _, got = importing.load_state(exports[fmt], config=config)
    for net in (got.params, got.teacher_params):  # both networks get the file's weights
      assert_trees_close(net["backbone"], state.teacher_params["backbone"])
      if fmt.endswith("+head"):
        assert_trees_close(net["head"], state.teacher_params["head"])
    assert int(got.step) == 0
  # The student; a safetensors file needs no config for a vit_custom (heads in its metadata).
  path = str(tmp_path / "student.safetensors")
  exporting.export(wd, path, which="student", fmt="safetensors", with_head=True)
  config2, got = importing.load_state(path)
  assert (config2.model.embed_dim, config2.model.num_heads) == (48, 3)
  assert_trees_close(got.params, state.params)


@pytest.mark.parametrize("use_bn", [False, True], ids=["plain_head", "bn_head"])
def test_full_checkpoint_loads_back_into_an_equal_train_state(workdirs, tmp_path, use_bn):
  """full -> import: params, teacher, centre, BN statistics, Adam moments and counts, lr / wd and
  step all equal the original, read back through orbax as train reads a workdir."""
  wd, config, state = workdirs[use_bn]
  path = str(tmp_path / "full.pth")
  exporting.export(wd, path, fmt="full")
  importing.import_weights(path, str(tmp_path / "imported"))
  config2, restored, step = exporting.load_state(str(tmp_path / "imported"))
  assert step == STEPS
  assert config_lib.to_json(config2) == config_lib.to_json(config)  # args['dino_jax_config']
  assert_trees_close(restored, state)


def test_full_checkpoint_has_the_release_layout(workdirs, exports):
  _, config, state = workdirs[False]
  ckpt = torch.load(exports["full"], weights_only=True)
  assert set(ckpt) == {"student", "teacher", "optimizer", "epoch", "args", "dino_loss"}
  assert ckpt["epoch"] == STEPS // STEPS_PER_EPOCH
  assert all(k.startswith(("module.backbone.", "module.head.")) for k in ckpt["student"])
  assert all(k.startswith(("backbone.", "head.")) for k in ckpt["teacher"])  # no DDP without BN
  assert ckpt["args"]["arch"] == "vit_custom" and ckpt["args"]["out_dim"] == 64
  np.testing.assert_array_equal(ckpt["dino_loss"]["center"].numpy(), state.center)
  # What the release's eval scripts do (load_pretrained_weights): the teacher, 'backbone.'
  # stripped, strict=False (head keys left over) -> every backbone tensor loads.
  sd = {k.replace("backbone.", ""): v for k, v in ckpt["teacher"].items()}
  missing, unexpected = make_timm(224, 48, 2, 3, 16).load_state_dict(sd, strict=False)
  assert not missing and all(k.startswith("head.") for k in unexpected)


def test_full_checkpoint_optimizer_resumes_in_torch_adamw(workdirs, exports):
  """The exported optimizer loads into the release's AdamW; its next step (clipping per tensor,
  lr / wd of that step) moves every parameter as dino_jax's next step does."""
  _, config, state = workdirs[False]
  ckpt = torch.load(exports["full"], weights_only=True)
  student = torch.nn.Module()
  student.backbone = make_timm(224, 48, 2, 3, 16)
  student.head = release.DINOHead(48, 64, norm_last_layer=False, hidden_dim=40, bottleneck_dim=16)
  student.load_state_dict({k[len("module."):]: v for k, v in ckpt["student"].items()}, strict=True)
  opt = torch.optim.AdamW(release.get_params_groups(student.named_parameters()))
  opt.load_state_dict(ckpt["optimizer"])

  fns = schedules.dino_schedules(config, STEPS_PER_EPOCH, config.total_steps)
  tx = optim.make_optimizer(config, fns, STEPS_PER_EPOCH)
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda x: rng.normal(0, 0.05, x.shape).astype(np.float32), state.params)
  updates, _ = jax.jit(tx.update)(grads, state.opt_state, state.params)
  ours = convert.flax_to_torch(jax.tree.map(np.asarray, optax.apply_updates(state.params, updates)))

  torch_grads = {k: torch.from_numpy(v) for k, v in convert.flax_to_torch(grads).items()}
  _release_step(student, opt, torch_grads, *_lr_wd(fns)(STEPS))
  before = convert.flax_to_torch(state.params)
  for name, p in student.named_parameters():
    after = p.detach().numpy()
    assert rel_err(ours[name], after) <= 1e-6, name
    # The step itself (~lr in size): a wrong Adam count or moment would be far off.
    assert rel_err(ours[name] - before[name], after - before[name]) <= 1e-3, name


def test_release_full_checkpoint_imports_and_resumes(tmp_path):
  """A checkpoint written the release's way in PyTorch (args an argparse.Namespace, fp16_scaler,
  AdamW after 2 steps with the last layer frozen in the first): the imported weights, centre and
  Adam state are the torch ones, and dino_jax's next step equals the next torch step."""
  import argparse  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  student, teacher = torch.nn.Module(), torch.nn.Module()
  for net in (student, teacher):
    net.backbone = make_timm(224, 192, 12, 3, 16)  # vit_tiny/16
    net.head = release.DINOHead(192, 64, norm_last_layer=False, hidden_dim=40, bottleneck_dim=16)
  teacher.load_state_dict(student.state_dict())
  opt = torch.optim.AdamW(release.get_params_groups(student.named_parameters()))
  # The release's defaults (= base_config's): lr 5e-4 x 1024 / 256, 10 warm-up epochs, wd 0.04 ->
  # 0.4; here 1 step per epoch and 100 steps, so the last layer is frozen in step 0.
  lr_wd = _lr_wd(schedules.dino_schedules(config_lib.base_config(), 1, 100))
  rng = np.random.default_rng(0)
  grads_at = lambda it: {n: torch.from_numpy(rng.normal(0, 0.02, p.shape).astype(np.float32))
                         for n, p in student.named_parameters()
                         if not (it == 0 and "last_layer" in n)}
  for it in range(2):
    _release_step(student, opt, grads_at(it), *lr_wd(it))
  args = argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=64, norm_last_layer=False,
                            use_bn_in_head=False, momentum_teacher=0.996, lr=0.0005, epochs=100,
                            batch_size_per_gpu=64, world_size=16, freeze_last_layer=1,
                            global_crops_scale=(0.4, 1.0), clip_grad=3.0)
  center = torch.randn(1, 64)
  path = str(tmp_path / "checkpoint.pth")
  torch.save({"student": {"module." + k: v for k, v in student.state_dict().items()},
              "teacher": teacher.state_dict(), "optimizer": opt.state_dict(), "epoch": 2,
              "args": args, "dino_loss": {"center": center},
              "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0}}, path)

  config, state = importing.load_state(path)
  assert (config.model.arch, config.model.patch_size, config.out_dim) == ("vit_tiny", 16, 64)
  assert not config.model.norm_last_layer and config.batch_size == 1024
  assert int(state.step) == 2
  np.testing.assert_array_equal(state.center, center.numpy())
  assert_trees_close(state.params, convert.torch_to_flax(student.state_dict()))
  assert_trees_close(state.teacher_params, convert.torch_to_flax(teacher.state_dict()))

  tx = optim.make_optimizer(config, schedules.dino_schedules(config, 1, 100), 1)
  torch_grads = grads_at(2)
  grads = convert.torch_to_flax(torch_grads)
  updates, _ = jax.jit(tx.update)(grads, state.opt_state, state.params)
  ours = convert.flax_to_torch(jax.tree.map(np.asarray, optax.apply_updates(state.params,
                                                                            updates)))
  before = {n: p.detach().numpy().copy() for n, p in student.named_parameters()}
  _release_step(student, opt, torch_grads, *lr_wd(2))
  for name, p in student.named_parameters():
    moved = p.detach().numpy() - before[name]
    assert rel_err(ours[name] - before[name], moved) <= 1e-3, name


def _lr_wd(schedules):
  """it -> (lr, wd) of dino_jax's schedules, in float32 as its jitted step computes them."""
  values = jax.jit(lambda s: jnp.stack([schedules["lr"](s), schedules["wd"](s)]))
  return lambda it: [float(v) for v in np.asarray(values(np.int32(it)))]


def _release_step(student, opt, grads, lr, wd):
  """One iteration of the release's optimisation (transcribed): gradients clipped per tensor to
  norm 3, the iteration's lr (all groups) and wd (the regularized group) set, AdamW step."""
  for name, p in student.named_parameters():
    p.grad = grads[name].clone() if name in grads else None  # None: frozen last layer
    if p.grad is not None:
      coef = 3.0 / (p.grad.norm(2) + 1e-6)
      if coef < 1:
        p.grad.mul_(coef)
  for i, group in enumerate(opt.param_groups):
    group["lr"] = lr
    if i == 0:
      group["weight_decay"] = wd
  opt.step()


@pytest.mark.parametrize("hw", [(224, 224), (96, 96)], ids=["224", "96"])
def test_timm_on_the_exported_pth_equals_ours(workdirs, exports, forward, hw):
  _, _, state = workdirs[False]
  sd = torch.load(exports["pth"], weights_only=True)
  h, w = hw
  timm_model = make_timm(hw, 48, 2, 3, 16)
  pos_embed = release.interpolate_pos_encoding(sd["pos_embed"], h // 16, w // 16)
  timm_model.load_state_dict({**sd, "pos_embed": pos_embed}, strict=True)
  x = np.random.default_rng(0).normal(size=(2, h, w, 3)).astype(np.float32)
  with torch.no_grad():
    ref = timm_model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  ours = forward({"params": state.teacher_params["backbone"]}, x)
  assert rel_err(ours, ref) <= 1e-4


def test_transformers_on_the_hf_export_equals_ours(workdirs, exports, forward):
  transformers = pytest.importorskip("transformers")
  _, _, state = workdirs[False]
  model, info = transformers.ViTModel.from_pretrained(exports["hf"], add_pooling_layer=False,
                                                      output_loading_info=True)
  assert not any(info.values()), info  # no missing / unexpected / mismatched keys
  x = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state[:, 0]
  ours = forward({"params": state.teacher_params["backbone"]}, x)
  assert rel_err(ours, ref.numpy()) <= 1e-4
  # The installed transformers' own names read back bitwise too.
  assert_trees_close(convert.torch_to_flax(model.state_dict()), state.teacher_params["backbone"])


def test_imported_workdir_resumes_and_initialises_training(workdirs, exports, tmp_path):
  """`train --workdir` restores it into the trainer's sharded state; `--config.init_from`
  takes its student, teacher, centre and BN statistics."""
  _, config, state = workdirs[False]
  out = str(tmp_path / "imported")
  importing.import_weights(exports["full"], out)
  config = checkpoint.load_config(out)
  abstract = state_lib.abstract_state(config)
  mesh = sharding_lib.make_mesh(-1, 1)
  state_sh = sharding_lib.state_shardings(mesh, abstract)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                        state_sh)
  mngr = checkpoint.manager(out)
  step, restored = checkpoint.restore(mngr, target)
  mngr.close()
  assert step == STEPS
  assert_trees_close(jax.tree.map(np.asarray, restored.teacher_params), state.teacher_params)
  fresh = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)
  started = checkpoint.init_from(fresh, out, state_sh)
  for name in ("params", "teacher_params", "center", "batch_stats", "teacher_batch_stats"):
    assert_trees_close(jax.tree.map(np.asarray, getattr(started, name)), getattr(state, name))
  assert int(started.step) == 0  # a new run: its own step and optimizer state


def test_import_keeps_the_configs_crops_and_the_files_position_grid(exports, forward):
  """Weights trained at 224 px (a 14 x 14 position grid) into a config with 96 px global crops:
  the crops stay the config's, model.img_size becomes the file's 224, and the model built from
  the imported config gives, at 96 px, what the 224 px model gives (the grid resized at run
  time)."""
  config = small_config(False)
  config.global_crops_size, config.local_crops_size = 96, 32
  config, state = importing.load_state(exports["pth"], config=config)
  assert (config.global_crops_size, config.local_crops_size, config.model.img_size) == (96, 32, 224)
  backbone = build_models(config)[1].backbone
  x = np.random.default_rng(1).normal(size=(2, 96, 96, 3)).astype(np.float32)
  params = {"params": state.teacher_params["backbone"]}
  np.testing.assert_allclose(backbone.apply(params, x), forward(params, x), rtol=1e-5,
                             atol=1e-5)
  # Weights whose grid is the crops' own leave model.img_size at 0 (follow global_crops_size).
  config, _ = importing.load_state(exports["pth"], config=small_config(False))
  assert (config.global_crops_size, config.model.img_size) == (224, 0)


def test_clear_errors(workdirs, exports, tmp_path):
  wd, config, _ = workdirs[False]
  out = lambda name: str(tmp_path / name)
  msg = error_message(lambda: importing.load_state(exports["pth"], arch="vit_small"))
  assert "vit_small" in msg and "cls_token" in msg and "(1, 1, 48)" in msg and "(1, 1, 384)" in msg
  msg = error_message(lambda: importing.load_state(exports["pth"], config=config, patch_size=8))
  assert "patch_embed.proj.weight" in msg and "(48, 3, 16, 16)" in msg and "(48, 3, 8, 8)" in msg
  sd = torch.load(exports["pth"], weights_only=True)
  sd["blocks.1.attn.proj.weight"] = torch.zeros(48, 40)
  torch.save(sd, out("bad.pth"))
  msg = error_message(lambda: importing.load_state(out("bad.pth"), config=config))
  assert "blocks.1.attn.proj.weight: shape (48, 40) in the state_dict, the model expects " \
         "(48, 48)" in msg
  for fmt in ("pth", "safetensors", "full"):
    data = open(exports[fmt], "rb").read()
    cut = out(f"cut.{fmt}" if fmt != "full" else "cut_full.pth")
    with open(cut, "wb") as f:
      f.write(data[:len(data) // 2])
    assert "cannot read" in error_message(lambda: importing.load_state(cut, config=config))
  assert "backbone only" in error_message(lambda: exporting.export(wd, out("e"), fmt="hf",
                                                               with_head=True))
  assert "heads" in error_message(lambda: importing.load_state(exports["pth"]))
  os.makedirs(out("g/checkpoints/0"))
  error_message(lambda: importing.import_weights(exports["pth"], out("g"), config=config),
         FileExistsError)


def test_command_lines(workdirs, exports, tmp_path):
  """The two commands run as documented (python -m ...); run side by side to save time."""
  wd = workdirs[False][0]
  start = lambda *args: subprocess.Popen(
      [sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=REPO)
  path = str(tmp_path / "teacher.safetensors")
  runs = [start("dino_jax.export_torch", f"--workdir={wd}", f"--output={path}"),
          start("dino_jax.import_torch", f"--weights={exports['full']}",
                f"--output={tmp_path / 'imported'}")]
  for r in runs:
    _, err = r.communicate()
    assert r.returncode == 0, err
  assert exporting.load_state(str(tmp_path / "imported"))[2] == STEPS
  with safe_open(path, "np") as f:
    assert f.metadata()["step"] == str(STEPS)


@pytest.mark.parametrize("output", ["teacher.pth", "teacher.safetensors"])
def test_without_the_torch_extra_one_line_names_it(workdirs, tmp_path, output):
  """A machine with only `pip install -e .`: exporting says which extra to install, in one line
  (torch and safetensors shadowed by packages that fail to import)."""
  for name in ("torch", "safetensors"):
    os.makedirs(tmp_path / "shadow" / name)
    (tmp_path / "shadow" / name / "__init__.py").write_text("raise ImportError('not installed')\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(tmp_path / "shadow")}
  proc = subprocess.run(
      [sys.executable, "-m", "dino_jax.export_torch", f"--workdir={workdirs[False][0]}",
       f"--output={tmp_path / output}"], capture_output=True, text=True, env=env, cwd=REPO)
  assert proc.returncode != 0
  assert "pip install -e '.[torch]'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
  assert not os.path.exists(tmp_path / output)
