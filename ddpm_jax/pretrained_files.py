"""Reading and writing the files of released DDPM weights, without torch.

* An official TF1 checkpoint (a prefix such as ``.../model.ckpt-790000`` with its
  ``.index`` and ``.data-*`` files) is read with ``tf.train.load_checkpoint``; TensorFlow
  (the ``data`` extra) is imported only here, only when one is read.
* A diffusers ``UNet2DModel`` folder holds ``config.json`` and the weights as
  ``diffusion_pytorch_model.safetensors`` (read and written with the ``safetensors``
  package's NumPy API) or as PyTorch's zip-pickle ``diffusion_pytorch_model.bin``, read here
  by a restricted unpickler that builds NumPy arrays and accepts nothing but tensors and
  dicts (so no code in the file runs, and torch is not needed).

Each reader returns a `TensorFile`: the names and shapes first (a layout is checked before
any weight is read), the tensors on demand.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from ddpm_jax.errors import ConfigError

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "diffusion_pytorch_model.safetensors"
BIN_FILE = "diffusion_pytorch_model.bin"
OFFICIAL, DIFFUSERS = "official", "diffusers"


@dataclasses.dataclass(frozen=True)
class TensorFile:
  """The tensors of one checkpoint: ``shapes`` (name -> shape) and ``read(name)`` (a
  float32 array); ``step`` the training step it records (None: not recorded) and
  ``config`` a diffusers folder's config.json."""

  path: str
  kind: str
  shapes: dict[str, tuple[int, ...]]
  read: Callable[[str], np.ndarray]
  step: int | None = None
  config: dict[str, Any] | None = None


def detect(path: str) -> str:
  """OFFICIAL for a TF1 checkpoint prefix (or a folder with a TF ``checkpoint`` file),
  DIFFUSERS for a folder with config.json (or unet/config.json); ConfigError otherwise."""
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, CONFIG_FILE)) or os.path.isfile(
      os.path.join(path, "unet", CONFIG_FILE)
    ):
      return DIFFUSERS
    if os.path.isfile(os.path.join(path, "checkpoint")):
      return OFFICIAL
  elif os.path.isfile(_official_prefix(path) + ".index"):
    return OFFICIAL
  raise ConfigError(
    f"{path!r} is neither a TF1 checkpoint ({path}.index) nor a diffusers "
    f"folder ({os.path.join(path, CONFIG_FILE)})."
  )


def _official_prefix(path: str) -> str:
  """The checkpoint prefix of a path given as the prefix or as one of its files."""
  for suffix in (".index", ".meta"):
    if path.endswith(suffix):
      return path[: -len(suffix)]
  head, sep, _ = path.rpartition(".data-")
  return head if sep else path


# ------------------------------------------------------------------- official TF1


def open_official(path: str) -> TensorFile:
  """The variables of a TF1 checkpoint; ``step`` is its ``global_step``."""
  try:
    import tensorflow as tf
  except ImportError as e:
    raise ConfigError(
      "Reading an official TF1 checkpoint needs TensorFlow: pip install -e '.[data]'."
    ) from e
  prefix = _official_prefix(path)
  if os.path.isdir(path):
    prefix = tf.train.latest_checkpoint(path)
    if prefix is None:
      raise ConfigError(f"The TF 'checkpoint' file in {path!r} names no checkpoint.")
  try:
    reader = tf.train.load_checkpoint(prefix)
  except Exception as e:  # Broad on purpose: TF's errors: one line for the user.
    raise ConfigError(
      f"Cannot read the TF checkpoint {prefix!r}: {' '.join(str(e).split())[:300]}"
    ) from e
  shapes = {
    name: tuple(int(d) for d in shape) for name, shape in reader.get_variable_to_shape_map().items()
  }
  step = int(reader.get_tensor("global_step")) if "global_step" in shapes else None
  return TensorFile(
    prefix, OFFICIAL, shapes, lambda name: np.asarray(reader.get_tensor(name), np.float32), step
  )


# ------------------------------------------------------------------- diffusers


def diffusers_folder(path: str) -> str:
  """The folder that holds the UNet2DModel: ``path`` or, for a pipeline, ``path/unet``."""
  if os.path.isfile(os.path.join(path, CONFIG_FILE)):
    return path
  return os.path.join(path, "unet")


def open_diffusers(path: str) -> TensorFile:
  """config.json and the weights of a UNet2DModel folder (safetensors preferred)."""
  folder = diffusers_folder(path)
  config_path = os.path.join(folder, CONFIG_FILE)
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"Cannot read {config_path!r}: {e}.") from e
  if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
    raise ConfigError(f"{config_path} describes a {config['_class_name']}, not a UNet2DModel.")
  safetensors_path, bin_path = (
    os.path.join(folder, SAFETENSORS_FILE),
    os.path.join(folder, BIN_FILE),
  )
  if os.path.isfile(safetensors_path):
    shapes, read = _open_safetensors(safetensors_path)
  elif os.path.isfile(bin_path):
    shapes, read = _open_torch_zip(bin_path)
  else:
    raise ConfigError(f"{folder!r} holds neither {SAFETENSORS_FILE} nor {BIN_FILE}.")
  return TensorFile(folder, DIFFUSERS, shapes, read, None, config)


def _open_safetensors(path: str) -> tuple[dict[str, tuple[int, ...]], Callable]:
  try:
    import safetensors
  except ImportError as e:
    raise ConfigError(
      "Reading a diffusers folder needs the safetensors package: pip install safetensors."
    ) from e
  with safetensors.safe_open(path, framework="numpy") as f:
    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118  (safe_open is not iterable)

  def read(name: str) -> np.ndarray:
    with safetensors.safe_open(path, framework="numpy") as f:
      return np.asarray(f.get_tensor(name), np.float32)

  return shapes, read


# PyTorch storage classes -> the NumPy dtype of their bytes (little-endian).
_TORCH_STORAGES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2"}


@dataclasses.dataclass(frozen=True)
class _Storage:
  dtype: str
  key: str


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles a torch.save'd state dict into NumPy arrays; refuses every other global."""

  def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._archive, self._prefix = archive, prefix

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == ("collections", "OrderedDict"):
      return dict
    if module == "torch" and name in _TORCH_STORAGES:
      return _TORCH_STORAGES[name]
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return self._rebuild_tensor
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
      return lambda data, *_: data
    raise pickle.UnpicklingError(f"{module}.{name} is not part of a state dict of float tensors")

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
    return _Storage(dtype=pid[1], key=str(pid[2]))

  def _rebuild_tensor(
    self, storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any
  ) -> np.ndarray:
    data = np.frombuffer(self._archive.read(f"{self._prefix}/data/{storage.key}"), storage.dtype)
    item = data.itemsize
    view = np.lib.stride_tricks.as_strided(
      data[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)
    )
    return np.array(view, np.float32)


def _open_torch_zip(path: str) -> tuple[dict[str, tuple[int, ...]], Callable]:
  """A torch.save'd state dict (zip format, PyTorch >= 1.6) as NumPy arrays, read once."""
  try:
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
      if len(pickles) != 1:
        raise pickle.UnpicklingError("no data.pkl in the archive")
      prefix = pickles[0][: -len("/data.pkl")]
      byteorder = f"{prefix}/byteorder"
      if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
        raise pickle.UnpicklingError("big-endian tensors")
      with archive.open(pickles[0]) as f:
        state = _TorchUnpickler(f, archive, prefix).load()
  except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, ValueError) as e:
    raise ConfigError(
      f"Cannot read {path!r} as a state dict of float tensors ({e}); convert "
      f"the folder to {SAFETENSORS_FILE}."
    ) from e
  if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
    raise ConfigError(f"{path!r} holds no state dict of tensors.")
  return {k: v.shape for k, v in state.items()}, lambda name: state[name]


def write_diffusers(folder: str, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
  """config.json (``_class_name`` UNet2DModel) and diffusion_pytorch_model.safetensors in
  ``folder`` (created; ConfigError if either file is already there)."""
  import safetensors.numpy

  existing = [
    n for n in (CONFIG_FILE, SAFETENSORS_FILE, BIN_FILE) if os.path.exists(os.path.join(folder, n))
  ]
  if existing:
    raise ConfigError(f"{folder} already holds {existing}; choose another --output.")
  os.makedirs(folder, exist_ok=True)
  safetensors.numpy.save_file(
    tensors, os.path.join(folder, SAFETENSORS_FILE), metadata={"format": "pt"}
  )
  with open(os.path.join(folder, CONFIG_FILE), "w") as f:
    json.dump({"_class_name": "UNet2DModel", **config}, f, indent=2)
