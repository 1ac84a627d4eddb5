"""Training: TrainState, the pmapped train step (paper Algorithm 1), EMA, and the train loop.

The recipe is the paper's (App. B): L_simple on uniformly drawn t, Adam with linear warm-up,
gradient clipping at global norm, an exponential moving average of the parameters. The
step is pmapped over all devices with gradients and metrics averaged by ``lax.pmean``.

Randomness is a pure function of (seed, step): the timestep and noise of example i of
global batch `step` come from fold_in(fold_in(key(seed), step), i) whatever the device
count, and a resumed run repeats an uninterrupted one bit for bit. Dropout masks are drawn
per device from (seed, step, device index), so with dropout 0 a step on 8 devices equals
the step on 1 device at the same global batch (up to float reduction order); with dropout
the masks, not the expectation, depend on the device count.
"""

from __future__ import annotations

import functools
import signal
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from ddpm_jax import checkpointing
from ddpm_jax import diffusion
from ddpm_jax import input_pipeline
from ddpm_jax import sampling
from ddpm_jax import schedules
from ddpm_jax import train_logging
from ddpm_jax.models import unet as unet_lib

AXIS = "batch"


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs. ``rng`` holds the raw key data of key(seed).

  ``nonfinite_steps`` counts the steps whose loss or gradients were not finite (their
  updates were not applied); ``last_nonfinite_step`` is the latest of them (-1: none).
  """
  step: jnp.ndarray
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jnp.ndarray
  nonfinite_steps: jnp.ndarray = flax.struct.field(
      default_factory=lambda: jnp.zeros((), jnp.int32))
  last_nonfinite_step: jnp.ndarray = flax.struct.field(
      default_factory=lambda: jnp.full((), -1, jnp.int32))


def validate_config(config: ml_collections.ConfigDict, *, mode: str = "train") -> None:
  """Cheap checks of the fields ``mode`` uses, before anything is compiled, read or written.

  'train' checks every training field; 'sample' and 'eval' only the model, the diffusion and
  the sampling. Raises ValueError: one line naming the field, its value and what is allowed.
  """
  diffusion._check_choice("mode", mode, ("train", "sample", "eval"))
  diff, smp, mdl = config.diffusion, config.sampling, config.model
  for name in ("ch_mult", "attn_resolutions"):
    value = mdl[name]
    if (not isinstance(value, (tuple, list)) or (name == "ch_mult" and not value) or
        not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
      raise ValueError(f"model.{name}={value!r} must be a tuple of positive integers.")
  for name in ("ch", "num_res_blocks", "num_groups"):
    if isinstance(mdl[name], bool) or not isinstance(mdl[name], int) or mdl[name] < 1:
      raise ValueError(f"model.{name}={mdl[name]!r} must be a positive integer.")
  if any(mdl.ch * m % mdl.num_groups for m in mdl.ch_mult):
    raise ValueError(f"model.num_groups={mdl.num_groups} must divide the width of every level "
                     f"(model.ch={mdl.ch} x ch_mult={tuple(mdl.ch_mult)}).")
  if not 0.0 <= float(mdl.dropout) < 1.0:
    raise ValueError(f"model.dropout={mdl.dropout} must lie in [0, 1).")
  try:
    create_model(config)  # The compute dtype, and the image size against ch_mult.
  except ValueError as e:
    raise ValueError(f"model config (model.*, data.image_size): {e}") from None
  diffusion._check_choice("diffusion.beta_schedule", diff.beta_schedule,
                          schedules.SCHEDULE_NAMES)
  if isinstance(diff.num_timesteps, bool) or int(diff.num_timesteps) < 1:
    raise ValueError(f"diffusion.num_timesteps={diff.num_timesteps!r} must be a positive integer.")
  for name in ("beta_start", "beta_end"):
    if not 0.0 < float(diff[name]) <= 1.0:
      raise ValueError(f"diffusion.{name}={diff[name]} must lie in (0, 1].")
  if (diff.beta_schedule in ("linear", "quad", "warmup10", "warmup50") and
      not float(diff.beta_start) < float(diff.beta_end)):
    raise ValueError(f"diffusion.beta_end={diff.beta_end} must be > diffusion.beta_start="
                     f"{diff.beta_start} for the {diff.beta_schedule!r} schedule.")
  if int(smp.checkpoint_step) < -1:
    raise ValueError(f"sampling.checkpoint_step={smp.checkpoint_step} must be a step >= 0 or "
                     "-1 (the latest).")
  diffusion._check_choice("diffusion.model_mean_type", diff.model_mean_type,
                          diffusion.MEAN_TYPES)
  diffusion._check_choice("diffusion.model_var_type", diff.model_var_type, diffusion.VAR_TYPES)
  diffusion._check_choice("diffusion.loss_type", diff.loss_type, diffusion.LOSS_TYPES)
  diffusion._check_choice("sampling.method", smp.method, sampling.SAMPLING_METHODS)
  if smp.method == "ddim":
    sampling.ddim_timesteps(int(diff.num_timesteps), int(smp.num_steps))
  if not float(smp.eta) >= 0:
    raise ValueError(f"sampling.eta={smp.eta} must be >= 0.")
  if mode != "train":
    if jax.process_count() > 1:
      raise ValueError(f"--mode={mode} runs on one host; got {jax.process_count()} processes.")
    return
  tr = config.training
  for name in ("num_train_steps", "batch_size", "log_every_steps", "checkpoint_every_steps",
               "keep_checkpoints"):
    if int(tr[name]) <= 0:
      raise ValueError(f"training.{name}={tr[name]} must be a positive integer.")
  for name in ("sample_every_steps", "warmup_steps", "num_grid_samples"):
    if int(tr[name]) < 0:
      raise ValueError(f"training.{name}={tr[name]} must be >= 0 (0 disables it).")
  if not float(tr.learning_rate) > 0:
    raise ValueError(f"training.learning_rate={tr.learning_rate} must be > 0.")
  if not float(tr.grad_clip) > 0:
    raise ValueError(f"training.grad_clip={tr.grad_clip} must be > 0.")
  if not 0.0 <= float(tr.ema_decay) < 1.0:
    raise ValueError(f"training.ema_decay={tr.ema_decay} must lie in [0, 1).")
  diffusion._check_choice("training.nonfinite", tr.get("nonfinite", "raise"),
                          ("raise", "skip"))
  k = tr.get("steps_per_call", 1)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"training.steps_per_call={k!r} must be a positive integer.")
  for name in ("log_every_steps", "checkpoint_every_steps", "sample_every_steps"):
    if int(tr[name]) % k:
      raise ValueError(f"training.{name}={tr[name]} must be a multiple of "
                       f"training.steps_per_call={k} (or 0 where 0 disables it).")
  num_devices = jax.device_count()
  if tr.batch_size % num_devices:
    raise ValueError(f"training.batch_size={tr.batch_size} (the global batch) is not divisible "
                     f"by the {num_devices} devices.")
  if tr.sample_every_steps and tr.num_grid_samples % num_devices:
    raise ValueError(f"training.num_grid_samples={tr.num_grid_samples} is not divisible by the "
                     f"{num_devices} devices.")
  if diff.loss_type == "mse" and diff.model_var_type in diffusion.LEARNED_VAR_TYPES:
    raise ValueError(f"diffusion.loss_type='mse' cannot train model_var_type="
                     f"{diff.model_var_type!r}; use 'hybrid' or 'kl'.")


def create_schedule(diffusion_config: ml_collections.ConfigDict) -> diffusion.DiffusionSchedule:
  betas = schedules.get_beta_schedule(diffusion_config.beta_schedule,
                                      int(diffusion_config.num_timesteps),
                                      beta_start=float(diffusion_config.beta_start),
                                      beta_end=float(diffusion_config.beta_end))
  return diffusion.DiffusionSchedule.from_betas(betas)


def create_model(config: ml_collections.ConfigDict) -> unet_lib.UNet:
  """The U-Net of config.model; 2C output channels when the variance is learned."""
  channels = int(config.data.num_channels)
  learned = config.diffusion.model_var_type in diffusion.LEARNED_VAR_TYPES
  return unet_lib.create_model(config.model, image_size=int(config.data.image_size),
                               num_channels=channels, out_ch=channels * (2 if learned else 1))


def learning_rate_schedule(training_config: ml_collections.ConfigDict) -> optax.Schedule:
  """lr * min(step / warmup_steps, 1), the official code's linear warm-up."""
  lr, warmup = float(training_config.learning_rate), int(training_config.warmup_steps)
  if warmup == 0:
    return optax.constant_schedule(lr)
  return lambda count: lr * jnp.minimum(count / warmup, 1.0)


def create_optimizer(training_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping, then Adam with the warm-up schedule (paper App. B)."""
  return optax.chain(
      optax.clip_by_global_norm(float(training_config.grad_clip)),
      optax.adam(learning_rate_schedule(training_config), b1=float(training_config.adam_b1),
                 b2=float(training_config.adam_b2), eps=float(training_config.adam_eps)))


def create_train_state(config: ml_collections.ConfigDict, model: unet_lib.UNet,
                       tx: optax.GradientTransformation, *, abstract: bool = False) -> TrainState:
  """Initial state, a pure function of training.seed. EMA starts at the initial params.

  ``abstract=True`` returns only its shapes and dtypes (jax.eval_shape: nothing is
  compiled or allocated), the restore target of a resumed run.
  """
  size, channels = int(config.data.image_size), int(config.data.num_channels)
  seed_key = jax.random.key(int(config.training.seed))
  init_key = jax.random.fold_in(seed_key, 0x1417)

  def init(key: jax.Array) -> TrainState:
    x = jnp.zeros((1, size, size, channels), jnp.float32)
    params = model.init(key, x, jnp.zeros((1,), jnp.int32), train=False)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=tx.init(params), rng=jax.random.key_data(seed_key))

  return jax.eval_shape(init, init_key) if abstract else jax.jit(init)(init_key)


def num_params(params: Any) -> int:
  return sum(int(np.prod(np.shape(p))) for p in jax.tree.leaves(params))


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
  """A copy of ``tree`` on every device, laid out exactly as jax.pmap lays out its outputs.

  (flax.jax_utils.replicate's layout differs, so the first pmapped train step would be
  compiled twice: once for it and once for the step's own outputs.)
  """
  devices = list(devices or jax.local_devices())
  broadcast = jax.pmap(lambda x, _: x, in_axes=(None, 0), axis_name=AXIS, devices=devices)
  return broadcast(tree, np.zeros(len(devices), np.int8))


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a pmap-replicated tree, as NumPy arrays.

  Reads device 0's shard directly (indexing x[0] would compile a gather per leaf shape;
  flax.jax_utils.unreplicate keeps the device axis of a pmap over one of several devices).
  """
  def first(x: Any) -> np.ndarray:
    if not isinstance(x, jax.Array):
      return np.asarray(x)[0]
    data = np.asarray(x.addressable_shards[0].data)
    return data[0] if data.ndim == x.ndim else data

  return jax.tree.map(first, tree)


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
  """ema <- decay * ema + (1 - decay) * params (tf.train.ExponentialMovingAverage)."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def example_noise(step_key: jax.Array, first_index: jnp.ndarray, batch: int, image_shape: tuple,
                  num_timesteps: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """t ~ Uniform{0..T-1} and noise ~ N(0, I) of examples first_index .. first_index+batch-1."""
  keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(first_index + jnp.arange(batch))
  t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0, num_timesteps))(keys)
  noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), image_shape))(keys)
  return t.astype(jnp.int32), noise


def example_flips(step_key: jax.Array, first_index: jnp.ndarray, batch: int) -> jnp.ndarray:
  """Random horizontal flip decisions (p = 1/2) of examples first_index .. +batch-1."""
  keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(first_index + jnp.arange(batch))
  return jax.vmap(jax.random.bernoulli)(keys)


def train_step(state: TrainState, images: jnp.ndarray, *, model: unet_lib.UNet,
               schedule: diffusion.DiffusionSchedule, tx: optax.GradientTransformation,
               lr_fn: optax.Schedule, diffusion_config: ml_collections.ConfigDict,
               ema_decay: float, random_flip: bool = False
               ) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One step of Algorithm 1 on this device's uint8 batch; call under pmap(axis_name=AXIS).

  ``random_flip`` mirrors each example with probability 1/2, on the device, keyed like the
  noise by (seed, step, global example index).
  """
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  device = jax.lax.axis_index(AXIS)
  batch = images.shape[0]
  if random_flip:
    images = input_pipeline.flip_on_device(
        images, example_flips(jax.random.fold_in(step_key, 2), device * batch, batch))
  x_start = input_pipeline.to_model_input(images)
  t, noise = example_noise(jax.random.fold_in(step_key, 0), device * batch, batch,
                           x_start.shape[1:], schedule.num_timesteps)
  dropout_key = jax.random.fold_in(jax.random.fold_in(step_key, 1), device)

  def loss_fn(params: Any) -> jnp.ndarray:
    def model_fn(x_t: jnp.ndarray, t_: jnp.ndarray) -> jnp.ndarray:
      return model.apply({"params": params}, x_t, t_, train=True, rngs={"dropout": dropout_key})
    losses = diffusion.training_losses(
        schedule, model_fn, x_start, t, noise, model_mean_type=diffusion_config.model_mean_type,
        model_var_type=diffusion_config.model_var_type, loss_type=diffusion_config.loss_type)
    return jnp.mean(losses)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  loss = jax.lax.pmean(loss, AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  # A step with a non-finite loss or gradient keeps the old params, optimizer state and EMA
  # (the selects fuse into the update) and is counted; the loop raises or goes on according
  # to training.nonfinite. Identical pmean'd values on every device: they all agree.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1, params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      ema_params=keep(ema_update(state.ema_params, params, ema_decay), state.ema_params),
      nonfinite_steps=state.nonfinite_steps + jnp.where(finite, 0, 1).astype(jnp.int32),
      last_nonfinite_step=jnp.where(finite, state.last_nonfinite_step, state.step + 1))
  metrics = dict(loss=loss, grad_norm=grad_norm, learning_rate=lr_fn(state.step),
                 nonfinite_steps=new_state.nonfinite_steps)
  return new_state, metrics


def steps_per_call(config: ml_collections.ConfigDict) -> int:
  """training.steps_per_call (default 1): train steps run by one pmapped call."""
  return int(config.training.get("steps_per_call", 1))


def make_p_train_step(config: ml_collections.ConfigDict, model: unet_lib.UNet,
                      schedule: diffusion.DiffusionSchedule, tx: optax.GradientTransformation,
                      *, devices: Sequence[jax.Device] | None = None,
                      num_steps: int | None = None
                      ) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """train_step pmapped over ``devices`` (default: all local ones), the state donated.

  With ``num_steps`` k > 1 (default: training.steps_per_call) one call runs k steps in a
  lax.scan over uint8 batches stacked as [devices, k, per_device, H, W, C] and returns the
  metrics of the last step: the same result as k calls of the one-step version, with one
  dispatch and one host round trip instead of k.
  """
  step = functools.partial(train_step, model=model, schedule=schedule, tx=tx,
                           lr_fn=learning_rate_schedule(config.training),
                           diffusion_config=config.diffusion,
                           ema_decay=float(config.training.ema_decay),
                           random_flip=bool(config.data.random_flip))
  k = steps_per_call(config) if num_steps is None else int(num_steps)
  if k > 1:
    def scanned(state: TrainState, images: jnp.ndarray) -> tuple[TrainState, dict]:
      state, metrics = jax.lax.scan(step, state, images)
      return state, jax.tree.map(lambda m: m[-1], metrics)
    return jax.pmap(scanned, axis_name=AXIS, donate_argnums=(0,), devices=devices)
  return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,), devices=devices)


def make_p_sample(config: ml_collections.ConfigDict, model: unet_lib.UNet,
                  schedule: diffusion.DiffusionSchedule, per_device: int
                  ) -> Callable[[Any, jax.Array], jnp.ndarray]:
  """pmapped (params, rng) -> uint8 samples [devices, per_device, H, W, C] (config.sampling)."""
  size, channels = int(config.data.image_size), int(config.data.num_channels)
  smp, diff = config.sampling, config.diffusion

  def sample_fn(params: Any, rng: jax.Array) -> jnp.ndarray:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))
    model_fn = lambda x_t, t: model.apply({"params": params}, x_t, t, train=False)
    x = sampling.generate(schedule, model_fn, rng, (per_device, size, size, channels),
                          method=smp.method, model_mean_type=diff.model_mean_type,
                          model_var_type=diff.model_var_type, num_steps=int(smp.num_steps),
                          eta=float(smp.eta), clip_denoised=bool(smp.clip_denoised))
    return sampling.to_uint8(x)

  return jax.pmap(sample_fn, axis_name=AXIS, in_axes=(0, None))


class _SigtermFlag:
  """Records SIGTERM (TPU preemption) so the loop can checkpoint and exit cleanly."""

  def __init__(self) -> None:
    self.received = False
    self._previous = None

  def __enter__(self) -> "_SigtermFlag":
    if jax.process_count() > 1:
      # Pods: JAX's preemption notifier (jax.distributed) owns SIGTERM and the hosts agree
      # on the step through Checkpointer.reached_preemption; a local flag would desync them.
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: no handler, rely on periodic checkpoints.
      self._previous = None
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    logging.warning("SIGTERM received: saving a checkpoint at the current step, then exiting.")
    self.received = True

  def __exit__(self, *exc: Any) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains to training.num_train_steps, resuming from the latest checkpoint in workdir.

  Returns the final (unreplicated) TrainState. Exits early, after saving, on SIGTERM.
  Everything is validated before the workdir is written to; the workdir is then locked
  (workdir/train.lock) for the whole run, so a second training process on it is refused.
  """
  input_pipeline.validate_data_config(config.data)  # The data first: the model must fit it.
  validate_config(config)
  model = create_model(config)
  workdir = checkpointing.prepare_workdir(workdir)
  checkpointing.check_config(config, workdir)  # A refused resume writes nothing, no lock file.
  with checkpointing.WorkdirLock(workdir, enabled=jax.process_index() == 0):
    return _train_locked(config, workdir, model)


def _train_locked(config: ml_collections.ConfigDict, workdir: str,
                  model: unet_lib.UNet) -> TrainState:
  """The body of train_and_evaluate, run while this process holds the workdir lock."""
  is_chief = jax.process_index() == 0
  logging.info("JAX process %d/%d, %d local / %d global devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  checkpointing.check_or_write_config(config, workdir, write=is_chief)

  tr = config.training
  schedule = create_schedule(config.diffusion)
  tx = create_optimizer(tr)
  checkpointer = checkpointing.Checkpointer(workdir, keep=int(tr.keep_checkpoints))
  restored = None
  if checkpointer.latest_step() is not None:
    restored = checkpointer.restore(create_train_state(config, model, tx, abstract=True))
    state = restored
    logging.info("Resumed from the checkpoint at step %d in %s.", int(state.step), workdir)
  else:
    state = create_train_state(config, model, tx)
  start_step, num_steps = int(state.step), int(tr.num_train_steps)
  if start_step >= num_steps:
    logging.info("Step %d >= training.num_train_steps=%d: nothing to train.", start_step, num_steps)
    checkpointer.close()
    return state

  writer = train_logging.MetricWriter(workdir, enabled=is_chief)
  if restored is None:
    writer.write_hparams(config, num_params=num_params(state.params))
  k = steps_per_call(config)
  p_train_step = make_p_train_step(config, model, schedule, tx)
  p_one_step = make_p_train_step(config, model, schedule, tx, num_steps=1) if k > 1 else None

  def chunk(step: int) -> int:
    """Steps of the call starting at ``step``: k on multiples of k (so every log, checkpoint
    and sample step ends a call), single steps to align a resume or finish the run."""
    return k if step % k == 0 and step + k <= num_steps else 1

  def stacked(it: Any) -> Any:
    step = start_step
    while step < num_steps:
      n = chunk(step)
      yield next(it) if n == 1 else np.stack([next(it) for _ in range(n)], axis=1)
      step += n

  grid_per_device = int(tr.num_grid_samples) // jax.device_count()
  p_sample = (make_p_sample(config, model, schedule, grid_per_device)
              if tr.sample_every_steps and grid_per_device else None)
  batches = input_pipeline.prefetch_to_device(stacked(input_pipeline.create_train_iterator(
      config.data, global_batch_size=int(tr.batch_size), seed=int(tr.seed),
      start_step=start_step, random_flip=False)))  # train_step flips on the device.
  p_state = replicate(state)
  progress = train_logging.Progress(start_step, num_steps, int(tr.batch_size))
  nonfinite_mode = tr.get("nonfinite", "raise")
  checked = dict(step=start_step, nonfinite=int(state.nonfinite_steps))
  del state

  def unreplicated_state() -> TrainState:
    return jax.device_get(unreplicate(p_state))

  def fetch_finite_metrics(p_metrics: dict, done: int) -> dict[str, float]:
    """The metrics on the host; raises (training.nonfinite='raise') or warns ('skip') if a
    step since the last check had a non-finite loss or gradients (its update was skipped)."""
    metrics = {k: float(v) for k, v in unreplicate(p_metrics).items()}
    total = int(metrics["nonfinite_steps"])
    new, first_unchecked = total - checked["nonfinite"], checked["step"] + 1
    checked.update(step=done, nonfinite=total)
    if new > 0:
      last = int(unreplicate(p_state.last_nonfinite_step))
      if nonfinite_mode == "raise":
        raise FloatingPointError(
            f"Non-finite loss or gradients at step {last} ({new} such step(s) among steps "
            f"{first_unchecked}..{done}); nothing after step {checkpointer.latest_step()} was "
            "saved. Lower training.learning_rate or check the data, or pass "
            "--config.training.nonfinite=skip to skip such steps.")
      logging.warning("Skipped the update of %d step(s) with a non-finite loss or gradients "
                      "among steps %d..%d, the latest at step %d (%d skipped since step 0).", new,
                      first_unchecked, done, last, total)
    return metrics

  def save(done: int, p_metrics: dict) -> None:
    fetch_finite_metrics(p_metrics, done)  # Never checkpoint a state made from inf/NaN.
    checkpointer.save(done, unreplicated_state())

  with _SigtermFlag() as sigterm:
    done = start_step
    while done < num_steps:
      n = chunk(done)
      p_state, p_metrics = (p_train_step if n == k else p_one_step)(p_state, next(batches))
      done += n
      if done % tr.log_every_steps == 0 or done == num_steps:
        metrics = fetch_finite_metrics(p_metrics, done)
        metrics.update(progress.update(done))
        writer.write_scalars(done, metrics)
        logging.info("%s", progress.line(done, metrics))
      if sigterm.received or checkpointer.reached_preemption(done):
        save(done, p_metrics)
        logging.info("Saved the checkpoint of step %d after SIGTERM; exiting.", done)
        break
      if done % tr.checkpoint_every_steps == 0 or done == num_steps:
        save(done, p_metrics)
      if p_sample is not None and (done % tr.sample_every_steps == 0 or done == num_steps):
        rng = jax.random.fold_in(jax.random.key(int(config.sampling.seed)), done)
        images = np.asarray(p_sample(p_state.ema_params, rng))
        writer.write_images(done, images.reshape((-1,) + images.shape[2:]))
  final = unreplicated_state()
  writer.close()
  checkpointer.close()
  return final
