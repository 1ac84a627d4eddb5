"""The state of a training run and how it is created: parameters, EMA, Adam (paper App. B).

The recipe: Adam with a linear learning-rate warm-up, gradients clipped at a global norm
first, and an exponential moving average of the parameters (samples and evaluation use it).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpm_jax import rng as rng_lib
from ddpm_jax.models import unet as unet_lib


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
  nonfinite_steps: jnp.ndarray = flax.struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))
  last_nonfinite_step: jnp.ndarray = flax.struct.field(
    default_factory=lambda: jnp.full((), -1, jnp.int32)
  )


def learning_rate_schedule(training_config: ml_collections.ConfigDict) -> optax.Schedule:
  """lr * min(step / warmup_steps, 1), the official code's linear warm-up."""
  lr, warmup = float(training_config.learning_rate), int(training_config.warmup_steps)
  if warmup == 0:
    return optax.constant_schedule(lr)
  return lambda count: lr * jnp.minimum(count / warmup, 1.0)


def create_optimizer(training_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping, then Adam with the warm-up schedule (paper App. B).

  With training.clip_mode "per_replica" or "per_device" the train step clips each
  replica's gradient before the mean (clipping.ClipPlan) and the optimizer's first stage is
  the identity: the optimizer state has the same structure in every mode, so a resumed run
  may switch between them.
  """
  adam = optax.adam(
    learning_rate_schedule(training_config),
    b1=float(training_config.adam_b1),
    b2=float(training_config.adam_b2),
    eps=float(training_config.adam_eps),
  )
  clip = (
    optax.clip_by_global_norm(float(training_config.grad_clip))
    if training_config.clip_mode == "global"
    else optax.identity()
  )
  return optax.chain(clip, adam)


def schedule_count(opt_state: Any) -> jnp.ndarray:
  """The step the optimizer's learning-rate schedule is at: the count of its
  ScaleByScheduleState. It equals TrainState.step for a run trained here from step 0, and
  starts at 0 in a state with a fresh optimizer (a run resumed from imported weights,
  pretrained.py), whose warm-up starts again."""
  return optax.tree_utils.tree_get(
    opt_state, "count", filtering=lambda path, _: path[-1].tuple_name == "ScaleByScheduleState"
  )


def create_train_state(
  config: ml_collections.ConfigDict,
  model: unet_lib.UNet,
  tx: optax.GradientTransformation,
  *,
  abstract: bool = False,
) -> TrainState:
  """Initial state, a pure function of training.seed. EMA starts at the initial params.

  ``abstract=True`` returns only its shapes and dtypes (jax.eval_shape: nothing is
  compiled or allocated), the restore target of a resumed run.
  """
  size, channels = int(config.data.image_size), int(config.data.num_channels)
  seed = int(config.training.seed)

  def init(key: jax.Array) -> TrainState:
    x = jnp.zeros((1, size, size, channels), jnp.float32)
    params = model.init(key, x, jnp.zeros((1,), jnp.int32), train=False)["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=params,
      opt_state=tx.init(params),
      rng=jax.random.key_data(jax.random.key(seed)),
    )

  init_key = rng_lib.init_key(seed)
  return jax.eval_shape(init, init_key) if abstract else jax.jit(init)(init_key)


def ema_decay_schedule(training_config: ml_collections.ConfigDict) -> optax.Schedule:
  """The EMA decay of the update after ``count`` steps: training.ema_decay throughout (the
  official code's tf.train.ExponentialMovingAverage), or with training.ema_warmup
  min(ema_decay, (1 + count) / (10 + count)), the warm-up of tf.train.ExponentialMovingAverage
  given num_updates and of diffusers' EMAModel (improved-diffusion keeps a constant rate),
  which stops a short run's average from holding on to the random init."""
  decay = float(training_config.ema_decay)
  if not training_config.ema_warmup:
    return optax.constant_schedule(decay)
  return lambda count: jnp.minimum(decay, (1.0 + count) / (10.0 + count))


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
  """ema <- decay * ema + (1 - decay) * params (tf.train.ExponentialMovingAverage)."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def num_params(params: Any) -> int:
  return sum(int(np.prod(np.shape(p))) for p in jax.tree.leaves(params))
