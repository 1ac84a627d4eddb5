"""Batches from datasets (ddpm_jax/input_pipeline.py, data_sources.py, parallel.py's
prefetch) on the 8 CPU devices of tests/conftest.py.

Expected values come from the data themselves: fake idx files whose images are random (so
every image and its mirror image are unique and can be looked up), the published
Fashion-MNIST pixel statistics (mean 0.2860, std 0.3530 of x/255 over the training set),
and tfds.testing.mock_data for the tfds code paths.
"""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import config_checks, parallel
from ddpm_jax import data_sources as ds
from ddpm_jax import input_pipeline as ip
from ddpm_jax.errors import ConfigError
from tests.conftest import data_config, write_idx

NUM_TRAIN, NUM_TEST = 40, 37  # Not multiples of the global batch: epochs straddle batches.
GLOBAL_BATCH = 16
MOCK_EXAMPLES = 24


@pytest.fixture(scope="module")
def fake_files(tmp_path_factory):
  """A data_dir with small random idx files for both splits, and their images."""
  folder = tmp_path_factory.mktemp("fashion")
  rng = np.random.default_rng(123)
  images = {
    "train": rng.integers(0, 256, (NUM_TRAIN, 28, 28), dtype=np.uint8),
    "test": rng.integers(0, 256, (NUM_TEST, 28, 28), dtype=np.uint8),
  }
  for split, array in images.items():
    write_idx(folder / ds.FASHION_MNIST_FILES[split], [2051, *array.shape], array)
  return str(folder), {k: v[..., None] for k, v in images.items()}


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _identify(batch: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(index into images, was-mirrored) of every example of a [D, B, H, W, C] batch."""
  lookup = {img.tobytes(): (i, False) for i, img in enumerate(images)}
  lookup.update({img[:, ::-1].tobytes(): (i, True) for i, img in enumerate(images)})
  found = [lookup[x.tobytes()] for x in batch.reshape((-1,) + images.shape[1:])]
  return np.array([i for i, _ in found]), np.array([f for _, f in found])


# ------------------------------------------------------------------ shapes and batching


def test_train_batch_shape_and_dtype():
  batch = next(ip.create_train_iterator(data_config("synthetic"), global_batch_size=16, seed=0))
  chex.assert_shape(batch, (8, 2, 8, 8, 3))
  assert batch.dtype == np.uint8 and batch.std() > 10  # Random images, not zeros.


def test_global_batch_not_divisible_names_both_numbers():
  with pytest.raises(ValueError, match=r"global batch 12 is not a positive multiple of the 8"):
    ip.create_train_iterator(data_config("synthetic"), global_batch_size=12, seed=0)


def test_epochs_cover_every_example_once(fake_files):
  folder, images = fake_files
  batches = _take(
    ip.create_train_iterator(data_config(data_dir=folder), global_batch_size=GLOBAL_BATCH, seed=3),
    5,
  )
  # Flattening each [D, B] batch gives its global order; 5*16 positions = 2 epochs of 40.
  found = [_identify(b, images["train"]) for b in batches]
  order, flipped = (np.concatenate(parts) for parts in zip(*found, strict=True))
  assert not flipped.any()
  np.testing.assert_array_equal(np.sort(order[:NUM_TRAIN]), np.arange(NUM_TRAIN))
  np.testing.assert_array_equal(np.sort(order[NUM_TRAIN:]), np.arange(NUM_TRAIN))
  assert not np.array_equal(order[:NUM_TRAIN], order[NUM_TRAIN:])  # Reshuffled per epoch.


def test_same_seed_same_batches_and_exact_resume(fake_files):
  config = data_config(data_dir=fake_files[0])

  def make(seed, start=0):
    return ip.create_train_iterator(
      config, global_batch_size=GLOBAL_BATCH, seed=seed, start_step=start
    )

  reference = _take(make(7), 7)
  chex.assert_trees_all_equal(reference, _take(make(7), 7))
  chex.assert_trees_all_equal(reference[3:], _take(make(7, start=3), 4))
  other = _take(make(8), 7)
  assert not all(np.array_equal(a, b) for a, b in zip(reference, other, strict=True))


def test_processes_take_contiguous_slices_of_the_global_batch(fake_files, monkeypatch):
  config = data_config(data_dir=fake_files[0])
  single = _take(ip.create_train_iterator(config, global_batch_size=32, seed=1), 3)
  single_eval = list(ip.create_eval_iterator(config, global_batch_size=32))
  per_process, per_process_eval = [], []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for index in range(2):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    per_process.append(_take(ip.create_train_iterator(config, global_batch_size=32, seed=1), 3))
    per_process_eval.append(list(ip.create_eval_iterator(config, global_batch_size=32)))
  for step in range(3):
    chex.assert_shape(per_process[0][step], (8, 2, 28, 28, 1))
    joined = np.concatenate([p[step].reshape(16, 28, 28, 1) for p in per_process])
    np.testing.assert_array_equal(joined, single[step].reshape(32, 28, 28, 1))
  assert len(per_process_eval[0]) == len(per_process_eval[1]) == len(single_eval) == 2
  for (images, mask), parts in zip(single_eval, zip(*per_process_eval, strict=True), strict=True):
    np.testing.assert_array_equal(np.concatenate([p[1].ravel() for p in parts]), mask.ravel())
    np.testing.assert_array_equal(
      np.concatenate([p[0].reshape(16, 28, 28, 1) for p in parts]), images.reshape(32, 28, 28, 1)
    )


# --------------------------------------------------------------------------- eval pass


@pytest.mark.parametrize("num_examples", [-1, 20])
def test_eval_iterator_ordered_padded_and_masked(fake_files, num_examples):
  folder, images = fake_files
  batches = list(
    ip.create_eval_iterator(
      data_config(data_dir=folder), global_batch_size=16, num_examples=num_examples
    )
  )
  total = NUM_TEST if num_examples == -1 else num_examples
  assert len(batches) == -(-total // 16)
  flat_images = np.concatenate([b.reshape(16, 28, 28, 1) for b, _ in batches])
  flat_mask = np.concatenate([m.reshape(16) for _, m in batches])
  chex.assert_shape(batches[0][1], (8, 2))
  assert batches[0][1].dtype == bool
  np.testing.assert_array_equal(flat_mask, np.arange(len(flat_mask)) < total)
  np.testing.assert_array_equal(flat_images[:total], images["test"][:total])
  assert not flat_images[total:].any()  # Zero padding.


def test_eval_num_examples_beyond_split_is_rejected(fake_files):
  with pytest.raises(ConfigError, match="num_examples=38"):
    ip.create_eval_iterator(
      data_config(data_dir=fake_files[0]), global_batch_size=16, num_examples=NUM_TEST + 1
    )


# ------------------------------------------------------------------------ idx files


def test_idx_reader_parses_a_small_file(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (3, 5, 4), dtype=np.uint8)
  write_idx(tmp_path / "x.gz", [2051, *images.shape], images)
  parsed = ds.read_idx_images(str(tmp_path / "x.gz"))
  assert parsed.dtype == np.uint8
  np.testing.assert_array_equal(parsed, images[..., None])


@pytest.mark.parametrize(
  "corruption,message",
  [
    (dict(magic=2049), "magic number 2049, expected 2051"),
    (dict(truncate=7), "header says 3x5x4"),
    ("not gzip", "not a readable gzip"),
  ],
)
def test_idx_reader_rejects_corrupt_files(tmp_path, corruption, message):
  path = tmp_path / "bad.gz"
  if isinstance(corruption, str):
    path.write_bytes(b"plain bytes, no gzip header")
  else:
    write_idx(
      path,
      [corruption.get("magic", 2051), 3, 5, 4],
      np.zeros((3, 5, 4), np.uint8),
      truncate=corruption.get("truncate", 0),
    )
  with pytest.raises(ValueError, match=message):
    ds.read_idx_images(str(path))


def test_real_fashion_mnist_files():
  paths = {s: os.path.join(ds.FASHION_MNIST_DIR, f) for s, f in ds.FASHION_MNIST_FILES.items()}
  if not all(os.path.isfile(p) for p in paths.values()):
    why = f"Fashion-MNIST idx files absent under {ds.FASHION_MNIST_DIR} (apt-get install"
    pytest.skip(reason=f"{why} dataset-fashion-mnist)")
  train, test = ds.read_idx_images(paths["train"]), ds.read_idx_images(paths["test"])
  chex.assert_shape(train, (60000, 28, 28, 1))
  chex.assert_shape(test, (10000, 28, 28, 1))
  assert train.min() == 0 and train.max() == 255
  scaled = train / 255.0
  assert abs(scaled.mean() - 0.2860) < 5e-4 and abs(scaled.std() - 0.3530) < 5e-4
  # The default folder is used when data_dir is empty; the eval pass serves the file order.
  images, mask = next(ip.create_eval_iterator(data_config(), global_batch_size=16))
  np.testing.assert_array_equal(images.reshape(16, 28, 28, 1), test[:16])
  assert mask.all()


def test_missing_files_without_data_dir_fall_back_then_explain(monkeypatch, tmp_path):
  monkeypatch.setattr("ddpm_jax.data_sources.FASHION_MNIST_DIR", str(tmp_path / "absent"))

  def offline(*args):
    raise RuntimeError("Failed to download fashion_mnist\nsecond line")

  monkeypatch.setattr("ddpm_jax.data_sources._read_tfds", offline)
  config_checks.check_data(data_config())  # The tfds fallback is allowed: no error yet.
  with pytest.raises(
    ConfigError,
    match=r"not found; install .*dataset-fashion-mnist.*"
    r"fallback failed too: RuntimeError: Failed to download fashion_mnist$",
  ):
    ip.create_train_iterator(data_config(), global_batch_size=16, seed=0)


def test_eval_split_must_exist():
  with pytest.raises(ConfigError, match=r"split='valid' is not a split of 'synthetic'"):
    ip.create_eval_iterator(data_config("synthetic"), global_batch_size=16, split="valid")


# --------------------------------------------------------------------------- tfds paths


@pytest.fixture(scope="module")
def mock_tfds():
  """tfds with deterministic random examples (TF is imported once, here)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    yield tfds


def test_cifar10_in_memory_through_mock_tfds(mock_tfds):
  stored = np.concatenate(
    [
      b["image"]
      for b in mock_tfds.as_numpy(
        mock_tfds.load("cifar10", split="train", shuffle_files=False).batch(64)
      )
    ]
  )
  config = data_config("cifar10")
  batches = _take(ip.create_train_iterator(config, global_batch_size=16, seed=0), 3)
  chex.assert_shape(batches, (8, 2, 32, 32, 3))
  order = np.concatenate([_identify(b, stored)[0] for b in batches])
  np.testing.assert_array_equal(np.sort(order[:MOCK_EXAMPLES]), np.arange(MOCK_EXAMPLES))
  evaluated = list(ip.create_eval_iterator(config, global_batch_size=16))
  assert [int(m.sum()) for _, m in evaluated] == [16, MOCK_EXAMPLES - 16]
  np.testing.assert_array_equal(
    np.concatenate([b.reshape(16, 32, 32, 3) for b, _ in evaluated])[:MOCK_EXAMPLES], stored
  )


def test_lsun_streams_deterministically_and_resumes(mock_tfds):
  config = data_config(
    "lsun/church_outdoor", image_size=16, shuffle_buffer=8, eval_split="validation"
  )

  def make(seed, start=0):
    return ip.create_train_iterator(config, global_batch_size=16, seed=seed, start_step=start)

  reference = _take(make(0), 4)  # 64 positions: batches straddle the 24-example epochs.
  chex.assert_shape(reference, (8, 2, 16, 16, 3))
  assert all(b.dtype == np.uint8 for b in reference)
  chex.assert_trees_all_equal(reference[2:], _take(make(0, start=2), 2))
  assert not np.array_equal(reference[0], next(make(1)))
  # Epoch 0 is a permutation of the decoded split served by the eval pass.
  epoch = np.concatenate([b.reshape(16, 16, 16, 3) for b in _take(make(0), 2)])
  evaluated = list(ip.create_eval_iterator(config, global_batch_size=16, split="train"))
  decoded = np.concatenate([b.reshape(16, 16, 16, 3) for b, _ in evaluated])[:MOCK_EXAMPLES]
  assert [int(m.sum()) for _, m in evaluated] == [16, MOCK_EXAMPLES - 16]
  np.testing.assert_array_equal(
    np.sort(_identify(epoch[:MOCK_EXAMPLES], decoded)[0]), np.arange(MOCK_EXAMPLES)
  )


@pytest.mark.parametrize(
  "shape,size", [((7, 10), 4), ((10, 7), 4), ((9, 13), 6), ((12, 12), 12), ((5, 8), 16)]
)
def test_stylegan_crop_resize_equals_pil_on_the_centre_square(shape, size):
  """dataset_tool's create_lsun: rows/columns [(n - side) // 2, (n + side) // 2) of the
  shorter side, then PIL's Lanczos resize (down, identity and up), done here with PIL."""
  from PIL import Image

  image = np.random.default_rng(sum(shape) + size).integers(0, 256, shape + (3,), np.uint8)
  side = min(shape)
  rows = slice((shape[0] - side) // 2, (shape[0] + side) // 2)
  cols = slice((shape[1] - side) // 2, (shape[1] + side) // 2)
  expected = np.asarray(
    Image.fromarray(np.ascontiguousarray(image[rows, cols])).resize(
      (size, size), Image.Resampling.LANCZOS
    )
  )
  out = ds.stylegan_crop_resize(image, size)
  assert out.dtype == np.uint8 and out.shape == (size, size, 3)
  np.testing.assert_array_equal(out, expected)
  if shape == (size, size):
    np.testing.assert_array_equal(out, image)


def test_stylegan_crop_keeps_the_middle_square():
  """The side bands are cut away: an image whose centre square is uniform stays uniform
  (with an odd excess, the extra column goes to the right band, as dataset_tool's)."""
  image = np.zeros((8, 17, 3), np.uint8)
  image[:, 4:12] = 200  # Columns [(17 - 8) // 2, (17 + 8) // 2) = [4, 12).
  np.testing.assert_array_equal(ds.stylegan_crop_resize(image, 4), 200)


def test_lsun_stream_serves_the_stylegan_preparation(mock_tfds):
  """The LSUN train and eval streams (and so the FID reference) decode each image and
  apply stylegan_crop_resize to it."""
  del mock_tfds
  config = data_config("lsun/church_outdoor", image_size=8, eval_split="validation")
  tf, _, encoded, decode = ds.tfds_stream(config, "train")
  for raw in encoded.take(3):
    image = tf.io.decode_image(raw, channels=3, expand_animations=False).numpy()
    np.testing.assert_array_equal(decode(raw).numpy(), ds.stylegan_crop_resize(image, 8))


# ----------------------------------------------------------------------------- device


def test_to_model_input_maps_the_byte_range_to_unit_interval():
  levels = np.array([0, 255, 51], np.uint8)
  np.testing.assert_allclose(ip.to_model_input(levels), [-1.0, 1.0, 51 / 127.5 - 1.0])
  on_device = jax.jit(ip.to_model_input)(jnp.asarray(levels))
  assert on_device.dtype == jnp.float32
  np.testing.assert_allclose(on_device, [-1.0, 1.0, 51 / 127.5 - 1.0], rtol=1e-6)


def test_prefetch_to_device_feeds_pmap():
  source = ip.create_train_iterator(data_config("synthetic"), global_batch_size=16, seed=0)
  host = _take(ip.create_train_iterator(data_config("synthetic"), global_batch_size=16, seed=0), 3)
  consumed = []

  def counting():
    for batch in source:
      consumed.append(1)
      yield batch

  device_batches = parallel.prefetch_to_device(counting(), size=2)
  first = next(device_batches)
  assert len(consumed) == 2  # `size` batches in flight.
  mean = jax.pmap(lambda x: jnp.mean(ip.to_model_input(x)))
  for expected, batch in zip(
    host, [first, next(device_batches), next(device_batches)], strict=True
  ):
    assert isinstance(batch, jax.Array) and batch.shape == (8, 2, 8, 8, 3)
    for shard in batch.addressable_shards:  # Row i lives on local device i.
      row = shard.index[0].start
      assert shard.device == jax.local_devices()[row]
      np.testing.assert_array_equal(np.asarray(shard.data)[0], expected[row])
    np.testing.assert_allclose(
      mean(batch), (expected / 127.5 - 1.0).mean(axis=(1, 2, 3, 4)), atol=1e-6
    )
  with pytest.raises(ValueError, match=r"shape \(3, 2\) does not lead with the 8 local"):
    next(parallel.prefetch_to_device(iter([np.zeros((3, 2))])))


def test_non_tfds_sources_work_without_tensorflow():
  """TensorFlow is imported lazily: block it and serve the synthetic source."""
  code = (
    "import sys; sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None\n"
    "from configs import default; from ddpm_jax import input_pipeline as ip\n"
    "c = default.get_config().data; c.dataset = 'synthetic'; c.image_size = 4\n"
    "print(next(ip.create_train_iterator(c, global_batch_size=2, seed=0)).shape)"
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  result = subprocess.run(
    [sys.executable, "-c", code],
    cwd=root,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().endswith("(1, 2, 4, 4, 3)")


# ---------------------------------------------------------------------- per-process shares


def _shares(monkeypatch, make, processes: int) -> list[np.ndarray]:
  """What each of `processes` processes reads from make() (jax's process index faked)."""
  monkeypatch.setattr(jax, "process_count", lambda: processes)
  out = []
  for p in range(processes):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    chunks = list(make())
    assert all(len(c) <= 5 for c in chunks)
    out.append(np.concatenate(chunks) if chunks else np.zeros((0,)))
  return out


def test_each_process_reads_only_its_share_of_the_first_examples(
  monkeypatch, fake_files, mock_tfds
):
  """iterate_share (the FID reference): the processes' contiguous shares of the first N
  examples (in memory, or a streamed split through tfds' per-process split) together are
  those N examples in stored order, each read once."""
  data_dir, images = fake_files
  config = data_config(data_dir=data_dir)
  shares = _shares(
    monkeypatch, lambda: ip.iterate_share(config, "train", batch_size=5, num_examples=33), 3
  )
  assert [len(s) for s in shares] == [11, 11, 11]
  np.testing.assert_array_equal(np.concatenate(shares), images["train"][:33])
  # Streamed: the whole split in stored order on one process; with several, each process
  # asks tfds for its even part of split[:N] only (mock_data serves every split whole).
  lsun = data_config("lsun/church_outdoor", image_size=16)
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  whole = np.concatenate(list(ip.iterate_share(lsun, "train", batch_size=5)))
  stored = np.concatenate(
    [
      b.reshape(-1, 16, 16, 3)[m.reshape(-1)]
      for b, m in ip.create_eval_iterator(lsun, global_batch_size=8, split="train")
    ]
  )
  np.testing.assert_array_equal(whole, stored)
  requested, load = [], mock_tfds.load
  monkeypatch.setattr(
    mock_tfds, "load", lambda *a, **k: requested.append(k["split"]) or load(*a, **k)
  )
  _shares(monkeypatch, lambda: ip.iterate_share(lsun, "train", batch_size=5, num_examples=15), 2)
  assert requested == [mock_tfds.even_splits("train[:15]", n=2)[p] for p in range(2)]
  with pytest.raises(ConfigError, match="give either the slice or the count"):
    ip.iterate_share(lsun, "train[:10]", batch_size=5, num_examples=5)
  with pytest.raises(ConfigError, match="exceeds the 40 examples"):
    ip.iterate_share(config, "train", batch_size=5, num_examples=41)
