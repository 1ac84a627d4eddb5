"""The dataset registry: one `DatasetSpec` per value of config.data.dataset.

A spec says where the images come from (its reader in data_sources.py), which splits exist,
the native image shape, whether the dataset is held in host memory or streamed through
tf.data, and whether it has class labels (needed by the classifier feature network of the
FID / IS evaluation). Adding a dataset means adding one spec here (and a reader, if its
source is new).
"""

from __future__ import annotations

import dataclasses
import re

from ddpm_jax.errors import ConfigError

READERS = ("tfds", "idx_files", "synthetic")
# LSUN as the official runs read it: StyleGAN2 dataset_tool's create_lsun (centre square,
# PIL Lanczos resize to data.image_size; data_sources.stylegan_crop_resize).
STYLEGAN_LSUN = "stylegan_center_crop_lanczos"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What ddpm_jax knows of a dataset.

  Attributes:
    name: the config.data.dataset value (the tfds name for tfds datasets).
    reader: "tfds" (tensorflow_datasets), "idx_files" (Debian's Fashion-MNIST idx files,
      falling back to tfds "fashion_mnist" without them) or "synthetic" (no files).
    splits: the split names; tfds splits also take a slice such as train[:1000].
    image_size, num_channels: the native shape, or None where any value works (LSUN is
      centre-cropped and resized to data.image_size; synthetic images have any shape).
    streamed: read through a tf.data stream (large datasets) rather than held in memory.
    labeled: has class labels (synthetic: index % 10, a stand-in that lets the pipeline run).
    tfds_name: the tfds dataset the reader loads (default: ``name``).
    preparation: what is done to each decoded image before use ("" nothing; STYLEGAN_LSUN).
      Part of the FID reference statistics' cache key.
  """

  name: str
  reader: str
  splits: tuple[str, ...]
  image_size: int | None = None
  num_channels: int | None = None
  streamed: bool = False
  labeled: bool = False
  tfds_name: str | None = None
  preparation: str = ""

  def check_split(self, split: str, field: str) -> None:
    """ConfigError unless ``split`` names a split (tfds readers: optionally sliced)."""
    sliceable = self.reader == "tfds"
    match = re.fullmatch(r"([A-Za-z_]+)(\[[^\]]*\])?", split) if isinstance(split, str) else None
    if match is None or match.group(1) not in self.splits or (match.group(2) and not sliceable):
      how = " (optionally sliced, e.g. train[:1000])" if sliceable else ""
      raise ConfigError(
        f"{field}={split!r} is not a split of {self.name!r}; allowed: {', '.join(self.splits)}{how}"
      )


_LSUN = dict(reader="tfds", num_channels=3, streamed=True, preparation=STYLEGAN_LSUN)
SPECS = (
  DatasetSpec("cifar10", "tfds", ("train", "test"), 32, 3, labeled=True),
  DatasetSpec("celeb_a_hq/256", "tfds", ("train",), 256, 3, streamed=True),
  DatasetSpec("lsun/church_outdoor", splits=("train", "validation"), **_LSUN),
  DatasetSpec("lsun/bedroom", splits=("train", "validation"), **_LSUN),
  DatasetSpec("lsun/cat", splits=("train",), **_LSUN),
  DatasetSpec("fashion_mnist", "tfds", ("train", "test"), 28, 1, labeled=True),
  DatasetSpec(
    "fashion_mnist_files",
    "idx_files",
    ("train", "test"),
    28,
    1,
    labeled=True,
    tfds_name="fashion_mnist",
  ),
  DatasetSpec("synthetic", "synthetic", ("train", "test"), labeled=True),
)
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in SPECS}


def get(name: str) -> DatasetSpec:
  """The spec of config.data.dataset ``name``; ConfigError naming the known ones otherwise."""
  if name not in DATASETS:
    raise ConfigError(f"data.dataset={name!r} is unknown; allowed: {', '.join(DATASETS)}")
  return DATASETS[name]
