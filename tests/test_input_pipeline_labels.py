"""Tests of ddpm_jax.input_pipeline.load_labeled_arrays (images with class labels).

Expected values come from the data: small idx files written here (random images, known
labels), the published class balance of Fashion-MNIST (6,000 / 1,000 images per class in
train / test), the eval iterator's image order, and tfds.testing.mock_data for tfds.
"""

import os

import numpy as np
import pytest

from ddpm_jax import data_sources as ds
from ddpm_jax import input_pipeline as ip
from tests.conftest import data_config, write_idx

_FASHION_MNIST = ds.FASHION_MNIST_DIR
_LABEL_FILES = {"train": "train-labels-idx1-ubyte.gz", "test": "t10k-labels-idx1-ubyte.gz"}
NUM = {"train": 30, "test": 21}


@pytest.fixture(scope="module")
def fake_files(tmp_path_factory):
  """A data_dir with idx image and label files for both splits, and their contents."""
  folder = tmp_path_factory.mktemp("fashion_labels")
  rng = np.random.default_rng(0)
  contents = {}
  for split, n in NUM.items():
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    write_idx(folder / ds.FASHION_MNIST_FILES[split], [2051, n, 28, 28], images)
    write_idx(folder / _LABEL_FILES[split], [2049, n], labels)
    contents[split] = (images[..., None], labels)
  return str(folder), contents


@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_files(fake_files, split):
  folder, contents = fake_files
  images, labels = ip.load_labeled_arrays(data_config(data_dir=folder), split)
  assert images.dtype == np.uint8 and labels.dtype == np.int32
  np.testing.assert_array_equal(images, contents[split][0])
  np.testing.assert_array_equal(labels, contents[split][1])
  first, first_labels = ip.load_labeled_arrays(data_config(data_dir=folder), split, num_examples=5)
  np.testing.assert_array_equal(first, contents[split][0][:5])
  np.testing.assert_array_equal(first_labels, contents[split][1][:5])


def test_images_in_eval_iterator_order(fake_files):
  folder, _ = fake_files
  config = data_config(data_dir=folder)
  images, _ = ip.load_labeled_arrays(config, "test")
  batches = list(ip.create_eval_iterator(config, global_batch_size=16, split="test"))
  served = np.concatenate([b.reshape((-1, 28, 28, 1))[m.reshape(-1)] for b, m in batches])
  np.testing.assert_array_equal(served, images)


@pytest.mark.parametrize(
  "case, match",
  [
    ("magic", "magic number 2051, expected 2049"),
    ("count", "corrupt"),
    ("mismatch", r"labels of shape \(29,\)"),
    ("absent", "label file .* not found"),
  ],
)
def test_bad_label_files(fake_files, tmp_path, case, match):
  folder, contents = fake_files
  for split in NUM:
    os.symlink(
      os.path.join(folder, ds.FASHION_MNIST_FILES[split]), tmp_path / ds.FASHION_MNIST_FILES[split]
    )
  labels = contents["train"][1]
  path = tmp_path / _LABEL_FILES["train"]
  if case == "magic":
    write_idx(path, [2051, NUM["train"]], labels)
  elif case == "count":
    write_idx(path, [2049, NUM["train"] + 1], labels)
  elif case == "mismatch":
    write_idx(path, [2049, NUM["train"] - 1], labels[:-1])
  with pytest.raises(ValueError, match=match):
    ip.load_labeled_arrays(data_config(data_dir=str(tmp_path)), "train")


@pytest.mark.parametrize(
  "num_examples, match",
  [
    (0, "num_examples=0"),
    (-2, "num_examples=-2"),
    (True, "num_examples=True"),
    (1.5, "num_examples=1.5"),
    (NUM["test"] + 1, "exceeds the 21 examples"),
  ],
)
def test_bad_num_examples(fake_files, num_examples, match):
  folder, _ = fake_files
  with pytest.raises(ValueError, match=match):
    ip.load_labeled_arrays(data_config(data_dir=folder), "test", num_examples=num_examples)


def test_bad_split_and_streamed_dataset(fake_files):
  folder, _ = fake_files
  with pytest.raises(ValueError, match="split='valid'"):
    ip.load_labeled_arrays(data_config(data_dir=folder), "valid")
  with pytest.raises(ValueError, match="in-memory dataset with labels"):
    ip.load_labeled_arrays(
      data_config("lsun/church_outdoor", image_size=64, eval_split="validation"), "train"
    )


def test_synthetic_labels_are_index_mod_10():
  config = data_config("synthetic")
  images, labels = ip.load_labeled_arrays(config, "test", num_examples=25)
  np.testing.assert_array_equal(labels, np.arange(25) % 10)
  assert images.shape == (25, 8, 8, 3) and images.std() > 10
  batch, _ = next(ip.create_eval_iterator(config, global_batch_size=16, split="test"))
  np.testing.assert_array_equal(images[:16], batch.reshape(16, 8, 8, 3))
  _, all_labels = ip.load_labeled_arrays(config, "test")
  assert all_labels.shape == (ds.SYNTHETIC_NUM_EXAMPLES["test"],)
  with pytest.raises(ValueError, match="exceeds the 10000 examples"):
    ip.load_labeled_arrays(config, "test", num_examples=10_001)


@pytest.mark.skipif(
  not os.path.isdir(_FASHION_MNIST),
  reason=f"Fashion-MNIST not installed at {_FASHION_MNIST} (apt-get install dataset-fashion-mnist)",
)
@pytest.mark.parametrize("split, per_class", [("train", 6000), ("test", 1000)])
def test_real_fashion_mnist(split, per_class):
  images, labels = ip.load_labeled_arrays(data_config(), split)
  assert images.shape == (10 * per_class, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)


def test_cifar10_through_mock_tfds():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12):
    stored = list(tfds.as_numpy(tfds.load("cifar10", split="test", shuffle_files=False)))
    images, labels = ip.load_labeled_arrays(data_config("cifar10"), "test")
    _, first = ip.load_labeled_arrays(data_config("cifar10"), "test", num_examples=5)
  assert images.shape == (12, 32, 32, 3) and labels.dtype == np.int32
  np.testing.assert_array_equal(images, np.stack([e["image"] for e in stored]))
  np.testing.assert_array_equal(labels, [e["label"] for e in stored])
  np.testing.assert_array_equal(first, labels[:5])
