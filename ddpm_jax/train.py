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
  """Everything a resumed run needs. ``rng`` holds the raw key data of key(seed)."""
  step: jnp.ndarray
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jnp.ndarray


def validate_config(config: ml_collections.ConfigDict, *, mode: str = "train") -> None:
  """Cheap checks of the fields ``mode`` uses, before anything is compiled, read or written.

  'train' checks every training field; 'sample' and 'eval' only the diffusion and sampling.
  """
  diff, smp = config.diffusion, config.sampling
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


def train_step(state: TrainState, images: jnp.ndarray, *, model: unet_lib.UNet,
               schedule: diffusion.DiffusionSchedule, tx: optax.GradientTransformation,
               lr_fn: optax.Schedule, diffusion_config: ml_collections.ConfigDict,
               ema_decay: float) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One step of Algorithm 1 on this device's uint8 batch; call under pmap(axis_name=AXIS)."""
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  device = jax.lax.axis_index(AXIS)
  x_start = input_pipeline.to_model_input(images)
  batch = x_start.shape[0]
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
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema_update(state.ema_params, params, ema_decay))
  metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=lr_fn(state.step))
  return new_state, metrics


def make_p_train_step(config: ml_collections.ConfigDict, model: unet_lib.UNet,
                      schedule: diffusion.DiffusionSchedule, tx: optax.GradientTransformation,
                      *, devices: Sequence[jax.Device] | None = None
                      ) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """train_step pmapped over ``devices`` (default: all local ones), the state donated."""
  step = functools.partial(train_step, model=model, schedule=schedule, tx=tx,
                           lr_fn=learning_rate_schedule(config.training),
                           diffusion_config=config.diffusion,
                           ema_decay=float(config.training.ema_decay))
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
  """
  validate_config(config)
  input_pipeline.validate_data_config(config.data)
  model = create_model(config)  # Validates the model fields against the image size.
  workdir = checkpointing.prepare_workdir(workdir)
  is_chief = jax.process_index() == 0
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
  p_train_step = make_p_train_step(config, model, schedule, tx)
  grid_per_device = int(tr.num_grid_samples) // jax.device_count()
  p_sample = (make_p_sample(config, model, schedule, grid_per_device)
              if tr.sample_every_steps and grid_per_device else None)
  batches = input_pipeline.prefetch_to_device(input_pipeline.create_train_iterator(
      config.data, global_batch_size=int(tr.batch_size), seed=int(tr.seed),
      start_step=start_step))
  p_state = replicate(state)
  progress = train_logging.Progress(start_step, num_steps, int(tr.batch_size))
  del state

  def unreplicated_state() -> TrainState:
    return jax.device_get(unreplicate(p_state))

  def fetch_finite_metrics(p_metrics: dict, done: int) -> dict[str, float]:
    metrics = {k: float(v) for k, v in unreplicate(p_metrics).items()}
    if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
      raise FloatingPointError(
          f"Non-finite loss {metrics['loss']} or gradient norm {metrics['grad_norm']} at step "
          f"{done}; not saving. The last good checkpoint is step {checkpointer.latest_step()}.")
    return metrics

  def save(done: int, p_metrics: dict) -> None:
    fetch_finite_metrics(p_metrics, done)  # Never checkpoint a state made from inf/NaN.
    checkpointer.save(done, unreplicated_state())

  with _SigtermFlag() as sigterm:
    for step in range(start_step, num_steps):
      p_state, p_metrics = p_train_step(p_state, next(batches))
      done = step + 1
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
