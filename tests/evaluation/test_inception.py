"""Tests of the FID Inception network (ddpm_jax.evaluation.inception) and its weight converter."""

import importlib.util
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ddpm_jax.evaluation import features as features_lib
from ddpm_jax.evaluation import inception

_SCRIPT = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
  "scripts",
  "convert_inception_weights.py",
)


@pytest.fixture(scope="module")
def convert():
  spec = importlib.util.spec_from_file_location("convert_inception_weights", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def shapes():
  return inception.variable_shapes()


@pytest.fixture(scope="module")
def random_flat(shapes):
  """He-scaled random conv kernels and BN statistics, so activations stay O(1)."""
  rng = np.random.default_rng(0)
  flat = {}
  for key, shape in shapes.items():
    if key.endswith("conv/kernel"):
      fan_in = shape[0] * shape[1] * shape[2]
      flat[key] = rng.normal(scale=np.sqrt(2.0 / fan_in), size=shape)
    elif key.endswith(("bn/var", "bn/scale")):
      flat[key] = rng.uniform(0.5, 1.5, size=shape)
    else:
      flat[key] = rng.normal(scale=0.05, size=shape)
    flat[key] = flat[key].astype(np.float32)
  return flat


def test_parameter_count(shapes):
  # torchvision's Inception-v3 has 27,161,264 parameters; without the auxiliary head
  # (3,326,696) and with 1008 instead of 1000 classes (+8 * 2048 + 8) that is 23,850,960.
  count = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("params/"))
  assert count == 27_161_264 - 3_326_696 + 8 * 2048 + 8
  assert sum(k.endswith("/conv/kernel") for k in shapes) == 94


@pytest.mark.parametrize("shape", [(2, 299, 299, 3), (3, 32, 32, 3), (1, 28, 28, 1)])
def test_output_shapes(shapes, shape):
  variables = traverse_util.unflatten_dict(
    {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}, sep="/"
  )
  pool3, logits = jax.eval_shape(
    inception.FIDInceptionV3().apply, variables, jax.ShapeDtypeStruct(shape, jnp.uint8)
  )
  chex.assert_shape(pool3, (shape[0], 2048))
  chex.assert_shape(logits, (shape[0], 1008))


@pytest.fixture(scope="module")
def weights_path(convert, shapes, random_flat, tmp_path_factory):
  """The random weights as a PyTorch state_dict, converted and written as the script does."""
  state_dict = convert.to_state_dict(random_flat, shapes)
  assert "Mixed_6b.branch7x7_2.conv.weight" in state_dict
  assert state_dict["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
  assert state_dict["fc.weight"].shape == (1008, 2048)
  state_dict["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0)  # Ignored.
  path = str(tmp_path_factory.mktemp("inception") / "inception_fid.npz")
  np.savez(path, **convert.convert_state_dict(state_dict, shapes))
  return path


@pytest.fixture(scope="module")
def forward(weights_path):
  """One compile of the full network: loaded weights on two 299x299 images."""
  variables = inception.load_inception_params(weights_path)
  images = np.random.default_rng(1).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
  pool3, logits = jax.jit(inception.FIDInceptionV3().apply)(variables, images)
  return np.asarray(pool3), np.asarray(logits)


def test_weights_round_trip(weights_path, random_flat):
  loaded = inception.load_inception_params(weights_path)
  flat = traverse_util.flatten_dict(loaded, sep="/")
  assert all(v.dtype == np.float32 for v in flat.values())
  chex.assert_trees_all_equal(flat, random_flat)


def test_forward_pass_on_299x299(forward, random_flat):
  pool3, logits = forward
  chex.assert_shape(pool3, (2, 2048))
  chex.assert_shape(logits, (2, 1008))
  assert np.all(np.isfinite(pool3)) and np.all(pool3 >= 0)  # Mean of ReLUs.
  assert np.std(pool3) > 0 and not np.allclose(pool3[0], pool3[1])
  # OpenAI's IS code: logits = pool3 @ W, without the layer's bias.
  np.testing.assert_allclose(logits, pool3 @ random_flat["params/fc/kernel"], rtol=1e-4, atol=1e-4)


def test_average_pool_excludes_padding():
  x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  out = np.asarray(inception._avg_pool_3x3_same(jnp.asarray(x)))[0, :, :, 0]
  expected = np.empty((4, 4))
  for i in range(4):
    for j in range(4):
      window = x[0, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2, 0]
      expected[i, j] = window.sum() / window.size  # 4 at corners, 6 on edges, 9 inside.
  np.testing.assert_allclose(out, expected, rtol=1e-6)


class _Tiny(nn.Module):
  """One asymmetric conv block and the fc layer, named as in the full network."""

  @nn.compact
  def __call__(self, x):
    x = inception.BasicConv(4, (1, 3), padding=(0, 1), name="Mixed_6b")(x)
    return inception.Logits(use_bias=True, name="fc")(jnp.mean(x, axis=(1, 2)))


def test_converted_weights_follow_pytorch_conventions(convert):
  """Weights in PyTorch layout give PyTorch's conv / BN / linear results after conversion."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
  w = rng.normal(size=(4, 3, 1, 3)).astype(np.float32)  # OIHW, kernel_size=(1, 3).
  mean, var = rng.normal(size=4), rng.uniform(0.5, 2, size=4)
  gamma, beta = rng.normal(size=4), rng.normal(size=4)
  fc_w, fc_b = rng.normal(size=(1008, 4)), rng.normal(size=1008)
  state_dict = {
    "Mixed_6b.conv.weight": w,
    "Mixed_6b.bn.weight": gamma,
    "Mixed_6b.bn.bias": beta,
    "Mixed_6b.bn.running_mean": mean,
    "Mixed_6b.bn.running_var": var,
    "Mixed_6b.bn.num_batches_tracked": 7,
    "fc.weight": fc_w,
    "fc.bias": fc_b,
  }
  abstract = jax.eval_shape(_Tiny().init, jax.random.PRNGKey(0), x)
  tiny_shapes = {k: v.shape for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
  flat = convert.convert_state_dict(state_dict, tiny_shapes)
  out = _Tiny().apply(traverse_util.unflatten_dict(flat, sep="/"), x)

  # PyTorch semantics: out[n, o, y, x] = sum_{i, kw} W[o, i, 0, kw] xpad[n, i, y, x + kw].
  xpad = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (0, 0)))
  conv = np.zeros((2, 5, 6, 4))
  for kw in range(3):
    conv += np.einsum("nyxi,oi->nyxo", xpad[:, :, kw : kw + 6], w[:, :, 0, kw])
  act = np.maximum((conv - mean) / np.sqrt(var + 1e-3) * gamma + beta, 0.0)
  expected = act.mean(axis=(1, 2)) @ fc_w.T + fc_b
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  "edit, match", [("drop", "missing"), ("extra", "unexpected"), ("transpose", "shape")]
)
def test_converter_rejects_wrong_state_dicts(convert, shapes, random_flat, edit, match):
  state_dict = convert.to_state_dict(random_flat, shapes)
  if edit == "drop":
    del state_dict["Mixed_7c.branch_pool.bn.running_var"]
  elif edit == "extra":
    state_dict["AuxLogits.fc.weight"] = np.zeros((1008, 768))
  else:
    state_dict["Mixed_6b.branch7x7_2.conv.weight"] = np.zeros((128, 128, 7, 1))
  with pytest.raises(ValueError, match=match):
    convert.convert_state_dict(state_dict, shapes)


@pytest.mark.parametrize("path", ["", "/nonexistent/inception_fid.npz"])
def test_missing_weights_message(path):
  with pytest.raises(ValueError) as info:
    inception.load_inception_params(path)
  message = str(info.value)
  assert "\n" not in message and f"eval.inception_weights={path!r}" in message
  assert (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
  ) in message
  target = path or "inception_fid.npz"
  assert (
    f"python scripts/convert_inception_weights.py "
    f"--input=pt_inception-2015-12-05-6726825d.pth --output={target}"
  ) in message


def test_converter_cli_refuses_bad_paths(convert, tmp_path, capsys):
  existing = tmp_path / "inception_fid.npz"
  existing.write_bytes(b"user data")
  weights = tmp_path / "weights.pth"
  weights.write_bytes(b"not checked before the output")
  for argv, match in (
    ([f"--input={tmp_path}/absent.pth", "--output=x.npz"], "is not a file"),
    ([f"--input={weights}", f"--output={existing}"], "already exists"),
  ):
    with pytest.raises(SystemExit):
      convert.main(argv)
    assert match in capsys.readouterr().err
  assert existing.read_bytes() == b"user data"  # Never overwritten without --overwrite.


def test_load_rejects_wrong_file(tmp_path):
  path = str(tmp_path / "other.npz")
  np.savez(path, **{"params/fc/kernel": np.zeros((2048, 1008), np.float32)})
  with pytest.raises(ValueError, match="missing"):
    inception.load_inception_params(path)


def test_extractor(shapes):
  variables = traverse_util.unflatten_dict(
    {k: np.zeros(s, np.float32) for k, s in shapes.items()}, sep="/"
  )
  extractor = inception.inception_feature_extractor(variables)
  assert isinstance(extractor, features_lib.FeatureExtractor)
  assert extractor.feature_dim == 2048 and extractor.name == "inception-2015-12-05-pool3-tf"
  assert extractor.name == inception.FEATURES_NAME
  torch_style = inception.inception_feature_extractor(variables, preprocess="pytorch_fid")
  assert torch_style.name == "inception-2015-12-05-pool3-pytorch_fid"  # Never shares caches.
  assert "1008" in extractor.logits_name
  extractor.check_images((5, 32, 32, 3))
  extractor.check_images((5, 28, 28, 1))
  with pytest.raises(ValueError, match="channels"):
    extractor.check_images((5, 32, 32, 4))


def test_weights_without_logits(shapes, random_flat, tmp_path):
  """A weights file without fc/* (converted default_1.pt) gives pool3 and logits None."""
  trunk = {k: v for k, v in random_flat.items() if not k.startswith("params/fc/")}
  assert set(trunk) == set(inception.variable_shapes(with_logits=False))
  path = str(tmp_path / "pool3_only.npz")
  np.savez(path, **trunk)
  variables = inception.load_inception_params(path)
  assert not inception.has_logits(variables)
  extractor = inception.inception_feature_extractor(variables)
  assert extractor.logits_name is None
  pool3, logits = jax.eval_shape(
    extractor.apply_fn, variables, jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.uint8)
  )
  chex.assert_shape(pool3, (2, 2048))
  assert logits is None
  np.savez(path, **trunk, **{"params/fc/kernel": random_flat["params/fc/kernel"]})
  with pytest.raises(ValueError, match=r"missing \['params/fc/bias'\]"):
    inception.load_inception_params(path)  # Half a logits layer is an error.


def _to_torchscript_state_dict(convert, flat):
  """The inverse of convert_torchscript_state_dict, for synthetic default_1.pt tensors."""
  state_dict = {}
  for layer, block in convert.torchscript_layer_names().items():
    state_dict[f"{layer}.weight"] = np.transpose(flat[f"params/{block}/conv/kernel"], (3, 2, 0, 1))
    state_dict[f"{layer}.beta"] = flat[f"params/{block}/bn/bias"]
    state_dict[f"{layer}.mean"] = flat[f"batch_stats/{block}/bn/mean"]
    state_dict[f"{layer}.var"] = flat[f"batch_stats/{block}/bn/var"]
  return state_dict


def test_torchscript_mapping_is_one_to_one(convert, random_flat):
  names = convert.torchscript_layer_names()
  assert len(names) == 94 and len(set(names.values())) == 94
  assert names["net.layers.mixed_4.tower.conv_1"] == "Mixed_6b/branch7x7_2"
  assert names["net.layers.mixed_10.tower_2_conv"] == "Mixed_7c/branch_pool"
  state_dict = _to_torchscript_state_dict(convert, random_flat)
  flat = convert.convert_torchscript_state_dict(state_dict)
  trunk_shapes = inception.variable_shapes(with_logits=False)
  assert set(flat) == set(trunk_shapes)
  for key, value in flat.items():
    if key.endswith("/bn/scale"):
      np.testing.assert_array_equal(value, 1.0)  # The TF graph's BatchNorm has no scale.
    else:
      np.testing.assert_array_equal(value, random_flat[key])


@pytest.mark.parametrize(
  "edit, match", [("drop", "missing"), ("extra", "unexpected"), ("transpose", "shape")]
)
def test_torchscript_converter_rejects_wrong_state_dicts(convert, random_flat, edit, match):
  state_dict = _to_torchscript_state_dict(convert, random_flat)
  if edit == "drop":
    del state_dict["net.layers.mixed_9.tower_1_mixed_conv.var"]
  elif edit == "extra":
    state_dict["net.layers.mixed_9.tower_1_mixed_conv.gamma"] = np.ones(384)
  else:
    state_dict["net.layers.mixed_4.tower.conv_1.weight"] = np.zeros((128, 128, 7, 1))
  with pytest.raises(ValueError, match=match):
    convert.convert_torchscript_state_dict(state_dict)


_BN_CODE = """def forward(self, x: Tensor) -> Tensor:
  _0 = __torch__.torch.nn.functional.batch_norm
  x0 = torch.conv2d(x, _1, None, [stride, stride], [padding, padding])
  x1 = _0(x0, mean, var, {weight}, beta, False, 0.10000000000000001, {eps}, )
  return __torch__.torch.nn.functional.relu(x1, False, )
"""


@pytest.mark.parametrize(
  "weight, eps, match",
  [
    ("None", "0.001", None),
    ("None", "1.0000000000000001e-05", "eps"),
    ("gamma", "0.001", "without scale"),
  ],
)
def test_torchscript_batch_norm_check(convert, weight, eps, match):
  code = _BN_CODE.format(weight=weight, eps=eps)
  if match is None:
    convert.check_torchscript_batch_norm("net.layers.conv", code)
  else:
    with pytest.raises(ValueError, match=match):
      convert.check_torchscript_batch_norm("net.layers.conv", code)
  with pytest.raises(ValueError, match="no batch_norm call"):
    convert.check_torchscript_batch_norm("net.layers.conv", "def forward(self, x): return x")
