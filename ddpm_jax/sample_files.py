"""The sample sets of a workdir: where --mode=sample writes them and how they are read back.

Every process writes its own images (generation.local_batches) to its own shard, streamed
batch by batch, and process 0 writes the index once every shard is complete:

  samples/step_<k>[_<tag>]/samples_<p>-of-<P>.npz   keys "samples": uint8 [n_p, H, W, C]
                                                    and "indices": int64 [n_p], the global
                                                    index of each image, ascending
  samples/step_<k>[_<tag>]/samples.json             the index: num_samples, image_shape,
                                                    shards (file, num_samples) and the
                                                    settings of the sampler (with the seed)
  samples/step_<k>[_<tag>]/grid.png                 process 0's first 64 images

The shards of a set hold each index of [0, num_samples) exactly once. A set is complete
when its index exists. Readers (`open_set`) accept the index, its folder, a single shard,
or the single samples.npz of older sets (key "samples", one key per setting; its images
are indices 0 .. N-1). The npz members are stored uncompressed and read row by row from
the file, so a reader holds only the images it asks for, a chunk at a time
(`SampleSet.chunks`, `SampleSet.share`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zipfile
from collections.abc import Iterator
from typing import Any, Self

import numpy as np

from ddpm_jax import hosts, train_logging
from ddpm_jax import workdir as workdir_lib

INDEX_FILE = "samples.json"
SAMPLES_FILE = "samples.npz"  # The single file of older sets.
GRID_FILE = "grid.png"
GRID_SIZE = 64
FORMAT = "ddpm_jax sample shards v1"


def shard_name(process: int, process_count: int) -> str:
  return f"samples_{process}-of-{process_count}.npz"


def _set_name(step: int, tag: str) -> str:
  return f"step_{step}_{tag}" if tag else f"step_{step}"


def set_dir(workdir: str, step: int, tag: str = "") -> str:
  """workdir/samples/step_<step>[_<tag>]."""
  return os.path.join(workdir_lib.resolve(workdir), train_logging.SAMPLES_DIR, _set_name(step, tag))


def new_set_dir(workdir: str, step: int, tag: str = "") -> str:
  """The folder of a new set, refused (ConfigError) if it already holds a complete one (an
  interrupted run's shards without an index are written over)."""
  return workdir_lib.output_dir(
    workdir, train_logging.SAMPLES_DIR, _set_name(step, tag), (INDEX_FILE, SAMPLES_FILE, GRID_FILE)
  )


def find_set(workdir: str, step: int, tag: str = "") -> str | None:
  """The index (or older single samples.npz) of a complete set of step ``step``, or None."""
  directory = set_dir(workdir, step, tag)
  for name in (INDEX_FILE, SAMPLES_FILE):
    if os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  return None


# ----------------------------------------------------------------------------- writing


class ShardWriter:
  """Streams one process's images into its shard: ``write`` per batch, ``close`` at the end.

  The npz is written member by member (np.savez's layout: uncompressed .npy members) into
  a temporary file renamed on close, so the host holds one batch, not its share. The
  first GRID_SIZE images are kept in ``head`` for the grid.
  """

  def __init__(
    self,
    directory: str,
    process: int,
    process_count: int,
    indices: np.ndarray,
    image_shape: tuple[int, ...],
  ):
    os.makedirs(directory, exist_ok=True)
    self.path = os.path.join(directory, shard_name(process, process_count))
    self._tmp = f"{self.path}.tmp{os.getpid()}"
    self._indices = np.asarray(indices, np.int64)
    self._shape = tuple(image_shape)
    self._written, self._open = 0, True
    self.head: list[np.ndarray] = []
    self._zip = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
    self._member = self._zip.open("samples.npy", "w", force_zip64=True)
    header = dict(
      descr=np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
      fortran_order=False,
      shape=(len(self._indices),) + self._shape,
    )
    np.lib.format.write_array_header_2_0(self._member, header)

  def write(self, indices: np.ndarray, images: np.ndarray) -> None:
    """Appends images uint8 [n, H, W, C] whose global indices come next in the shard."""
    end = self._written + len(indices)
    if (
      images.dtype != np.uint8
      or images.shape != (len(indices),) + self._shape
      or not (np.array_equal(indices, self._indices[self._written : end]))
    ):
      raise ValueError(
        f"shard {self.path}: images {images.dtype} {images.shape} at indices "
        f"{indices[:4]}... do not come next (expected "
        f"{self._indices[self._written : self._written + 4]}...)"
      )
    self._member.write(np.ascontiguousarray(images).tobytes())
    self._written = end
    have = sum(len(h) for h in self.head)
    if have < GRID_SIZE:
      self.head.append(np.array(images[: GRID_SIZE - have]))

  def close(self) -> str:
    """Finishes the shard (all of its images must have been written); its path."""
    if self._written != len(self._indices):
      self.abort()
      raise ValueError(f"shard {self.path}: {self._written} of {len(self._indices)} images written")
    self._member.close()
    with self._zip.open("indices.npy", "w", force_zip64=True) as member:
      np.lib.format.write_array(member, self._indices)
    self._zip.close()
    os.replace(self._tmp, self.path)
    self._open = False
    return self.path

  def abort(self) -> None:
    """Drops the unfinished shard."""
    if self._open:
      self._open = False
      self._member.close()
      self._zip.close()
      os.remove(self._tmp)

  def __enter__(self) -> Self:
    return self

  def __exit__(self, kind, value, traceback) -> None:
    if kind is not None:
      self.abort()


def write_index(
  directory: str,
  num_samples: int,
  image_shape: tuple[int, ...],
  settings: dict[str, Any],
  process_count: int,
) -> str:
  """Writes samples.json over the shards of ``process_count`` processes, after checking
  that they hold every index of [0, num_samples) once; its path. Process 0, after all
  shards are closed."""
  shards, seen = [], []
  for p in range(process_count):
    name = shard_name(p, process_count)
    part = _npz_part(os.path.join(directory, name))
    if part.shape[1:] != tuple(image_shape) or part.dtype != np.uint8:
      raise ValueError(f"{name} holds {part.dtype} {part.shape}, not uint8 [n, {image_shape}]")
    shards.append(dict(file=name, num_samples=len(part.positions)))
    seen.append(part.positions)
  if not np.array_equal(np.sort(np.concatenate(seen)), np.arange(num_samples)):
    raise ValueError(
      f"the shards in {directory} do not hold indices 0 .. {num_samples - 1} once each"
    )
  index = dict(
    format=FORMAT,
    num_samples=int(num_samples),
    image_shape=list(image_shape),
    dtype="uint8",
    shards=shards,
    settings=settings,
  )
  path = os.path.join(directory, INDEX_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(index, f, indent=2)
  os.replace(path + ".tmp", path)
  return path


def write_grid(directory: str, images: np.ndarray) -> str:
  """grid.png of (up to GRID_SIZE) images; its path."""
  path = os.path.join(directory, GRID_FILE)
  train_logging.save_png(path, train_logging.image_grid(images[:GRID_SIZE]))
  return path


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class _Stored:
  """An uncompressed .npy member of an npz: where its data start in the file, and what."""

  path: str
  offset: int
  shape: tuple[int, ...]
  dtype: np.dtype

  def rows(self, first: int, count: int) -> np.ndarray:
    """Rows first .. first + count - 1, read from the file (nothing else is touched)."""
    row = int(np.prod(self.shape[1:], dtype=np.int64))
    data = np.fromfile(
      self.path, self.dtype, count * row, offset=self.offset + first * row * self.dtype.itemsize
    )
    return data.reshape((count,) + self.shape[1:])


def _npz_member(path: str, key: str) -> _Stored | np.ndarray:
  """Member ``key`` of an npz: where it is stored (np.savez's uncompressed members), or the
  array itself when the member is compressed."""
  with zipfile.ZipFile(path) as archive:
    info = archive.getinfo(f"{key}.npy")
  if info.compress_type != zipfile.ZIP_STORED:
    with np.load(path, allow_pickle=False) as data:
      return data[key]
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    local = f.read(30)  # The local file header; name and extra field lengths at 26.
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    f.seek(info.header_offset + 30 + name_length + extra_length)
    version = np.lib.format.read_magic(f)
    read_header = (
      np.lib.format.read_array_header_1_0
      if version == (1, 0)
      else np.lib.format.read_array_header_2_0
    )
    shape, fortran_order, dtype = read_header(f)
    offset = f.tell()
  if dtype.hasobject or (fortran_order and len(shape) > 1):
    with np.load(path, allow_pickle=False) as data:  # Not row by row: read it whole.
      return data[key]
  return _Stored(path, offset, tuple(shape), dtype)


@dataclasses.dataclass(frozen=True)
class _Part:
  """One file (or in-memory array) of a set: its images and their indices in the set."""

  samples: _Stored | np.ndarray
  positions: np.ndarray  # int64 [n]

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.samples.shape)

  @property
  def dtype(self) -> np.dtype:
    return self.samples.dtype

  def read(self, rows: np.ndarray) -> np.ndarray:
    """The images at ascending ``rows``, each run of consecutive rows read at once."""
    if isinstance(self.samples, np.ndarray):
      return self.samples[rows]
    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
    return np.concatenate([self.samples.rows(int(r[0]), len(r)) for r in runs])


def _npz_part(path: str) -> _Part:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
  samples = _npz_member(path, "samples")
  if "indices.npy" in names:
    indices = _npz_member(path, "indices")
    if isinstance(indices, _Stored):
      indices = indices.rows(0, indices.shape[0])
    return _Part(samples, np.asarray(indices, np.int64))
  return _Part(samples, np.arange(samples.shape[0], dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class SampleSet:
  """A sample set read part by part: images [N, H, W, C] with indices 0 .. N-1.

  ``shape`` and ``dtype`` are those of the whole set as one array (N first); ``settings``
  the sampler's record stored with it ({} if none).
  """

  path: str
  shape: tuple[int, ...]
  dtype: np.dtype
  settings: dict[str, Any]
  parts: tuple[_Part, ...]

  @property
  def num_samples(self) -> int:
    return self.shape[0]

  @classmethod
  def from_array(cls, samples: np.ndarray, path: str = "<array>") -> SampleSet:
    """A set of an in-memory array [N, ...] (indices 0 .. N-1)."""
    samples = np.asarray(samples)
    part = _Part(samples, np.arange(samples.shape[0], dtype=np.int64))
    return cls(path, tuple(samples.shape), samples.dtype, {}, (part,))

  def chunks(self, start: int, stop: int, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices [n], images [n, ...]) of the images with index in [start, stop), at most
    ``size`` at a time, part by part (not in index order); only those are read."""
    for part in self.parts:
      rows = np.flatnonzero((part.positions >= start) & (part.positions < stop))
      for first in range(0, len(rows), size):
        chosen = rows[first : first + size]
        yield part.positions[chosen], part.read(chosen)

  def share(self, num: int, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This process's contiguous share (hosts.my_slice) of the first ``num`` images."""
    if num > self.num_samples:
      raise ValueError(f"{self.path} holds {self.num_samples} samples, not {num}")
    mine = hosts.my_slice(num)
    return self.chunks(mine.start, mine.stop, size)

  def read(self) -> np.ndarray:
    """All images in index order, in memory (for small sets)."""
    out = np.empty(self.shape, self.dtype)
    for indices, images in self.chunks(0, self.num_samples, max(self.num_samples, 1)):
      out[indices] = images
    return out


def _open_index(path: str) -> SampleSet:
  with open(path) as f:
    index = json.load(f)
  if not isinstance(index, dict) or index.get("format") != FORMAT:
    raise ValueError(f"{path}: not a sample-set index ({FORMAT!r})")
  directory, num = os.path.dirname(path), int(index["num_samples"])
  parts = tuple(_npz_part(os.path.join(directory, shard["file"])) for shard in index["shards"])
  shape = (num,) + tuple(index["image_shape"])
  for shard, part in zip(index["shards"], parts, strict=True):
    if part.shape != (shard["num_samples"],) + shape[1:] or part.dtype != np.uint8:
      raise ValueError(
        f"{path}: shard {shard['file']} holds {part.dtype} {part.shape}, not "
        f"uint8 {(shard['num_samples'],) + shape[1:]}"
      )
  return SampleSet(path, shape, np.dtype(np.uint8), dict(index["settings"]), parts)


def _open_npz(path: str) -> SampleSet:
  part = _npz_part(path)
  if not np.array_equal(part.positions, np.arange(len(part.positions))):
    # A lone shard: its images, re-indexed 0 .. n-1 in their global order.
    part = _Part(part.samples, np.argsort(np.argsort(part.positions)).astype(np.int64))
  with np.load(path, allow_pickle=False) as data:
    settings = {
      k: data[k].item() for k in data.files if k not in ("samples", "indices") and data[k].ndim == 0
    }
  return SampleSet(path, part.shape, part.dtype, settings, (part,))


def open_set(path: str) -> SampleSet:
  """The set of an index (samples.json), its folder, or one npz with key "samples"."""
  if os.path.isdir(path):
    found = [
      os.path.join(path, n)
      for n in (INDEX_FILE, SAMPLES_FILE)
      if os.path.isfile(os.path.join(path, n))
    ]
    if not found:
      raise ValueError(f"{path}: no {INDEX_FILE} or {SAMPLES_FILE} in this folder")
    path = found[0]
  return _open_index(path) if path.endswith(".json") else _open_npz(path)


def read(path: str) -> tuple[np.ndarray, dict[str, Any]]:
  """(all uint8 samples in index order, the sampler settings) of a set (see open_set)."""
  samples = open_set(path)
  return samples.read(), samples.settings
