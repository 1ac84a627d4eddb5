"""The authors' released DDPM weights in ddpm_jax, and ddpm_jax's weights out to diffusers.

Ho et al. (2020) released their trained models as TF1 checkpoints (CIFAR-10 at step
790,000, LSUN church 4,432,000, bedroom 2,388,000, cat 1,761,000); diffusers hosts
conversions as ``UNet2DModel`` folders (google/ddpm-cifar10-32, google/ddpm-church-256,
google/ddpm-ema-celebahq-256, ...). `load_params` turns either into the params tree of
``factories.create_model(config)``: the weights the paper samples and evaluates with, i.e.
the ``ExponentialMovingAverage`` shadows of an official checkpoint (paper App. B: an
exponential moving average of the parameters, decay 0.9999), not its raw weights (unless
asked) nor its Adam slots. A file that does not
fit the config is refused with one line naming the first missing or extra tensor (and the
config of configs/ that fits it) or the first shape that differs.

`write_workdir` makes an ordinary ddpm_jax workdir of them (config.json and a checkpoint at
the file's step) for --mode=sample / eval / train; `export_diffusers` writes a workdir's
weights as a UNet2DModel folder. The command line is pretrained_cli.py::

  python -m ddpm_jax.pretrained --input=.../model.ckpt-790000 --config=configs/cifar10.py \
      --workdir=DIR
  python -m ddpm_jax.pretrained --export=diffusers --workdir=DIR --output=OUT
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from ddpm_jax import checkpointing, factories
from ddpm_jax import pretrained_files as files
from ddpm_jax import pretrained_names as names
from ddpm_jax import train_state as train_state_lib
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.errors import ConfigError

SOURCES = ("auto", files.OFFICIAL, files.DIFFUSERS)
WEIGHTS = ("ema", "raw")
EMA_SUFFIX = "/ExponentialMovingAverage"
_SLOT_SUFFIXES = ("/Adam", "/Adam_1")
# tf.contrib.layers.group_norm's default, which every official model used.
OFFICIAL_NUM_GROUPS = 32


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """Released weights as ddpm_jax params trees (NumPy float32).

  ``params``: the weights to sample with (an official checkpoint's EMA shadows, a diffusers
  folder's weights); ``raw_params``: the raw training weights beside them, where the file
  has both (official checkpoints), else None; ``step``: the step the file records
  (official: global_step; diffusers folders record none).
  """

  params: Any
  raw_params: Any | None
  step: int | None
  source: str
  path: str


def load_params(
  path: str, config: ml_collections.ConfigDict, *, source: str = "auto", weights: str = "ema"
) -> Any:
  """The weights of an official TF1 checkpoint or a diffusers folder to sample with (the
  EMA of the parameters the paper samples and evaluates with, App. B), as a params tree of
  factories.create_model(config). See `load`."""
  return load(path, config, source=source, weights=weights).params


def load(
  path: str, config: ml_collections.ConfigDict, *, source: str = "auto", weights: str = "ema"
) -> Pretrained:
  """Reads ``path`` (``source``: "auto", "official" or "diffusers") for ``config``'s U-Net.

  Official checkpoints give the ``<name>/ExponentialMovingAverage`` shadows as ``params``
  (``weights="raw"``: the raw weights instead, e.g. for a checkpoint saved without EMA). A
  diffusers folder holds one set of weights, returned whatever ``weights`` says (the hub's
  ``ddpm-ema-*`` folders hold the EMA weights). ConfigError, one line, for a file that is
  not of the config's layout, a checkpoint without EMA shadows, or a diffusers config.json
  whose network computes differently.
  """
  if source not in SOURCES:
    raise ConfigError(f"source={source!r}; allowed: {', '.join(SOURCES)}.")
  if weights not in WEIGHTS:
    raise ConfigError(f"weights={weights!r}; allowed: {', '.join(WEIGHTS)}.")
  kind = files.detect(path) if source == "auto" else source
  opened = files.open_official(path) if kind == files.OFFICIAL else files.open_diffusers(path)
  return load_file(opened, config, weights=weights)


def load_file(
  file: files.TensorFile, config: ml_collections.ConfigDict, *, weights: str = "ema"
) -> Pretrained:
  """`load` of a file already opened (pretrained_files.open_official / open_diffusers)."""
  if file.kind == files.OFFICIAL:
    return _load_official(file, config, weights)
  return _load_diffusers(file, config)


def describe(config: ml_collections.ConfigDict) -> str:
  m = config.model
  return (
    f"the config's U-Net (model.ch={int(m.ch)}, ch_mult={tuple(m.ch_mult)}, "
    f"num_res_blocks={int(m.num_res_blocks)}, attn_resolutions="
    f"{tuple(m.attn_resolutions)} at data.image_size={int(config.data.image_size)})"
  )


def _official_tensors(
  file: files.TensorFile, weights: str
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
  """(every model tensor of an official checkpoint, raw or shadow, by its raw name -> shape,
  with the shapes of the ones ``weights`` selects; the selected ones alone). Adam slots
  and variables outside the model scope are not the model's."""
  scope = names.OFFICIAL_SCOPE + "/"
  model = {
    n: s for n, s in file.shapes.items() if n.startswith(scope) and not n.endswith(_SLOT_SUFFIXES)
  }
  shadows = {n[: -len(EMA_SUFFIX)]: s for n, s in model.items() if n.endswith(EMA_SUFFIX)}
  raw = {n: s for n, s in model.items() if not n.endswith(EMA_SUFFIX)}
  if weights == "ema" and not shadows:
    raise ConfigError(
      f"{file.path} holds no ExponentialMovingAverage shadows (the weights the "
      "paper samples with); pass --weights=raw (weights='raw') to load its raw "
      "training weights."
    )
  if not raw and weights == "raw":
    raise ConfigError(f"{file.path} holds no raw weights under the scope {scope!r}.")
  chosen = shadows if weights == "ema" else raw
  return {**raw, **shadows, **chosen}, chosen


def _expected(config: ml_collections.ConfigDict, kind: str) -> dict[str, tuple]:
  """File name -> (ddpm_jax path, file shape) of every weight of ``config``'s U-Net."""
  shapes = names.model_shapes(config)
  levels = len(config.model.ch_mult)
  if kind == files.OFFICIAL:
    return {names.official_name(p): (p, s) for p, s in shapes.items()}
  return {
    names.diffusers_name(p, levels): (p, names.diffusers_shape(p, s)) for p, s in shapes.items()
  }


def _fitting_configs(found: dict[str, tuple[int, ...]], kind: str) -> list[str]:
  """The files configs/<name>.py whose U-Net has exactly the tensors ``found`` (none where
  the repository's configs/ is not importable, e.g. run from outside the checkout)."""
  try:
    import configs
  except ImportError:
    return []
  fits = []
  for info in pkgutil.iter_modules(configs.__path__):
    if info.name.startswith("_") or info.name == "default":
      continue
    candidate = importlib.import_module(f"configs.{info.name}").get_config()
    try:
      expected = _expected(candidate, kind)
    except ValueError:  # A config whose U-Net cannot be built: it fits nothing.
      continue
    if {n: s for n, (_, s) in expected.items()} == found:
      fits.append(f"configs/{info.name}.py")
  return fits


def _check_layout(
  file: files.TensorFile, found: dict[str, tuple[int, ...]], config: ml_collections.ConfigDict
) -> dict[str, tuple]:
  """The expected tensors of ``config`` if ``found`` (name -> shape) is exactly them;
  ConfigError naming the first missing, extra or mis-shaped tensor otherwise."""
  expected = _expected(config, file.kind)
  missing = [n for n in expected if n not in found]
  extra = sorted(n for n in found if n not in expected)
  problem = None
  if missing:
    problem = f"tensor {missing[0]} is missing" + (
      f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    )
  elif extra:
    problem = f"it has a tensor {extra[0]} that {describe(config)} lacks" + (
      f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    )
  else:
    for name, (_, shape) in expected.items():
      if tuple(found[name]) != tuple(shape):
        problem = f"{name} has shape {list(found[name])} where {describe(config)} has {list(shape)}"
        break
  if problem is None:
    return expected
  fits = _fitting_configs(found, file.kind)
  hint = (
    f" {' and '.join(fits)} fit{'s' if len(fits) == 1 else ''} it."
    if fits
    else " No config in configs/ fits it."
  )
  if missing or extra:
    problem = f"{file.path} does not fit {describe(config)}: {problem}."
  else:
    problem = f"{file.path}: {problem}."
  raise ConfigError(problem + hint)


def _read_tree(
  file: files.TensorFile, expected: dict[str, tuple], suffix: str = ""
) -> dict[str, Any]:
  """The params tree (nested dicts of float32 NumPy arrays) read from ``file``."""
  flat = {}
  for name, (path, _) in expected.items():
    value = file.read(name + suffix)
    flat[path] = names.from_diffusers(path, value) if file.kind == files.DIFFUSERS else value
  return traverse_util.unflatten_dict(flat)


def _load_official(
  file: files.TensorFile, config: ml_collections.ConfigDict, weights: str
) -> Pretrained:
  if int(config.model.num_groups) != OFFICIAL_NUM_GROUPS:
    raise ConfigError(
      f"model.num_groups={config.model.num_groups}, but the official U-Net "
      f"normalises with {OFFICIAL_NUM_GROUPS} groups (tf.contrib group_norm)."
    )
  found, chosen = _official_tensors(file, weights)
  expected = _check_layout(file, found, config)
  suffix = EMA_SUFFIX if weights == "ema" else ""
  unchosen = [n for n in expected if n not in chosen]
  if unchosen:
    raise ConfigError(
      f"{file.path}: tensor {unchosen[0]}{suffix} is missing"
      + (f" (and {len(unchosen) - 1} more)." if len(unchosen) > 1 else ".")
    )
  has_raw = all(file.shapes.get(n) == shape for n, (_, shape) in expected.items())
  params = _read_tree(file, expected, suffix)
  raw = _read_tree(file, expected) if weights == "ema" and has_raw else None
  logging.info("Read the %s weights of %s (step %s).", weights, file.path, file.step)
  return Pretrained(params, raw, file.step, files.OFFICIAL, file.path)


def _load_diffusers(file: files.TensorFile, config: ml_collections.ConfigDict) -> Pretrained:
  found = {names.legacy_diffusers_key(k): s for k, s in file.shapes.items()}
  renamed = {names.legacy_diffusers_key(k): k for k in file.shapes}
  expected = _check_layout(file, found, config)
  mismatch = names.diffusers_config_mismatch(file.config or {}, config)
  if mismatch:
    raise ConfigError(
      f"{os.path.join(file.path, files.CONFIG_FILE)}: {mismatch}; its "
      "UNet2DModel computes another function than ddpm_jax's U-Net."
    )
  legacy = dataclasses.replace(file, read=lambda name: file.read(renamed[name]))
  return Pretrained(_read_tree(legacy, expected), None, None, files.DIFFUSERS, file.path)


# ------------------------------------------------------------------ out: diffusers


def diffusers_tensors(params: Any, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """ddpm_jax params as a UNet2DModel state dict of NumPy float32 arrays (every weight
  used once; the keys of diffusers_config(config)'s UNet2DModel)."""
  levels = len(config.model.ch_mult)
  flat = traverse_util.flatten_dict(jax.device_get(params))
  return {names.diffusers_name(p, levels): names.to_diffusers(p, v) for p, v in flat.items()}


def export_diffusers(params: Any, config: ml_collections.ConfigDict, output: str) -> str:
  """Writes ``params`` (of config's U-Net) as a diffusers UNet2DModel folder ``output``,
  which ``UNet2DModel.from_pretrained(output)`` loads; returns the folder."""
  try:
    unet_config = names.diffusers_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  files.write_diffusers(output, unet_config, diffusers_tensors(params, config))
  return output


# ------------------------------------------------------------------ in: a workdir


def train_state(
  pretrained: Pretrained, config: ml_collections.ConfigDict, step: int
) -> train_state_lib.TrainState:
  """The TrainState of a run resumed from released weights at ``step``: EMA = the weights
  to sample with, params = the raw weights where the file has them (else the same), a
  fresh optimizer state (Adam moments 0, its count 0: the learning rate warms up again
  over training.warmup_steps) and the rng of training.seed."""
  model = factories.create_model(config)
  tx = train_state_lib.create_optimizer(config.training)
  abstract = train_state_lib.create_train_state(config, model, tx, abstract=True)
  params = pretrained.raw_params if pretrained.raw_params is not None else pretrained.params
  state = train_state_lib.TrainState(
    step=np.asarray(step, np.int32),
    params=params,
    ema_params=pretrained.params,
    opt_state=jax.device_get(tx.init(params)),
    rng=np.asarray(jax.random.key_data(jax.random.key(int(config.training.seed)))),
  )

  def shapes(tree):
    return jax.tree.map(lambda x: (tuple(np.shape(x)), np.dtype(x.dtype)), tree)

  if shapes(state) != shapes(abstract):  # An internal invariant, not the user's input.
    raise AssertionError("the imported state does not have the shape of a TrainState")
  return state


def write_workdir(
  pretrained: Pretrained, config: ml_collections.ConfigDict, workdir: str, step: int
) -> str:
  """Makes ``workdir`` an ordinary ddpm_jax workdir (config.json, a verified checkpoint at
  ``step``) of the released weights; refuses a workdir that holds a checkpoint. Returns
  the checkpoint's folder."""
  workdir = workdir_lib.prepare(workdir)
  with workdir_lib.WorkdirLock(workdir):
    if workdir_lib.has_checkpoint(workdir):
      raise ConfigError(
        f"workdir {workdir!r} already holds checkpoints; import into a new --workdir."
      )
    workdir_lib.check_or_write_config(config, workdir)
    checkpointer = checkpointing.Checkpointer(
      workdir,
      keep=int(config.training.keep_checkpoints),
      keep_every=int(config.training.keep_every_steps),
    )
    try:
      checkpointer.save(step, train_state(pretrained, config, step))
    finally:
      checkpointer.close()
  return os.path.join(workdir, workdir_lib.CHECKPOINT_DIR, str(step))


if __name__ == "__main__":
  from ddpm_jax import pretrained_cli

  pretrained_cli.run()
