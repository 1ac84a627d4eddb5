"""Sample sets at scale (ddpm_jax/sample_files.py): each process's shard and the index, each
reader's share, older single files. Which indices each process makes: test_generation.py;
the FID command line reading a set shard by shard: test_fid.py (which uses the helpers
here to write a set)."""

import json
import os

import jax
import numpy as np
import pytest

from ddpm_jax import generation
from ddpm_jax import sample_files as sf

SHAPE = (4, 4, 3)


def _images(num: int) -> np.ndarray:
  return np.random.default_rng(3).integers(0, 256, (num,) + SHAPE, dtype=np.uint8)


def _write_set(folder, images: np.ndarray, batch: int, processes: int) -> str:
  """A set written as `processes` hosts of --mode=sample would: shards, then the index."""
  num = len(images)
  for p in range(processes):
    indices = generation.process_indices(num, batch, p, processes)
    with sf.ShardWriter(str(folder), p, processes, indices, SHAPE) as writer:
      for first in range(0, len(indices), batch // processes):
        chunk = indices[first : first + batch // processes]
        writer.write(chunk, images[chunk])
      writer.close()
  return sf.write_index(str(folder), num, SHAPE, {"method": "ddim", "seed": 0}, processes)


def test_shards_round_trip_and_each_reader_reads_only_its_share(tmp_path, monkeypatch):
  images = _images(21)
  path = _write_set(tmp_path, images, batch=8, processes=2)
  with open(path) as f:
    index = json.load(f)
  assert index["shards"] == [
    {"file": "samples_0-of-2.npz", "num_samples": 12},
    {"file": "samples_1-of-2.npz", "num_samples": 9},
  ]
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
  monkeypatch.setattr(
    np, "fromfile", lambda *a, **k: image_reads.append(fromfile(*a, **k)) or image_reads[-1]
  )
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
  with pytest.raises(ValueError, match=r"do not hold indices 0 .. 8"):
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
