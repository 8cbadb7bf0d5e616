"""Hugging Face both ways, in the Hub's layout: a directory transformers' DINO conversion writes
(layer_norm_eps 1e-12, no pooler) imports, and the exported directory loads with AutoModel,
AutoImageProcessor and pipeline('image-feature-extraction'). References: transformers' ViTModel
on the same weights, and a NumPy transcription of the preprocessing.
"""
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from dino_jax.convert import exporting, importing

# pylint: disable=g-import-not-at-top,wrong-import-position
from test_convert import error_message
from test_vit_timm import rel_err
# pylint: enable=g-import-not-at-top,wrong-import-position

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SIZE, PATCH = 16, 4  # 4 x 4 patches
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # DINO's (ImageNet)


def hub_model(eps: float = 1e-12, act: str = "gelu"):
  """A ViTModel as transformers' DINO conversion builds it (its ViTConfig keeps the default eps
  1e-12; no pooler), DINO's block at a tiny size. initializer_range 0.2: the smallest variance of
  a LayerNorm's input over a token is 0.066 (the first block's [CLS]; init's 0.02 gives ~1e-3,
  trained weights far more), so eps 1e-6 moves the features by about 1e-6 / (2 x 0.066)."""
  torch.manual_seed(0)
  config = transformers.ViTConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
      image_size=SIZE, patch_size=PATCH, layer_norm_eps=eps, hidden_act=act,
      initializer_range=0.2)
  return transformers.ViTModel(config, add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
  """(directory, model): what ViTModel.save_pretrained writes, as on the Hub."""
  path = str(tmp_path_factory.mktemp("hub") / "dino-vit-tiny")
  model = hub_model()
  model.save_pretrained(path)
  assert json.load(open(os.path.join(path, "config.json")))["layer_norm_eps"] == 1e-12
  return path, model


def hf_tokens(model, x: np.ndarray) -> np.ndarray:
  """ViTModel's last_hidden_state (B, T, D) of NHWC images x."""
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state.numpy()


def our_tokens(net, params, x: np.ndarray) -> np.ndarray:
  """dino_jax's final-LN tokens (B, T, D): what ViTModel's last_hidden_state holds."""
  return np.asarray(net.apply({"params": params}, x, method=net.get_intermediate_layers)[0])


def test_hub_directory_imports_with_a_note_and_negligibly_different_features(hub_dir, caplog):
  """eps 1e-12 is read as DINO's ViT (a logged note names both eps); the weights come in bitwise,
  and dino_jax's features (eps 1e-6) differ from transformers' (eps 1e-12) by eps / (2 var), var
  the smallest variance of a LayerNorm's input (here 7.5e-6); with the transformers model's eps
  set to 1e-6 too, the two agree to float32 rounding."""
  path, model = hub_dir
  with caplog.at_level(logging.INFO):
    config, net, params = importing.load_backbone(path)
  note = [r.getMessage() for r in caplog.records if "layer_norm_eps" in r.getMessage()]
  assert note and "1e-12" in note[0] and "1e-06" in note[0], caplog.text
  assert (config.model.arch, config.model.embed_dim, config.model.num_heads,
          config.model.patch_size, config.model.img_size) == ("vit_custom", 32, 2, PATCH, SIZE)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  # Bitwise, against transformers' own tensors: [CLS], position embedding, the first block's
  # query / key / value (one qkv Dense in dino_jax, its kernel the transposed torch weights).
  np.testing.assert_array_equal(params["cls_token"], sd["embeddings.cls_token"])
  np.testing.assert_array_equal(params["pos_embed"], sd["embeddings.position_embeddings"])
  # (transformers 5 names them layers.0.attention.q_proj, 4 encoder.layer.0.attention.attention.query)
  def first_block(*names):
    return next(v for k, v in sd.items() if ".0.attention." in k and k.endswith(".weight")
                and k.split(".")[-2] in names)
  qkv = np.concatenate([first_block("q_proj", "query"), first_block("k_proj", "key"),
                        first_block("v_proj", "value")]).T
  np.testing.assert_array_equal(params["blocks_0"]["attn"]["qkv"]["kernel"], qkv)

  x = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
  ours = our_tokens(net, params, x)
  norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
  variances = []
  hooks = [m.register_forward_hook(lambda m, i, o: variances.append(
      float(i[0].var(-1, unbiased=False).min()))) for m in norms]
  err = rel_err(ours, hf_tokens(model, x))
  for h in hooks:
    h.remove()
  assert err <= min(1.2 * 1e-6 / (2 * min(variances)), 1e-4)
  for m in norms:
    m.eps = 1e-6
  try:
    assert rel_err(ours, hf_tokens(model, x)) <= 1e-6
  finally:
    for m in norms:
      m.eps = 1e-12


@pytest.mark.parametrize("eps,act,named", [(1e-5, "gelu", "layer_norm_eps 1e-05"),
                                           (1e-12, "gelu_new", "hidden_act 'gelu_new'")])
def test_another_block_is_refused_in_one_line_naming_the_key(tmp_path, eps, act, named):
  """A larger eps (1e-5: PyTorch's default) or another GELU is another network: refused."""
  hub_model(eps, act).save_pretrained(str(tmp_path))
  msg = error_message(lambda: importing.load_backbone(str(tmp_path)))
  assert named in msg and "config.json" in msg and "\n" not in msg


@pytest.fixture(scope="module")
def exported(hub_dir, tmp_path_factory):
  """The Hub directory imported into a workdir and exported again with --format hf."""
  root = tmp_path_factory.mktemp("export")
  importing.import_weights(hub_dir[0], str(root / "workdir"))
  exporting.export(str(root / "workdir"), str(root / "hf"), fmt="hf")
  return str(root / "hf")


def preprocess(image: Image.Image) -> np.ndarray:
  """DINO's normalisation written out: uint8 (H, W, 3) -> (1, H, W, 3), /255, ImageNet mean, std."""
  return ((np.asarray(image, np.float64) / 255 - MEAN) / STD)[None].astype(np.float32)


def test_export_loads_with_auto_classes_and_the_pipeline_gives_our_features(hub_dir, exported):
  """AutoModel / AutoImageProcessor read the exported directory (weights bitwise, the processor
  DINO's: bicubic to the model's size, ImageNet mean / std), and pipeline('image-feature-
  extraction') returns dino_jax's final-LN tokens of the image (last_hidden_state: every token,
  [CLS] first) resized by PIL and normalised by NumPy, to float32 rounding."""
  _, hub = hub_dir
  files = sorted(os.listdir(exported))
  assert files == ["config.json", "model.safetensors", "preprocessor_config.json"], files
  model, info = transformers.AutoModel.from_pretrained(exported, output_loading_info=True)
  assert type(model).__name__ == "ViTModel"
  assert not info["unexpected_keys"] and not info["mismatched_keys"], info
  assert all(k.startswith("pooler.") for k in info["missing_keys"]), info  # AutoModel's own
  for name, value in hub.state_dict().items():
    np.testing.assert_array_equal(model.state_dict()[name].numpy(), value.numpy(), err_msg=name)
  processor = transformers.AutoImageProcessor.from_pretrained(exported)
  assert dict(processor.size) == {"height": SIZE, "width": SIZE}
  assert int(processor.resample) == int(Image.BICUBIC)
  np.testing.assert_allclose(processor.image_mean, MEAN)
  np.testing.assert_allclose(processor.image_std, STD)

  config, net, params = importing.load_backbone(exported)
  # A 48 x 32 image: the processor resizes it as PIL's bicubic does (bilinear would differ by
  # 0.2), then normalises as DINO does.
  image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (3 * SIZE, 2 * SIZE, 3),
                                                            np.uint8))
  extractor = transformers.pipeline("image-feature-extraction", model=exported)
  got = np.asarray(extractor(image), np.float32)
  assert got.shape == (1, (SIZE // PATCH) ** 2 + 1, config.model.embed_dim)
  x = preprocess(image.resize((SIZE, SIZE), Image.BICUBIC))
  assert rel_err(our_tokens(net, params, x), got) <= 1e-5
