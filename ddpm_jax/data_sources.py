"""Readers of DDPM's image sources, one per `DatasetSpec.reader` (datasets.py).

"idx_files" parses Debian's dataset-fashion-mnist idx files (images and labels), falling back to
tfds "fashion_mnist" when they are absent; "tfds" reads small datasets (cifar10, fashion_mnist)
whole into host memory and opens large ones (celeb_a_hq/256, lsun/*) as tf.data streams of encoded
images, LSUN prepared as the official runs' data (centre crop, PIL Lanczos resize:
`stylegan_crop_resize`); "synthetic" needs no files. Images are uint8 0..255, the paper's data
before the [-1, 1] scaling (Ho et al. 2020, §3.3). Only the tfds readers import TensorFlow, lazily.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging as absl_logging

from ddpm_jax import datasets
from ddpm_jax import rng as rng_lib
from ddpm_jax.errors import ConfigError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
APT_HINT = "install the Debian package with `apt-get install dataset-fashion-mnist`"
SYNTHETIC_NUM_EXAMPLES = {"train": 50_000, "test": 10_000}
OFFLINE_QUICK_START = (
  "python main.py --config=configs/fashion_mnist.py --workdir=workdirs/fashion_mnist"
)
_PROBE_TIMEOUT_S = 5.0
# idx magic numbers: 0x08 (unsigned bytes) << 8 | number of dimensions.
_IDX_IMAGES, _IDX_LABELS = 2051, 2049


def image_shape(data_config) -> tuple[int, int, int]:
  """(H, W, C) of the images that config.data asks for."""
  return (data_config.image_size, data_config.image_size, data_config.num_channels)


def fashion_mnist_path(data_dir: str, split: str, kind: str = "images") -> str:
  """The idx file of a split's images or labels, under data_dir or else FASHION_MNIST_DIR."""
  name = FASHION_MNIST_FILES[split]
  return os.path.join(
    data_dir or FASHION_MNIST_DIR,
    name if kind == "images" else name.replace("images-idx3", "labels-idx1"),
  )


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """A random-access split: `gather(int64 indices [n]) -> uint8 [n, H, W, C]`."""

  num_examples: int
  gather: Callable[[np.ndarray], np.ndarray]


def _read_idx(path: str, magic: int) -> np.ndarray:
  """Parses a gzip'd idx file of unsigned bytes with the given magic number (the MNIST /
  Fashion-MNIST format: a big-endian header of the magic and the dimensions, then data)."""
  try:
    with gzip.open(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise ConfigError(f"{path} is not a readable gzip idx file ({e})") from e
  ndim = magic & 0xFF
  header = 4 * (1 + ndim)
  if len(data) < header:
    raise ConfigError(
      f"{path} is corrupt: {len(data)} bytes, shorter than the {header}-byte idx header"
    )
  found, *dims = (int(v) for v in np.frombuffer(data[:header], dtype=">u4"))
  if found != magic:
    kind = "images" if magic == _IDX_IMAGES else "labels"
    raise ConfigError(
      f"{path} has magic number {found}, expected {magic} (idx uint8 {kind}); "
      "the file is corrupt or of another kind"
    )
  expected = header + int(np.prod(dims))
  if len(data) != expected:
    raise ConfigError(
      f"{path} is corrupt: its header says {'x'.join(map(str, dims))} "
      f"({expected} bytes) but it holds {len(data)} bytes"
    )
  return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_images(path: str) -> np.ndarray:
  """uint8 images [N, rows, cols, 1] of an idx3-ubyte.gz file; ConfigError if corrupt."""
  return _read_idx(path, _IDX_IMAGES)[..., None]


def read_idx_labels(path: str) -> np.ndarray:
  """uint8 labels [N] of an idx1-ubyte.gz file; ConfigError if corrupt."""
  return _read_idx(path, _IDX_LABELS)


def _import_tfds():
  """Imports TensorFlow and tfds lazily; keeps TF off the accelerators JAX uses."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ INFO / WARNING lines.
  import tensorflow as tf
  import tensorflow_datasets as tfds

  with contextlib.suppress(RuntimeError):  # TF already initialised its devices.
    tf.config.set_visible_devices([], "GPU")
  return tf, tfds


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
  """tfds logs a WARNING for every empty dataset folder it looks at; a check says it once."""
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(level)


def _unreachable(url: str) -> str | None:
  """Why an HTTP(S) server cannot be reached at ``url`` (None: it answered, any status).

  A HEAD request through the environment's proxies, timing out after _PROBE_TIMEOUT_S:
  offline, tfds' own download retries for minutes before it gives up."""
  try:
    urllib.request.urlopen(
      urllib.request.Request(url, method="HEAD"), timeout=_PROBE_TIMEOUT_S
    ).close()
  except urllib.error.HTTPError:
    return None
  except (urllib.error.URLError, OSError, ValueError) as e:
    return " ".join(str(getattr(e, "reason", e)).split())
  return None


def _tfds_problem(name: str, data_dir: str) -> tuple[Any, str | None]:
  """(builder, why the dataset can be neither read nor downloaded here, or None).

  Needs tensorflow_datasets only: TensorFlow itself is not imported by this check."""
  import tensorflow_datasets as tfds

  with _quiet_absl():
    builder = tfds.builder(name, data_dir=data_dir or None)
    prepared = builder.is_prepared()
  if prepared:
    return builder, None
  where = (
    f"data.data_dir={data_dir!r}"
    if data_dir
    else f"tfds' default data_dir {os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')}"
  )
  build = (
    f"run `tfds build {name} --data_dir=DIR` on a machine with internet, copy DIR here "
    "and pass --config.data.data_dir=DIR"
  )
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    return builder, (
      f"tfds dataset {name!r} is not prepared in {where} and needs a manual "
      f"download: {build.replace('tfds build', 'tfds build --manual_dir=...')} "
      f"(see the tfds catalog page of {name})"
    )
  urls = list(getattr(builder, "url_infos", None) or {})
  why = _unreachable(urls[0]) if urls else None
  if why is None:
    return builder, None
  return builder, (
    f"tfds dataset {name!r} is not prepared in {where} and its download site "
    f"{urllib.parse.urlparse(urls[0]).netloc} cannot be reached ({why}): "
    f"{build}; or, offline, start with Fashion-MNIST: {OFFLINE_QUICK_START}"
  )


def prepare(data_config, splits: Sequence[str]) -> None:
  """Makes sure the data of ``splits`` can be read, before any compute or workdir write.

  Files must exist; a tfds dataset must be prepared in data_dir or downloadable, and is
  downloaded and prepared now if it is not yet (with the network down, this fails within
  seconds rather than after tfds' minutes of retries). ConfigError naming the dataset, the
  folder and what to do otherwise.
  """
  spec = datasets.get(data_config.dataset)
  if spec.reader == "synthetic":
    return
  name, data_dir = spec.tfds_name or spec.name, data_config.data_dir
  if spec.reader == "idx_files":
    missing = [
      fashion_mnist_path(data_dir, s)
      for s in splits
      if not os.path.isfile(fashion_mnist_path(data_dir, s))
    ]
    if not missing:
      return
    if data_dir:
      raise ConfigError(
        f"Fashion-MNIST file {missing[0]} not found; {APT_HINT} or set "
        "data.data_dir to the folder of the idx files"
      )
    data_dir = ""  # Without the Debian files, tfds' fashion_mnist is the fallback.
  builder, problem = _tfds_problem(name, data_dir)
  if problem is not None:
    prefix = (
      f"Fashion-MNIST files not found under {FASHION_MNIST_DIR} ({APT_HINT}) and "
      if spec.reader == "idx_files"
      else ""
    )
    raise ConfigError(prefix + problem)
  with _quiet_absl():
    prepared = builder.is_prepared()
  if prepared:
    return
  try:
    builder.download_and_prepare()
  except Exception as e:  # Broad on purpose: any download or build failure.
    first_line = (str(e).strip().splitlines() or [""])[0][:300]
    raise ConfigError(
      f"tfds could not download and prepare {name!r} into "
      f"{data_dir or 'its default data_dir'}: {type(e).__name__}: {first_line}"
    ) from e


def _read_tfds(
  name: str, split: str, data_dir: str, labels: bool
) -> tuple[np.ndarray, np.ndarray | None]:
  """A whole (small) tfds split in memory, in its stored order: images (and labels)."""
  _, tfds = _import_tfds()
  ds = tfds.load(name, split=split, data_dir=data_dir or None, shuffle_files=False)
  batches = list(tfds.as_numpy(ds.batch(4096)))
  if not batches:
    raise ConfigError(f"tfds split {name}:{split} is empty")
  images = np.concatenate([b["image"] for b in batches])
  return images, (np.concatenate([b["label"] for b in batches]) if labels else None)


def _read_idx_files(
  data_dir: str, split: str, labels: bool
) -> tuple[np.ndarray, np.ndarray | None]:
  """Fashion-MNIST from its idx files; without them and without a data_dir, from tfds."""
  path = fashion_mnist_path(data_dir, split)
  if os.path.isfile(path):
    label_path = fashion_mnist_path(data_dir, split, "labels")
    if labels and not os.path.isfile(label_path):
      raise ConfigError(
        f"Fashion-MNIST label file {label_path} not found next to the images; {APT_HINT}"
      )
    return read_idx_images(path), (read_idx_labels(label_path) if labels else None)
  message = (
    f"Fashion-MNIST file {path} not found; {APT_HINT} or set data.data_dir to the "
    "folder of the idx files"
  )
  if data_dir:
    raise ConfigError(message)
  try:  # Without the Debian files, tfds may still have (or download) fashion_mnist.
    return _read_tfds("fashion_mnist", split, "", labels)
  except Exception as e:
    first_line = (str(e).strip().splitlines() or [""])[0]
    raise ConfigError(
      f"{message}; the tfds 'fashion_mnist' fallback failed too: {type(e).__name__}: {first_line}"
    ) from e


def _synthetic_source(split: str, shape: tuple[int, int, int]) -> ArraySource:
  """Fixed random images: example i is drawn from its own generator, so any subset is cheap."""
  split_id = sorted(SYNTHETIC_NUM_EXAMPLES).index(split)
  size = int(np.prod(shape))

  def gather(indices: np.ndarray) -> np.ndarray:
    out = np.empty((len(indices), size), np.uint8)
    for row, i in enumerate(indices):  # Raw 64-bit draws viewed as bytes: ~10x integers().
      bits = rng_lib.host_rng(rng_lib.HostStream.SYNTHETIC, split_id, i).bit_generator
      out[row] = bits.random_raw(-(-size // 8)).view(np.uint8)[:size]
    return out.reshape((len(indices),) + shape)

  return ArraySource(SYNTHETIC_NUM_EXAMPLES[split], gather)


def _read_arrays(data_config, split: str, labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
  """A whole in-memory split (images, labels or None) from the dataset's reader."""
  spec = datasets.get(data_config.dataset)
  shape = image_shape(data_config)
  if spec.reader == "synthetic":
    source = _synthetic_source(split, shape)
    indices = np.arange(source.num_examples, dtype=np.int64)
    images, label_array = source.gather(indices), indices % 10
  elif spec.reader == "idx_files":
    images, label_array = _read_idx_files(data_config.data_dir, split, labels)
  else:
    images, label_array = _read_tfds(
      spec.tfds_name or spec.name, split, data_config.data_dir, labels
    )
  if (
    images.dtype != np.uint8
    or images.shape[1:] != shape
    or not len(images)
    or (labels and label_array.shape != images.shape[:1])
  ):
    got = f"labels of shape {label_array.shape} and " if labels else ""
    raise ConfigError(
      f"{spec.name}:{split} holds {got}{images.dtype} images of shape "
      f"{images.shape}; expected uint8 [N>0, {', '.join(map(str, shape))}]"
      + (" and labels [N]" if labels else "")
    )
  return images, label_array


def array_source(data_config, split: str) -> ArraySource:
  """The random-access source of an in-memory split (not for streamed datasets)."""
  if datasets.get(data_config.dataset).reader == "synthetic":
    return _synthetic_source(split, image_shape(data_config))
  images, _ = _read_arrays(data_config, split, labels=False)
  images.flags.writeable = False
  return ArraySource(len(images), lambda indices: images[indices])


def labeled_arrays(data_config, split: str, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
  """The first ``num_examples`` (-1: all) uint8 images [N, H, W, C] of an in-memory split and
  their int32 labels [N], in the split's stored order."""
  spec = datasets.get(data_config.dataset)
  if spec.reader == "synthetic":  # Generate only what is asked for.
    source = _synthetic_source(split, image_shape(data_config))
    count = source.num_examples if num_examples == -1 else num_examples
    if count > source.num_examples:
      raise ConfigError(
        f"num_examples={count} exceeds the {source.num_examples} examples of {split!r}"
      )
    indices = np.arange(count, dtype=np.int64)
    return source.gather(indices), (indices % 10).astype(np.int32)
  images, labels = _read_arrays(data_config, split, labels=True)
  if num_examples > len(images):
    raise ConfigError(
      f"num_examples={num_examples} exceeds the {len(images)} examples of {split!r}"
    )
  if num_examples != -1:
    images, labels = images[:num_examples], labels[:num_examples]
  return np.ascontiguousarray(images), labels.astype(np.int32)


def stylegan_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """The LSUN preparation of the official runs: uint8 [H, W, 3] -> [size, size, 3].

  The paper's LSUN models (§4, Table 3) trained on StyleGAN2's dataset_tool output
  (create_lsun): the centre square of side min(H, W), rows and columns
  [(n - side) // 2, (n + side) // 2), resized with PIL's Lanczos filter ("ANTIALIAS" in
  older Pillow). A square image of the target size passes through unchanged.
  """
  from PIL import Image

  height, width = image.shape[:2]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  square = np.ascontiguousarray(image[top : top + side, left : left + side])
  return np.asarray(Image.fromarray(square, "RGB").resize((size, size), Image.LANCZOS))


def tfds_stream(data_config, split: str, per_process: bool = False):
  """(tf, tfds, dataset of encoded image bytes in stored order, decode fn) of a split.

  With `per_process`, each process reads only its own even part of the split.
  """
  tf, tfds = _import_tfds()
  if per_process and jax.process_count() > 1:
    split = tfds.split_for_jax_process(
      split, process_index=jax.process_index(), process_count=jax.process_count()
    )
  ds = tfds.load(
    data_config.dataset,
    split=split,
    data_dir=data_config.data_dir or None,
    shuffle_files=False,
    decoders={"image": tfds.decode.SkipDecoding()},
  )
  ds = ds.map(lambda example: example["image"])
  size, channels = data_config.image_size, data_config.num_channels
  prepare_lsun = datasets.get(data_config.dataset).preparation == datasets.STYLEGAN_LSUN

  def decode(encoded):
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    if prepare_lsun:  # PIL on the host, in tf.data's parallel map (Pillow drops the GIL).
      image = tf.numpy_function(
        lambda x: stylegan_crop_resize(x, size), [image], tf.uint8, stateful=False
      )
    return tf.ensure_shape(image, [size, size, channels])

  return tf, tfds, ds, decode
