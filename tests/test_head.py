"""DINOHead against a transcription of the release's DINOHead in PyTorch on the same weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dino_jax.models import DINOHead
import release


def to_state_dict(params, batch_stats=None):
  """Flax head variables -> the release's keys (written here, independently of dino_jax.convert):
  mlp_{i} -> mlp.{i}, kernel -> weight (transposed), BN scale/bias/mean/var -> weight/bias/
  running_mean/running_var, last_layer.kernel_v/kernel_g -> weight_v/weight_g (transposed)."""
  names = {"kernel": "weight", "scale": "weight", "bias": "bias", "kernel_v": "weight_v",
           "kernel_g": "weight_g", "mean": "running_mean", "var": "running_var"}
  sd = {}
  for tree in (params, batch_stats or {}):
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      module, leaf = path[0].key, path[-1].key
      x = np.asarray(x)
      module = module.replace("mlp_", "mlp.")
      sd[f"{module}.{names[leaf]}"] = torch.from_numpy(
          (x.T if x.ndim == 2 else x).copy())
  for key in list(sd):
    if key.endswith("running_var"):
      sd[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
  return sd


def random_variables(head, x, seed=0):
  """Weights drawn with NumPy on the head's tree (init's RNG compiles for seconds)."""
  tree = jax.eval_shape(head.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(seed)

  def leaf(path, v):
    name = path[-1].key
    if name in ("kernel_g", "var"):
      return jnp.ones(v.shape)
    return jnp.asarray(rng.normal(size=v.shape) * (0.5 if name == "kernel_v" else 0.2),
                       jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf, tree)


def _inputs(b=6, d=24, seed=0):
  return np.random.default_rng(seed).normal(size=(b, d)).astype(np.float32)


@pytest.mark.parametrize("nlayers,norm_last_layer", [(3, True), (3, False), (2, True),
                                                     (4, True)])
def test_forward_matches_release_head(nlayers, norm_last_layer):
  x = _inputs()
  head = DINOHead(40, norm_last_layer=norm_last_layer, nlayers=nlayers, hidden_dim=32,
                  bottleneck_dim=16)
  params = random_variables(head, x, nlayers)["params"]
  if not norm_last_layer:  # a trained g is not 1
    g = np.random.default_rng(9).uniform(0.5, 2.0, (1, 40))
    params["last_layer"]["kernel_g"] = jnp.asarray(g, jnp.float32)
  ref = release.DINOHead(24, 40, False, norm_last_layer, nlayers, 32, 16)
  ref.load_state_dict(to_state_dict(params), strict=True)  # the names map 1:1
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  got = head.apply({"params": params}, x)
  assert got.shape == (6, 40)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_one_layer_head():
  x = _inputs()
  head = DINOHead(12, nlayers=1, bottleneck_dim=16)
  params = random_variables(head, x)["params"]
  assert set(params) == {"mlp_0", "last_layer"}  # the release's key is plain mlp.*
  ref = release.DINOHead(24, 12, nlayers=1, bottleneck_dim=16)
  sd = {k.replace("mlp.0.", "mlp."): v for k, v in to_state_dict(params).items()}
  ref.load_state_dict(sd, strict=True)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(head.apply({"params": params}, x), want, rtol=1e-5, atol=1e-6)


def test_batchnorm_head_matches_torch_in_train_and_eval_mode():
  x = _inputs(b=8, seed=1) * 3 + 1
  head = DINOHead(40, use_bn=True, nlayers=3, hidden_dim=32, bottleneck_dim=16)
  variables = random_variables(head, x, 1)
  params = variables["params"]
  stats = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
  for name in stats:
    stats[name]["var"] = jnp.ones_like(stats[name]["var"])  # torch's fresh running stats
  assert sorted(params) == ["last_layer", "mlp_0", "mlp_1", "mlp_3", "mlp_4", "mlp_6"]
  # Non-trivial BN affine params.
  for name in ("mlp_1", "mlp_4"):
    params[name] = {"scale": jnp.linspace(0.5, 1.5, 32), "bias": jnp.linspace(-0.2, 0.3, 32)}
  ref = release.DINOHead(24, 40, use_bn=True, nlayers=3, hidden_dim=32, bottleneck_dim=16)
  ref.load_state_dict(to_state_dict(params, stats), strict=True)

  # Train mode: batch statistics (biased variance), running stats updated with momentum 0.1 and
  # the unbiased variance.
  got, new_vars = head.apply({"params": params, "batch_stats": stats}, x, train=True,
                             mutable=["batch_stats"])
  ref.train()
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  sd = ref.state_dict()
  for name, idx in (("mlp_1", 1), ("mlp_4", 4)):
    np.testing.assert_allclose(new_vars["batch_stats"][name]["mean"],
                               sd[f"mlp.{idx}.running_mean"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_vars["batch_stats"][name]["var"],
                               sd[f"mlp.{idx}.running_var"].numpy(), rtol=1e-5, atol=1e-6)

  # Eval mode: the running statistics.
  ref.eval()
  with torch.no_grad():
    want = ref(torch.from_numpy(x[:3])).numpy()
  got = head.apply({"params": params, "batch_stats": new_vars["batch_stats"]}, x[:3])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_param_names_and_shapes_map_to_the_release_keys():
  d, k = 24, 65
  for use_bn, want_modules in ((False, ["mlp.0", "mlp.2", "mlp.4"]),
                               (True, ["mlp.0", "mlp.1", "mlp.3", "mlp.4", "mlp.6"])):
    head = DINOHead(k, use_bn=use_bn, hidden_dim=32, bottleneck_dim=16)
    variables = jax.tree.map(lambda v: np.zeros(v.shape, v.dtype),
                             jax.eval_shape(head.init, jax.random.PRNGKey(0), _inputs(d=d)))
    sd = to_state_dict(variables["params"], variables.get("batch_stats"))
    ref = release.DINOHead(d, k, use_bn=use_bn, hidden_dim=32, bottleneck_dim=16).state_dict()
    assert sorted(sd) == sorted(ref)
    assert {key.rsplit(".", 1)[0] for key in sd} == set(want_modules + ["last_layer"])
    for key in ref:
      assert tuple(sd[key].shape) == tuple(ref[key].shape), key
    assert sd["last_layer.weight_g"].shape == (k, 1) and sd["last_layer.weight_v"].shape == (k, 16)


def test_init_g_is_one_v_torch_default_mlp_trunc_normal():
  head = DINOHead(4096, hidden_dim=512, bottleneck_dim=256)
  x = _inputs(d=384)
  init = jax.jit(head.init).lower(jax.random.PRNGKey(0), x).compile(
      {"xla_backend_optimization_level": 0})  # LLVM optimisation off: faster compile
  params = init(jax.random.PRNGKey(0), x)["params"]
  np.testing.assert_array_equal(params["last_layer"]["kernel_g"], np.ones((1, 4096)))
  # V keeps torch's default Linear init (the release applies its trunc-normal init before
  # creating last_layer): U(-1/sqrt(in), 1/sqrt(in)).
  v = np.asarray(params["last_layer"]["kernel_v"])
  bound = 1 / np.sqrt(256)
  assert np.abs(v).max() <= bound and np.abs(v).max() > 0.99 * bound
  np.testing.assert_allclose(v.std(), bound / np.sqrt(3), rtol=0.01)
  for name in ("mlp_0", "mlp_2", "mlp_4"):
    np.testing.assert_allclose(np.std(params[name]["kernel"]), 0.02, rtol=0.02)
    np.testing.assert_array_equal(params[name]["bias"], 0)


def test_output_is_unit_norm_direction_times_g():
  # W = g V / ||V||: with g = 1 every logit is a cosine similarity, in [-1, 1].
  head = DINOHead(50, hidden_dim=32, bottleneck_dim=16)
  x = _inputs(b=20)
  params = random_variables(head, x)["params"]
  out = np.asarray(head.apply({"params": params}, x))
  assert out.shape == (20, 50) and np.abs(out).max() <= 1 + 1e-6
  params["last_layer"]["kernel_v"] = params["last_layer"]["kernel_v"] * 7.0  # scale-free in V
  np.testing.assert_allclose(head.apply({"params": params}, x), out, rtol=1e-5, atol=1e-7)


def test_gradients_match_the_release_head():
  # The last layer computes (x V) * g / ||V|| rather than x W: the gradients with respect to the
  # input, V, g and the MLP must still be torch's through weight_norm.
  x = _inputs()
  head = DINOHead(40, norm_last_layer=False, nlayers=3, hidden_dim=32, bottleneck_dim=16)
  params = random_variables(head, x, 3)["params"]
  g = np.random.default_rng(9).uniform(0.5, 2.0, (1, 40))
  params["last_layer"]["kernel_g"] = jnp.asarray(g, jnp.float32)
  cot = np.random.default_rng(4).normal(size=(6, 40)).astype(np.float32)
  ref = release.DINOHead(24, 40, False, False, 3, 32, 16)
  ref.load_state_dict(to_state_dict(params), strict=True)
  xt = torch.from_numpy(x).requires_grad_()
  (ref(xt) * torch.from_numpy(cot)).sum().backward()

  def loss(params, x):
    return jnp.sum(head.apply({"params": params}, x) * cot)

  dparams, dx = jax.grad(loss, argnums=(0, 1))(params, x)
  np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-6)
  want = {k: p.grad.numpy() for k, p in ref.named_parameters()}
  got = to_state_dict(dparams)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_bf16_compute_gives_float32_logits_close_to_float32():
  x = _inputs(b=20)
  head = DINOHead(50, hidden_dim=32, bottleneck_dim=16)
  params = random_variables(head, x)["params"]
  want = head.apply({"params": params}, x)
  got = DINOHead(50, hidden_dim=32, bottleneck_dim=16, dtype=jnp.bfloat16).apply(
      {"params": params}, x)
  assert got.dtype == jnp.float32  # the column scale is applied in the params' float32
  np.testing.assert_allclose(got, want, atol=0.03)  # logits in [-1, 1], bf16's 8-bit mantissa
