"""Tests of the Inception input protocols (ddpm_jax.evaluation.inception_input): TF's legacy
bilinear resize and pytorch-fid's resize, each against its reference."""

import chex
import jax
import numpy as np
import pytest

from ddpm_jax.evaluation import inception, inception_input


def _torch_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """F.interpolate(mode='bilinear', align_corners=False) written out for [H, W, C]."""

  def axis(in_size, out_size):
    src = np.maximum((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, src - lo

  y0, y1, wy = axis(image.shape[0], out_h)
  x0, x1, wx = axis(image.shape[1], out_w)
  rows = image[y0] * (1 - wy)[:, None, None] + image[y1] * wy[:, None, None]
  return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


@pytest.mark.parametrize("size", [(7, 5), (320, 301)])
def test_preprocess_matches_pytorch_fid(size):
  image = np.random.default_rng(2).integers(0, 256, (1,) + size + (1,), dtype=np.uint8)
  out = np.asarray(jax.jit(lambda x: inception_input.preprocess(x, "pytorch_fid"))(image))
  chex.assert_shape(out, (1, 299, 299, 3))
  expected = 2.0 * _torch_bilinear(image[0].astype(np.float64) / 255.0, 299, 299) - 1.0
  # Source coordinates are float32 in JAX (as in PyTorch): ~1e-5 relative near 300, so
  # up to ~1e-4 here on a [-1, 1] scale (0.01 grey levels); a wrong formula is off by >0.01.
  for c in range(3):  # Grayscale is replicated.
    np.testing.assert_allclose(out[0, :, :, c], expected[:, :, 0], atol=1e-4)


def _tf_legacy_resize(images: np.ndarray) -> np.ndarray:
  """TensorFlow's own legacy ResizeBilinear to 299x299 (what the 2015-12-05 graph runs)."""
  tf = pytest.importorskip("tensorflow", reason="the legacy-resize reference is TensorFlow's")
  return tf.compat.v1.image.resize_bilinear(
    images, [299, 299], align_corners=False, half_pixel_centers=False
  ).numpy()


@pytest.mark.parametrize(
  "shape", [(3, 28, 28, 1), (3, 32, 32, 3), (3, 64, 48, 3), (2, 320, 301, 3)]
)
def test_tf_legacy_resize_matches_tensorflow(shape):
  images = np.random.default_rng(4).integers(0, 256, shape, dtype=np.uint8)
  rgb = np.repeat(images, 3, axis=-1) if shape[-1] == 1 else images
  expected = _tf_legacy_resize(rgb)
  resized = np.asarray(
    jax.jit(lambda x: inception_input.resize_bilinear_tf_legacy(x, (299, 299)))(rgb)
  )
  # Same taps and blend order as TF's kernel; XLA's fused float32 arithmetic (FMA) leaves at
  # most a few ulps at 255: 4.6e-5 measured, i.e. 3.6e-7 on the network's input scale.
  np.testing.assert_allclose(resized, expected, rtol=0, atol=1e-4)
  # The full "tf" protocol: that resize, grayscale replicated, then (x - 128) / 128.
  out = np.asarray(jax.jit(inception_input.preprocess_tf)(images))
  chex.assert_shape(out, (shape[0], 299, 299, 3))
  np.testing.assert_allclose(out, (expected - 128.0) / 128.0, rtol=0, atol=1e-6)
  assert out.min() >= -1.0 and out.max() <= 127 / 128


def test_legacy_resize_taps_have_no_half_pixel_offset():
  lower, upper, frac = inception_input.legacy_resize_taps(4, 10)
  source = np.arange(10) * 0.4  # dst * in / out: 0, 0.4, 0.8, 1.2, ...
  np.testing.assert_array_equal(lower, np.floor(source).astype(int))
  np.testing.assert_array_equal(upper, np.minimum(lower + 1, 3))
  np.testing.assert_allclose(frac, source - np.floor(source), atol=1e-6)
  out = np.asarray(inception_input.preprocess_tf(np.full((1, 299, 299, 3), 200, np.uint8)))
  np.testing.assert_array_equal(out, 72 / 128)  # 299x299 input: no resize.


def test_preprocess_choice_is_checked():
  with pytest.raises(
    ValueError,
    match=r"preprocess='torch' is unknown; allowed: tf, "
    r"pytorch_fid",
  ):
    inception_input.preprocess(np.zeros((1, 8, 8, 3), np.uint8), "torch")
  with pytest.raises(ValueError, match="unknown"):
    inception.inception_feature_extractor({"params": {}}, preprocess="TF")
