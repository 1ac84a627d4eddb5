"""One step of Algorithm 1 (paper §3.4) on every device, and its pmapped form.

Randomness is a pure function of (seed, step): the timestep and noise of example i of
global batch `step` come from its own key (rng.py) whatever the device count, and a
resumed run repeats an uninterrupted one bit for bit. Dropout masks are drawn per forward
pass from (seed, step, device or replica index) (clipping.py), so with dropout 0 a step on
8 devices equals the step on 1 device at the same global batch (up to float reduction
order); with dropout the masks, not the expectation, may depend on the device count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddpm_jax import clipping, diffusion, factories, input_pipeline
from ddpm_jax import rng as rng_lib
from ddpm_jax.models import unet as unet_lib
from ddpm_jax.parallel import AXIS
from ddpm_jax.train_state import (
  TrainState,
  ema_decay_schedule,
  ema_update,
  learning_rate_schedule,
  schedule_count,
)


def example_noise(
  noise_key: jax.Array, first_index: jnp.ndarray, batch: int, image_shape: tuple, num_timesteps: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """t ~ Uniform{0..T-1} and noise ~ N(0, I) of examples first_index .. first_index+batch-1."""
  keys = rng_lib.example_keys(noise_key, first_index, batch)
  t = jax.vmap(
    lambda k: jax.random.randint(
      rng_lib.stream(k, rng_lib.ExampleStream.TIMESTEP), (), 0, num_timesteps
    )
  )(keys)
  noise = jax.vmap(
    lambda k: jax.random.normal(rng_lib.stream(k, rng_lib.ExampleStream.NOISE), image_shape)
  )(keys)
  return t.astype(jnp.int32), noise


def example_flips(flip_key: jax.Array, first_index: jnp.ndarray, batch: int) -> jnp.ndarray:
  """Random horizontal flip decisions (p = 1/2) of examples first_index .. +batch-1."""
  return jax.vmap(jax.random.bernoulli)(rng_lib.example_keys(flip_key, first_index, batch))


def train_step(
  state: TrainState,
  images: jnp.ndarray,
  *,
  model: unet_lib.UNet,
  schedule: diffusion.DiffusionSchedule,
  tx: optax.GradientTransformation,
  lr_fn: optax.Schedule,
  diffusion_config: ml_collections.ConfigDict,
  ema_decay: optax.Schedule,
  clip_plan: clipping.ClipPlan,
  random_flip: bool = False,
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One step of Algorithm 1 on this device's uint8 batch; call under pmap(axis_name=AXIS).

  ``random_flip`` mirrors each example with probability 1/2 (the paper's augmentation,
  App. B), keyed like the noise by (seed, step, global example index). ``clip_plan`` says
  which gradients are clipped before the optimizer (clipping.ClipPlan.gradient).
  """
  key = rng_lib.step_key(state.rng, state.step)
  device = jax.lax.axis_index(AXIS)
  batch = images.shape[0]
  if random_flip:
    images = input_pipeline.flip_on_device(
      images, example_flips(rng_lib.stream(key, rng_lib.StepStream.FLIP), device * batch, batch)
    )
  x_start = input_pipeline.to_model_input(images)
  t, noise = example_noise(
    rng_lib.stream(key, rng_lib.StepStream.NOISE),
    device * batch,
    batch,
    x_start.shape[1:],
    schedule.num_timesteps,
  )

  def loss_fn(params: Any, batch: tuple, dropout_key: jax.Array) -> jnp.ndarray:
    x, t_batch, eps = batch
    losses = diffusion.training_losses(
      schedule,
      factories.model_fn(model, params, dropout_rng=dropout_key),
      x,
      t_batch,
      eps,
      model_mean_type=diffusion_config.model_mean_type,
      model_var_type=diffusion_config.model_var_type,
      loss_type=diffusion_config.loss_type,
    )
    return jnp.mean(losses)

  def loss_grad(batch: tuple, dropout_key: jax.Array) -> tuple[jnp.ndarray, Any]:
    return jax.value_and_grad(loss_fn)(state.params, batch, dropout_key)

  loss, grads, clip_metrics = clip_plan.gradient(
    loss_grad, (x_start, t, noise), rng_lib.stream(key, rng_lib.StepStream.DROPOUT)
  )
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # A step with a non-finite loss or gradient keeps the old params, optimizer state and EMA
  # (the selects fuse into the update) and is counted; the loop raises or goes on according
  # to training.nonfinite. Identical pmean'd values on every device: they all agree.
  finite = jnp.isfinite(loss) & jnp.isfinite(clip_metrics["grad_norm"])

  def keep(new, old):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  new_state = state.replace(
    step=state.step + 1,
    params=keep(params, state.params),
    opt_state=keep(opt_state, state.opt_state),
    ema_params=keep(ema_update(state.ema_params, params, ema_decay(state.step)), state.ema_params),
    nonfinite_steps=state.nonfinite_steps + jnp.where(finite, 0, 1).astype(jnp.int32),
    last_nonfinite_step=jnp.where(finite, state.last_nonfinite_step, state.step + 1),
  )
  metrics = dict(
    loss=loss,
    learning_rate=lr_fn(schedule_count(state.opt_state)),
    nonfinite_steps=new_state.nonfinite_steps,
    **clip_metrics,
  )
  return new_state, metrics


def make_p_train_step(
  config: ml_collections.ConfigDict,
  model: unet_lib.UNet,
  schedule: diffusion.DiffusionSchedule,
  tx: optax.GradientTransformation,
  *,
  devices: Sequence[jax.Device] | None = None,
  num_steps: int | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """train_step pmapped over ``devices`` (default: all local ones), the state donated.

  With ``num_steps`` k > 1 (default: training.steps_per_call) one call runs k steps in a
  lax.scan over uint8 batches stacked as [devices, k, per_device, H, W, C] and returns the
  metrics of the last step (clip_fraction: the mean over the k steps): the same result as
  k calls of the one-step version, with one dispatch and one host round trip instead of k.
  """
  num_devices = len(devices) if devices is not None else jax.device_count()
  step = functools.partial(
    train_step,
    model=model,
    schedule=schedule,
    tx=tx,
    lr_fn=learning_rate_schedule(config.training),
    diffusion_config=config.diffusion,
    ema_decay=ema_decay_schedule(config.training),
    clip_plan=clipping.ClipPlan.from_config(config.training, num_devices),
    random_flip=bool(config.data.random_flip),
  )
  k = int(config.training.steps_per_call) if num_steps is None else int(num_steps)
  if k > 1:

    def scanned(state: TrainState, images: jnp.ndarray) -> tuple[TrainState, dict]:
      state, metrics = jax.lax.scan(step, state, images)
      last = jax.tree.map(lambda m: m[-1], metrics)
      return state, dict(last, clip_fraction=jnp.mean(metrics["clip_fraction"]))

    return jax.pmap(scanned, axis_name=AXIS, donate_argnums=(0,), devices=devices)
  return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,), devices=devices)
