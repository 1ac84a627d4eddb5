"""How a uint8 image becomes the input of the FID Inception network (inception.py).

"tf" is what the TF 2015-12-05 graph itself does before its first convolution in TTUR and
OpenAI's code, hence the paper's numbers: TF's legacy ResizeBilinear to 299x299
(`align_corners=False, half_pixel_centers=False`) and (x - 128) / 128. "pytorch_fid" is
pytorch-fid's half-pixel bilinear resize and x / 127.5 - 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
PREPROCESSINGS = ("tf", "pytorch_fid")


def check_preprocess(preprocess: str) -> str:
  """Returns `preprocess` if it names an input protocol, else raises a one-line ValueError."""
  if preprocess not in PREPROCESSINGS:
    raise ValueError(f"preprocess={preprocess!r} is unknown; allowed: {', '.join(PREPROCESSINGS)}")
  return preprocess


def legacy_resize_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Sampling taps of TF's legacy bilinear resize along one axis.

  With `align_corners=False, half_pixel_centers=False` output pixel i reads the input at
  s = i * (in_size / out_size), the scale and the product both in float32 as TF's
  ResizeBilinear kernel. Returns int32 (floor(s), min(floor(s) + 1, in_size - 1)) and the
  float32 weight s - floor(s) of the second tap, each [out_size].
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"resize sizes must be >= 1, got in_size={in_size}, out_size={out_size}")
  scale = np.float32(in_size) / np.float32(out_size)
  source = np.arange(out_size, dtype=np.float32) * scale
  floor = np.floor(source)
  lower = floor.astype(np.int32)
  upper = np.minimum(lower + 1, in_size - 1).astype(np.int32)
  return lower, upper, (source - floor).astype(np.float32)


def resize_bilinear_tf_legacy(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """TF1's `resize_bilinear(images, size, align_corners=False, half_pixel_centers=False)`.

  images: [N, H, W, C] (uint8 or float); returns float32 [N, size[0], size[1], C]. Each
  output pixel gathers its 2x2 input neighbours (`legacy_resize_taps` per axis) and blends
  them as TF does, in float32: along the width in the top and bottom rows, then between
  those along the height.
  """
  x = jnp.asarray(images).astype(jnp.float32)
  y_lo, y_hi, y_frac = legacy_resize_taps(x.shape[1], size[0])
  x_lo, x_hi, x_frac = legacy_resize_taps(x.shape[2], size[1])
  x_frac = jnp.asarray(x_frac)[None, None, :, None]

  def blend_columns(rows: jax.Array) -> jax.Array:
    left, right = jnp.take(rows, x_lo, axis=2), jnp.take(rows, x_hi, axis=2)
    return left + (right - left) * x_frac

  top = blend_columns(jnp.take(x, y_lo, axis=1))
  bottom = blend_columns(jnp.take(x, y_hi, axis=1))
  return top + (bottom - top) * jnp.asarray(y_frac)[None, :, None, None]


def preprocess_tf(images: jax.Array, resize: bool = True) -> jax.Array:
  """uint8 images [N, H, W, C in {1, 3}] -> float32 [N, 299, 299, 3] in [-1, 127/128].

  As the TF 2015-12-05 graph that TTUR and the OpenAI IS code feed with uint8 images: cast
  to float, legacy ResizeBilinear to 299x299 (`resize_bilinear_tf_legacy`; skipped for
  299x299 inputs, where it is the identity), then (x - 128) / 128. Grayscale images are
  replicated to 3 channels.
  """
  x = jnp.asarray(images).astype(jnp.float32)
  if resize and x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    x = resize_bilinear_tf_legacy(x, (INPUT_SIZE, INPUT_SIZE))
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return (x - 128.0) / 128.0


def preprocess_pytorch_fid(images: jax.Array, resize: bool = True) -> jax.Array:
  """uint8 / [0, 255] images [N, H, W, C in {1, 3}] -> float32 [N, 299, 299, 3] in [-1, 1].

  As pytorch-fid: scale to [0, 1], bilinear resize to 299x299 with half-pixel centres and
  no anti-aliasing (`F.interpolate(mode='bilinear', align_corners=False)`), then 2x - 1.
  Grayscale images are replicated to 3 channels.
  """
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if resize and x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False)
  return 2.0 * x - 1.0


def preprocess(images: jax.Array, protocol: str = "tf", resize: bool = True) -> jax.Array:
  """The network input of `images` under `protocol` ("tf" or "pytorch_fid", see above)."""
  if check_preprocess(protocol) == "tf":
    return preprocess_tf(images, resize)
  return preprocess_pytorch_fid(images, resize)
