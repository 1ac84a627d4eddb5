"""Readers of DDPM's image sources: files, tfds datasets and the synthetic source.

`input_pipeline` validates the config and turns these sources into batches; this module only
reads: "fashion_mnist_files" parses Debian's dataset-fashion-mnist idx files (images and
labels); the small tfds datasets (cifar10, fashion_mnist) are read whole into host memory;
large ones (celeb_a_hq/256, lsun/*) are opened as tf.data streams of encoded images, LSUN
center-cropped and resized (§4); "synthetic" needs no files. Images are uint8 0..255, the
paper's data before the [-1, 1] scaling (Ho et al. 2020, §3.3). Only the tfds readers import
TensorFlow, lazily.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from typing import Callable

import jax
import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
APT_HINT = "install the Debian package with `apt-get install dataset-fashion-mnist`"
SYNTHETIC_NUM_EXAMPLES = {"train": 50_000, "test": 10_000}
_IDX3_MAGIC = 2051
# Keeps the synthetic images' random stream apart from input_pipeline's (tags 1-3).
_SYNTH_TAG = 4


def image_shape(data_config) -> tuple[int, int, int]:
  """(H, W, C) of the images that config.data asks for."""
  return (data_config.image_size, data_config.image_size, data_config.num_channels)


def fashion_mnist_path(data_dir: str, split: str) -> str:
  """The idx images file of a split, under data_dir or else FASHION_MNIST_DIR."""
  return os.path.join(data_dir or FASHION_MNIST_DIR, FASHION_MNIST_FILES[split])


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """A random-access split: `gather(int64 indices [n]) -> uint8 [n, H, W, C]`."""
  num_examples: int
  gather: Callable[[np.ndarray], np.ndarray]


def read_idx_images(path: str) -> np.ndarray:
  """Parses a gzip'd idx3-ubyte image file (the MNIST / Fashion-MNIST format).

  Returns:
    uint8 array [N, rows, cols, 1].
  Raises:
    ValueError: the file is not gzip, has the wrong magic number or a size that does not
      match its header.
  """
  try:
    with gzip.open(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(f"{path} is not a readable gzip idx file ({e})") from e
  if len(data) < 16:
    raise ValueError(f"{path} is corrupt: {len(data)} bytes, shorter than the 16-byte idx header")
  magic, n, rows, cols = (int(v) for v in np.frombuffer(data[:16], dtype=">u4"))
  if magic != _IDX3_MAGIC:
    raise ValueError(f"{path} has magic number {magic}, expected {_IDX3_MAGIC} (idx3 uint8 "
                     "images); the file is corrupt or not an images file")
  expected = 16 + n * rows * cols
  if len(data) != expected:
    raise ValueError(f"{path} is corrupt: its header says {n}x{rows}x{cols} images "
                     f"({expected} bytes) but it holds {len(data)} bytes")
  return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols, 1)


def _import_tfds():
  """Imports TensorFlow and tfds lazily; keeps TF off the accelerators JAX uses."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices.
    pass
  return tf, tfds


def _load_tfds_numpy(name: str, split: str, data_dir: str) -> np.ndarray:
  """Reads a whole (small) tfds split into memory, in the split's stored order."""
  _, tfds = _import_tfds()
  ds = tfds.load(name, split=split, data_dir=data_dir or None, shuffle_files=False)
  batches = [b["image"] for b in tfds.as_numpy(ds.batch(4096))]
  if not batches:
    raise ValueError(f"tfds split {name}:{split} is empty")
  return np.concatenate(batches)


def _load_fashion_mnist_files(data_dir: str, split: str) -> np.ndarray:
  path = fashion_mnist_path(data_dir, split)
  if os.path.isfile(path):
    return read_idx_images(path)
  message = (f"Fashion-MNIST file {path} not found; {APT_HINT} or set data.data_dir to the "
             "folder of the idx files")
  if data_dir:
    raise ValueError(message)
  try:  # Without the Debian files, tfds may still have (or download) fashion_mnist.
    return _load_tfds_numpy("fashion_mnist", split, "")
  except Exception as e:  # pylint: disable=broad-except
    first_line = (str(e).strip().splitlines() or [""])[0]
    raise ValueError(f"{message}; the tfds 'fashion_mnist' fallback failed too: "
                     f"{type(e).__name__}: {first_line}") from e


def _synthetic_source(split: str, shape: tuple[int, int, int]) -> ArraySource:
  """Fixed random images: example i is drawn from its own generator, so any subset is cheap."""
  split_id = sorted(SYNTHETIC_NUM_EXAMPLES).index(split)

  size = int(np.prod(shape))

  def gather(indices: np.ndarray) -> np.ndarray:
    out = np.empty((len(indices), size), np.uint8)
    for row, i in enumerate(indices):  # Raw 64-bit draws viewed as bytes: ~10x integers().
      bits = np.random.default_rng((_SYNTH_TAG, split_id, int(i))).bit_generator
      out[row] = bits.random_raw(-(-size // 8)).view(np.uint8)[:size]
    return out.reshape((len(indices),) + shape)

  return ArraySource(SYNTHETIC_NUM_EXAMPLES[split], gather)


def array_source(data_config, split: str) -> ArraySource:
  """Builds the in-memory / random-access source of a split (not for streamed datasets)."""
  shape = image_shape(data_config)
  if data_config.dataset == "synthetic":
    return _synthetic_source(split, shape)
  if data_config.dataset == "fashion_mnist_files":
    images = _load_fashion_mnist_files(data_config.data_dir, split)
  else:
    images = _load_tfds_numpy(data_config.dataset, split, data_config.data_dir)
  if images.dtype != np.uint8 or images.shape[1:] != shape or not len(images):
    raise ValueError(f"{data_config.dataset}:{split} holds {images.dtype} images of shape "
                     f"{images.shape}; expected uint8 [N>0, {', '.join(map(str, shape))}]")
  images.flags.writeable = False
  return ArraySource(len(images), lambda indices: images[indices])


def center_crop_and_resize(image, size: int):
  """Center-crops a [H, W, C] tf image to a square and area-resizes it to size x size uint8.

  LSUN images vary in size; the paper trains on them at 256x256 (§4). The shorter side is
  kept whole, the longer one is cropped symmetrically; the area resize averages (antialiases).
  """
  tf, _ = _import_tfds()
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  side = tf.minimum(height, width)
  image = tf.image.crop_to_bounding_box(image, (height - side) // 2, (width - side) // 2,
                                        side, side)
  image = tf.image.resize(image, [size, size], method="area", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def tfds_stream(data_config, split: str, per_process: bool = False):
  """(tf, tfds, dataset of encoded image bytes in stored order, decode fn) of a split.

  With `per_process`, each process reads only its own even part of the split.
  """
  tf, tfds = _import_tfds()
  if per_process and jax.process_count() > 1:
    split = tfds.split_for_jax_process(split, process_index=jax.process_index(),
                                       process_count=jax.process_count())
  ds = tfds.load(data_config.dataset, split=split, data_dir=data_config.data_dir or None,
                 shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
  ds = ds.map(lambda example: example["image"])
  size, channels = data_config.image_size, data_config.num_channels
  resize = data_config.dataset.startswith("lsun/")

  def decode(encoded):
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    image = center_crop_and_resize(image, size) if resize else image
    return tf.ensure_shape(image, [size, size, channels])

  return tf, tfds, ds, decode


def read_labeled_arrays(data_config, split: str,
                        num_examples: int = -1) -> tuple[np.ndarray, np.ndarray]:
  """Reads the first `num_examples` (-1: all) of an in-memory split with its class labels.

  The reader behind `input_pipeline.load_labeled_arrays`, which validates the config, split
  and num_examples first (and documents the label sources); call that instead.

  Returns:
    (uint8 images [N, H, W, C], int32 labels [N]).
  Raises:
    ValueError: label files that are corrupt or do not match, or num_examples above N.
  """
  dataset = data_config.dataset
  shape = image_shape(data_config)

  def read_idx_labels(path: str) -> np.ndarray:
    try:
      with gzip.open(path, "rb") as f:
        data = f.read()
    except (OSError, EOFError) as e:
      raise ValueError(f"{path} is not a readable gzip idx file ({e})") from e
    header = np.frombuffer(data[:8], dtype=">u4") if len(data) >= 8 else np.array([0, 0])
    magic, n = int(header[0]), int(header[1])
    if magic != 2049 or len(data) != 8 + n:
      raise ValueError(f"{path} is not an idx1 label file (magic {magic}, expected 2049, "
                       f"{len(data)} bytes for {n} labels); the file is corrupt")
    return np.frombuffer(data, dtype=np.uint8, offset=8)

  def load_tfds(name: str, tfds_split: str) -> tuple[np.ndarray, np.ndarray]:
    _, tfds = _import_tfds()
    ds = tfds.load(name, split=tfds_split, data_dir=data_config.data_dir or None,
                   shuffle_files=False)
    batches = list(tfds.as_numpy(ds.batch(4096)))
    if not batches:
      raise ValueError(f"tfds split {name}:{tfds_split} is empty")
    return (np.concatenate([b["image"] for b in batches]),
            np.concatenate([b["label"] for b in batches]))

  if dataset == "synthetic":
    available = SYNTHETIC_NUM_EXAMPLES[split]
    if num_examples > available:
      raise ValueError(f"num_examples={num_examples} exceeds the {available} examples of "
                       f"{split!r}")
    indices = np.arange(available if num_examples == -1 else num_examples, dtype=np.int64)
    images, labels = _synthetic_source(split, shape).gather(indices), indices % 10
  elif dataset == "fashion_mnist_files":
    directory = data_config.data_dir or FASHION_MNIST_DIR
    image_path = fashion_mnist_path(data_config.data_dir, split)
    label_path = os.path.join(directory, FASHION_MNIST_FILES[split].replace("images-idx3",
                                                                            "labels-idx1"))
    if os.path.isfile(image_path) or data_config.data_dir:
      images = _load_fashion_mnist_files(data_config.data_dir, split)
      if not os.path.isfile(label_path):
        raise ValueError(f"Fashion-MNIST label file {label_path} not found next to the "
                         f"images; {APT_HINT}")
      labels = read_idx_labels(label_path)
    else:  # Neither the Debian files nor a data_dir: tfds, as for the images.
      try:
        images, labels = load_tfds("fashion_mnist", split)
      except Exception as e:  # pylint: disable=broad-except
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"Fashion-MNIST file {image_path} not found; {APT_HINT}; the tfds "
                         f"'fashion_mnist' fallback failed too: {type(e).__name__}: "
                         f"{first_line}") from e
  else:
    images, labels = load_tfds(dataset, split)
  if images.dtype != np.uint8 or images.shape[1:] != shape or labels.shape != images.shape[:1]:
    raise ValueError(f"{dataset}:{split} holds {images.dtype} images of shape {images.shape} "
                     f"and labels of shape {labels.shape}; expected uint8 [N, "
                     f"{', '.join(map(str, shape))}] and [N]")
  if num_examples > len(images):
    raise ValueError(f"num_examples={num_examples} exceeds the {len(images)} examples of "
                     f"{split!r}")
  if num_examples != -1:
    images, labels = images[:num_examples], labels[:num_examples]
  return np.ascontiguousarray(images), labels.astype(np.int32)
