"""Sample sets at scale: which global indices each process makes (generation.py), its shard
and the index (sample_files.py), each reader's share, older single files, and the FID
command line reading a set shard by shard (fid.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import fid as fid_cli
from ddpm_jax import generation
from ddpm_jax import sample_files as sf
from ddpm_jax.evaluation import features as features_lib
from ddpm_jax.evaluation import metrics

SHAPE = (4, 4, 3)


def _images(num: int) -> np.ndarray:
  return np.random.default_rng(3).integers(0, 256, (num,) + SHAPE, dtype=np.uint8)


@pytest.mark.parametrize("num, batch, processes", [(16, 8, 2), (21, 8, 4), (5, 8, 1)])
def test_each_process_makes_a_block_of_every_global_batch(num, batch, processes):
  """Process blocks of a batch in process order are the batch (the order hosts.gather
  used to return), and the processes' indices partition [0, N)."""
  for i in range(-(-num // batch)):
    blocks = [generation.batch_share(i, batch, p, processes) for p in range(processes)]
    np.testing.assert_array_equal(np.concatenate(blocks), np.arange(i * batch, (i + 1) * batch))
  shares = [generation.process_indices(num, batch, p, processes) for p in range(processes)]
  assert all(np.all(np.diff(s) > 0) for s in shares)
  np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.arange(num))


def _write_set(folder, images: np.ndarray, batch: int, processes: int) -> str:
  """A set written as `processes` hosts of --mode=sample would: shards, then the index."""
  num = len(images)
  for p in range(processes):
    indices = generation.process_indices(num, batch, p, processes)
    with sf.ShardWriter(str(folder), p, processes, indices, SHAPE) as writer:
      for first in range(0, len(indices), batch // processes):
        chunk = indices[first:first + batch // processes]
        writer.write(chunk, images[chunk])
      writer.close()
  return sf.write_index(str(folder), num, SHAPE, {"method": "ddim", "seed": 0}, processes)


def test_shards_round_trip_and_each_reader_reads_only_its_share(tmp_path, monkeypatch):
  images = _images(21)
  path = _write_set(tmp_path, images, batch=8, processes=2)
  with open(path) as f:
    index = json.load(f)
  assert index["shards"] == [{"file": "samples_0-of-2.npz", "num_samples": 12},
                             {"file": "samples_1-of-2.npz", "num_samples": 9}]
  with np.load(tmp_path / "samples_1-of-2.npz") as shard:
    np.testing.assert_array_equal(shard["indices"], [4, 5, 6, 7, 12, 13, 14, 15, 20])
    np.testing.assert_array_equal(shard["samples"], images[shard["indices"]])
  for where in (path, str(tmp_path)):
    samples, settings = sf.read(where)
    np.testing.assert_array_equal(samples, images)
    assert settings == {"method": "ddim", "seed": 0}
  opened = sf.open_set(path)
  # Readers on 3 processes, first 19 samples: each gets exactly [p 19 // 3, (p+1) 19 // 3),
  # and reads from the files those images only.
  image_reads, fromfile = [], np.fromfile
  monkeypatch.setattr(np, "fromfile", lambda *a, **k: image_reads.append(fromfile(*a, **k))
                      or image_reads[-1])
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  for p in range(3):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    chunks = list(opened.share(19, 2))
    assert all(len(i) <= 2 for i, _ in chunks)
    indices = np.concatenate([i for i, _ in chunks])
    np.testing.assert_array_equal(np.sort(indices), np.arange(p * 19 // 3, (p + 1) * 19 // 3))
    np.testing.assert_array_equal(np.concatenate([x for _, x in chunks]), images[indices])
    assert sum(r.nbytes for r in image_reads) == len(indices) * int(np.prod(SHAPE))
    image_reads.clear()
  with pytest.raises(ValueError, match="holds 21 samples, not 22"):
    opened.share(22, 2)


def test_incomplete_or_inconsistent_shards_are_refused(tmp_path):
  indices = np.array([0, 1, 4, 5])
  writer = sf.ShardWriter(str(tmp_path), 0, 2, indices, SHAPE)
  with pytest.raises(ValueError, match="do not come next"):
    writer.write(np.array([0, 4]), _images(2))
  writer.write(indices[:2], _images(2))
  with pytest.raises(ValueError, match="2 of 4 images written"):
    writer.close()
  assert os.listdir(tmp_path) == []  # The unfinished shard is gone.
  _write_set(tmp_path / "ok", _images(8), batch=4, processes=2)
  os.remove(tmp_path / "ok" / "samples.json")
  with pytest.raises(ValueError, match="do not hold indices 0 .. 8"):
    sf.write_index(str(tmp_path / "ok"), 9, SHAPE, {}, 2)  # One image short.
  with pytest.raises(ValueError, match="not uint8"):
    sf.write_index(str(tmp_path / "ok"), 8, (4, 4, 1), {}, 2)


def test_older_single_files_and_a_lone_shard(tmp_path):
  images = _images(6)
  old = tmp_path / "samples.npz"
  np.savez(old, samples=images, method="ancestral", clip_denoised=True, seed=3)
  samples, settings = sf.read(str(old))
  np.testing.assert_array_equal(samples, images)
  assert settings == {"method": "ancestral", "clip_denoised": True, "seed": 3}
  assert sf.open_set(str(tmp_path)).path == str(old)  # The folder of an older set.
  _write_set(tmp_path / "set", images, batch=4, processes=2)
  lone = sf.open_set(str(tmp_path / "set" / "samples_1-of-2.npz"))  # Holds 2, 3.
  np.testing.assert_array_equal(lone.read(), images[[2, 3]])
  compressed = tmp_path / "compressed.npz"
  np.savez_compressed(compressed, samples=images)
  np.testing.assert_array_equal(sf.read(str(compressed))[0], images)


def _toy_extractor() -> features_lib.FeatureExtractor:
  """Features: channel means and the first pixel; logits: 5 linear scores."""
  weights = np.random.default_rng(0).normal(size=(int(np.prod(SHAPE)), 5)).astype(np.float32)

  def apply_fn(variables, images):
    x = images.astype(jnp.float32).reshape(images.shape[0], -1) / 255.0
    features = jnp.concatenate([x.reshape(images.shape[0], -1, 3).mean(1), x[:, :3]], axis=1)
    return features, x @ variables

  return features_lib.FeatureExtractor("toy", apply_fn, weights, 6, logits_name="toy logits")


def test_fid_command_line_streams_a_set_shard_by_shard(tmp_path):
  """`python -m ddpm_jax.fid` reads an index (or its folder) and computes, batch by batch
  from the shards, the statistics and the Inception Score of all the images in order."""
  images = _images(23)
  path = _write_set(tmp_path, images, batch=8, processes=2)
  extractor = _toy_extractor()
  features, logits = extractor(images)
  for where in (path, str(tmp_path)):
    source = fid_cli.read_source(where)
    assert source.num_images == 23 and source.samples.shape == (23,) + SHAPE
    mu, sigma, scores = fid_cli.sample_statistics(extractor, source.samples, 4, "A")
    expected_mu, expected_sigma = metrics.compute_statistics(np.asarray(features))
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-6)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(scores.score(), metrics.inception_score(np.asarray(logits), 10),
                               rtol=1e-6)
  (tmp_path / "bad.json").write_text('{"format": "something else"}')
  with pytest.raises(ValueError, match="not a sample-set index"):
    fid_cli.read_source(str(tmp_path / "bad.json"))
