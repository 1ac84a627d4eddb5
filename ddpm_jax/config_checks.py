"""Every rule a config must satisfy, checked once at the entry before anything is read,
compiled or written.

`check_config(config, mode)` checks the field groups that ``mode`` uses and raises
`ConfigError` with one line naming the field, its value and what is allowed. Modules below
the entry trust a checked config: they may assert the structure of their arguments but do
not re-validate fields. Rules that belong to a library object are called from here, not
copied (the U-Net's own constructor checks, the dataset registry's splits, DDIM's step grid).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from ddpm_jax import clipping, data_sources, datasets, diffusion, factories, samplers, schedules
from ddpm_jax.errors import ConfigError

MODES = ("train", "sample", "eval")
NONFINITE_MODES = ("raise", "skip")
FEATURE_NETWORKS = ("inception", "classifier")
# Linear-type schedules run from beta_start up to beta_end.
_RISING_SCHEDULES = ("linear", "quad", "warmup10", "warmup50")


# ------------------------------------------------------------------------ shared helpers


def choice(field: str, value: Any, allowed: tuple[str, ...]) -> str:
  if value not in allowed:
    raise ConfigError(f"{field}={value!r} is unknown; allowed: {', '.join(allowed)}.")
  return value


def integer(field: str, value: Any, minimum: int = 1, *, extra: tuple[int, ...] = ()) -> int:
  """An int >= minimum (or one of ``extra``, e.g. -1 for "all"); bools are refused."""
  ok = (
    isinstance(value, (int, np.integer))
    and not isinstance(value, bool)
    and (value >= minimum or value in extra)
  )
  if not ok:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    also = f" (or {' / '.join(map(str, extra))})" if extra else ""
    raise ConfigError(f"{field}={value!r} must be {what}{also}.")
  return int(value)


def number(
  field: str,
  value: Any,
  low: float,
  high: float,
  *,
  low_open: bool = False,
  high_open: bool = False,
) -> float:
  """A float in the interval from low to high (open where said)."""
  ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
  ok = (
    ok
    and (value > low if low_open else value >= low)
    and (value < high if high_open else value <= high)
  )
  if not ok and high == float("inf"):
    raise ConfigError(f"{field}={value!r} must be {'>' if low_open else '>='} {low:g}.")
  if not ok:
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ConfigError(f"{field}={value!r} must lie in {interval}.")
  return float(value)


def divides_devices(field: str, value: int) -> None:
  """A global batch must split evenly over every device of every process."""
  if value % jax.device_count():
    raise ConfigError(
      f"{field}={value} (a global batch) is not divisible by the {jax.device_count()} devices."
    )


def _library_rule(prefix: str, rule: Callable[[], Any]) -> Any:
  """Runs a library object's own check and reports its ValueError as bad config."""
  try:
    return rule()
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(f"{prefix}: {e}") from None


# ----------------------------------------------------------------------- field groups


def check_data(data: ml_collections.ConfigDict) -> datasets.DatasetSpec:
  """config.data: a known dataset at a shape it has, real splits, an existing data_dir."""
  spec = datasets.get(data.dataset)
  size = integer("data.image_size", data.image_size)
  channels = integer("data.num_channels", data.num_channels)
  if spec.image_size is not None and (size, channels) != (spec.image_size, spec.num_channels):
    raise ConfigError(
      f"data.image_size={size}, data.num_channels={channels} do not match "
      f"{spec.name!r}, which is {spec.image_size}x{spec.image_size}x"
      f"{spec.num_channels}."
    )
  if spec.num_channels is not None and channels != spec.num_channels:
    raise ConfigError(
      f"data.num_channels={channels} but {spec.name!r} images have {spec.num_channels} channels."
    )
  if spec.streamed:
    integer("data.shuffle_buffer", data.shuffle_buffer)
  spec.check_split(data.train_split, "data.train_split")
  spec.check_split(data.eval_split, "data.eval_split")
  data_dir = data.data_dir
  if data_dir and "://" not in data_dir and not os.path.isdir(data_dir):
    hint = (
      f"; it should hold the idx files ({data_sources.APT_HINT})"
      if spec.reader == "idx_files"
      else ""
    )
    raise ConfigError(f"data.data_dir={data_dir!r} is not an existing folder{hint}.")
  if spec.reader == "idx_files" and data_dir:  # No tfds fallback with an explicit folder.
    for split in (data.train_split, data.eval_split):
      path = data_sources.fashion_mnist_path(data_dir, split)
      if not os.path.isfile(path):
        raise ConfigError(
          f"Fashion-MNIST file {path} not found in data.data_dir; "
          f"{data_sources.APT_HINT} (files under "
          f"{data_sources.FASHION_MNIST_DIR}) or point data.data_dir at them."
        )
  return spec


def check_model(config: ml_collections.ConfigDict) -> None:
  """config.model: field types here, values by the U-Net's own checks (with data's shape)."""
  mdl = config.model
  for name in ("ch_mult", "attn_resolutions"):
    value = mdl[name]
    if (
      not isinstance(value, (tuple, list))
      or (name == "ch_mult" and not value)
      or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
      raise ConfigError(f"model.{name}={value!r} must be a tuple of positive integers.")
  for name in ("ch", "num_res_blocks", "num_groups"):
    integer(f"model.{name}", mdl[name])
  number("model.dropout", mdl.dropout, 0.0, 1.0, high_open=True)
  _library_rule("model config (model.*, data.image_size)", lambda: factories.create_model(config))


def check_diffusion(diff: ml_collections.ConfigDict) -> None:
  """config.diffusion: the schedule and the parameterisation of the model and the loss."""
  choice("diffusion.beta_schedule", diff.beta_schedule, schedules.SCHEDULE_NAMES)
  integer("diffusion.num_timesteps", diff.num_timesteps)
  for name in ("beta_start", "beta_end"):
    number(f"diffusion.{name}", diff[name], 0.0, 1.0, low_open=True)
  if diff.beta_schedule in _RISING_SCHEDULES and not diff.beta_start < diff.beta_end:
    raise ConfigError(
      f"diffusion.beta_end={diff.beta_end} must be > diffusion.beta_start="
      f"{diff.beta_start} for the {diff.beta_schedule!r} schedule."
    )
  choice("diffusion.model_mean_type", diff.model_mean_type, diffusion.MEAN_TYPES)
  if diff.beta_schedule == "jsd" and diff.model_mean_type == "eps":
    raise ConfigError(
      "diffusion.beta_schedule='jsd' ends with beta_T = 1 (abar_T = 0), where "
      "x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) divides by zero: use "
      "model_mean_type 'xstart', 'xprev' or 'v' with it, or another schedule."
    )
  choice("diffusion.model_var_type", diff.model_var_type, diffusion.VAR_TYPES)
  choice("diffusion.loss_type", diff.loss_type, diffusion.LOSS_TYPES)
  if diff.loss_type == "mse" and diff.model_var_type in diffusion.LEARNED_VAR_TYPES:
    raise ConfigError(
      f"diffusion.loss_type='mse' cannot train model_var_type="
      f"{diff.model_var_type!r}; use 'hybrid' or 'kl'."
    )


def check_sampler(config: ml_collections.ConfigDict) -> samplers.SamplerOptions:
  """config.sampling's method and its group (also used by training grids and FID samples):
  the options class's own check, reported under the group's name, the innermost method
  (the predictor of "pc") first."""
  smp = config.sampling
  choice("sampling.method", smp.method, tuple(samplers.METHODS))
  try:
    options = samplers.from_config(smp)
  except ValueError as e:
    raise ConfigError(f"sampling.{smp.method}.{e}") from None
  spec = factories.create_model_spec(config.diffusion)
  for group, nested in samplers.nested(options):
    try:
      nested.check(int(config.diffusion.num_timesteps), spec)
    except ValueError as e:
      fields = {f.name for f in dataclasses.fields(nested)}
      at_field = str(e).split("=")[0] in fields  # "num_steps=0 must ..." names a field.
      raise ConfigError(f"sampling.{group}{'.' if at_field else ': '}{e}") from None
  if (
    isinstance(options, samplers.AnnealedLangevinOptions)
    and config.diffusion.beta_schedule == "jsd"
    and samplers.ddim_timesteps(
      int(config.diffusion.num_timesteps), options.num_steps, options.skip
    ).max()
    == config.diffusion.num_timesteps - 1
  ):
    raise ConfigError(
      f"sampling.method='annealed_langevin' with sampling.annealed_langevin."
      f"num_steps={options.num_steps} reaches t=T-1, where the 'jsd' schedule "
      "has abar = 0 (an infinite NCSN sigma); use fewer num_steps or another "
      "schedule."
    )
  integer("sampling.seed", smp.seed, 0)
  return options


def check_restore(config: ml_collections.ConfigDict) -> None:
  """The checkpoint sampling and evaluation read."""
  integer("sampling.checkpoint_step", config.sampling.checkpoint_step, 0, extra=(-1,))


def check_training(tr: ml_collections.ConfigDict) -> None:
  """config.training: lengths, intervals, the optimizer, the EMA and the global batch."""
  for name in (
    "num_train_steps",
    "batch_size",
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "steps_per_call",
  ):
    integer(f"training.{name}", tr[name])
  for name in (
    "sample_every_steps",
    "warmup_steps",
    "num_grid_samples",
    "seed",
    "keep_every_steps",
    "profile_start_step",
    "profile_num_steps",
  ):
    integer(f"training.{name}", tr[name], 0)
  if tr.keep_every_steps % tr.checkpoint_every_steps:
    raise ConfigError(
      f"training.keep_every_steps={tr.keep_every_steps} must be a multiple of "
      f"training.checkpoint_every_steps={tr.checkpoint_every_steps} (or 0)."
    )
  number("training.learning_rate", tr.learning_rate, 0.0, float("inf"), low_open=True)
  number("training.grad_clip", tr.grad_clip, 0.0, float("inf"), low_open=True)
  number("training.ema_decay", tr.ema_decay, 0.0, 1.0, high_open=True)
  for name in ("adam_b1", "adam_b2"):
    number(f"training.{name}", tr[name], 0.0, 1.0, high_open=True)
  number("training.adam_eps", tr.adam_eps, 0.0, float("inf"), low_open=True)
  number("training.peak_tflops", tr.peak_tflops, 0.0, float("inf"))
  choice("training.nonfinite", tr.nonfinite, NONFINITE_MODES)
  if choice("training.clip_mode", tr.clip_mode, clipping.CLIP_MODES) != "global":
    integer("training.clip_replicas", tr.clip_replicas, 0)
    choice("training.replica_loop", tr.replica_loop, clipping.REPLICA_LOOPS)
  k = tr.steps_per_call
  for name in ("log_every_steps", "checkpoint_every_steps", "sample_every_steps"):
    if tr[name] % k:
      raise ConfigError(
        f"training.{name}={tr[name]} must be a multiple of "
        f"training.steps_per_call={k} (or 0 where 0 disables it)."
      )
  divides_devices("training.batch_size", tr.batch_size)
  _library_rule(
    f"training.clip_mode={tr.clip_mode!r}, training.clip_replicas={tr.clip_replicas}",
    lambda: clipping.ClipPlan.from_config(tr, jax.device_count()),
  )
  if tr.sample_every_steps:
    divides_devices("training.num_grid_samples", tr.num_grid_samples)


def check_sampling_run(smp: ml_collections.ConfigDict) -> None:
  """--mode=sample's own fields."""
  integer("sampling.num_samples", smp.num_samples)
  divides_devices("sampling.batch_size", integer("sampling.batch_size", smp.batch_size))
  tag = smp.tag
  if not isinstance(tag, str) or (tag and not tag.replace("_", "").replace("-", "").isalnum()):
    raise ConfigError(f"sampling.tag={tag!r} may hold only letters, digits, '_' and '-'.")


def check_eval(config: ml_collections.ConfigDict, spec: datasets.DatasetSpec) -> None:
  """config.eval: bits/dim on data.eval_split and, when asked for, FID / IS."""
  ev = config.eval
  divides_devices("eval.batch_size", integer("eval.batch_size", ev.batch_size))
  integer("eval.num_examples", ev.num_examples, extra=(-1,))
  integer("eval.seed", ev.seed, 0)
  if integer("eval.fid_num_samples", ev.fid_num_samples, 0) == 0:
    if ev.checkpoint_steps:
      raise ConfigError(
        f"eval.checkpoint_steps={ev.checkpoint_steps!r} scores FID at each "
        "checkpoint: set eval.fid_num_samples > 0."
      )
    return
  spec_steps = str(ev.checkpoint_steps)
  if spec_steps not in ("", "all") and not all(s.strip().isdigit() for s in spec_steps.split(",")):
    raise ConfigError(
      f"eval.checkpoint_steps={spec_steps!r} must be '', 'all' or "
      "comma-separated steps, e.g. '100000,200000'."
    )
  if ev.fid_num_samples < 2:
    raise ConfigError(f"eval.fid_num_samples={ev.fid_num_samples} must be 0 (no FID) or >= 2.")
  divides_devices("sampling.batch_size", integer("sampling.batch_size", config.sampling.batch_size))
  spec.check_split(ev.fid_reference_split, "eval.fid_reference_split")
  if (
    integer("eval.fid_reference_num_examples", ev.fid_reference_num_examples, extra=(-1,)) != -1
    and "[" in ev.fid_reference_split
  ):
    raise ConfigError(
      f"eval.fid_reference_num_examples={ev.fid_reference_num_examples} takes "
      f"the first images of an unsliced split, not "
      f"eval.fid_reference_split={ev.fid_reference_split!r}; set one of them "
      "(-1: the whole split)."
    )
  network = choice("eval.feature_network", ev.feature_network, FEATURE_NETWORKS)
  if network == "inception":
    from ddpm_jax.evaluation import inception

    choice("eval.inception_preprocess", ev.inception_preprocess, inception.PREPROCESSINGS)
    if not ev.inception_weights or not os.path.isfile(ev.inception_weights):
      raise ConfigError(inception.missing_weights_message(ev.inception_weights))
    return
  if spec.streamed or not spec.labeled:
    raise ConfigError(
      f"eval.feature_network='classifier' needs an in-memory dataset with "
      f"labels ({', '.join(s.name for s in datasets.SPECS if s.labeled)}), not "
      f"data.dataset={spec.name!r}; use the inception network."
    )
  for name in ("steps", "batch_size", "width", "feature_dim"):
    integer(f"eval.classifier_{name}", ev[f"classifier_{name}"])
  integer("eval.classifier_seed", ev.classifier_seed, 0)
  number(
    "eval.classifier_learning_rate", ev.classifier_learning_rate, 0.0, float("inf"), low_open=True
  )


def check_distributed(config: ml_collections.ConfigDict) -> int:
  """The heartbeat timeout of a multi-host run, checked before jax.distributed starts (an
  integer, as JAX takes it; under 2 s a busy host's scheduling delays alone would stop a
  healthy pod)."""
  return integer("heartbeat_timeout_seconds", config.heartbeat_timeout_seconds, 2)


def check_config(config: ml_collections.ConfigDict, mode: str) -> None:
  """Checks every field ``mode`` ("train", "sample" or "eval") uses; ConfigError if one is bad."""
  choice("--mode", mode, MODES)
  spec = check_data(config.data)
  check_diffusion(config.diffusion)
  check_model(config)
  check_sampler(config)
  if mode == "train":
    check_training(config.training)
    return
  check_restore(config)
  if mode == "sample":
    check_sampling_run(config.sampling)
  else:
    check_eval(config, spec)
