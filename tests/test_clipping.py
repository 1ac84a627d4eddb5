"""Per-replica gradient clipping (ddpm_jax/clipping.py): the update is mean_r clip(g_r, c)
over R virtual replicas on any device count that divides or is a multiple of R, the
metrics are the official per-replica ones, and impossible layouts are refused in one line.

The first tests use a quadratic loss whose replica gradients are known in closed form
(compiles in well under a second per layout); the last trains the tiny U-Net for 20 steps
on 1, 2 and 8 devices (~40 s cold on 2 cores, most of it compiling three train steps).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddpm_jax import (
  clipping,
  config_checks,
  factories,
  input_pipeline,
  parallel,
  train_state,
  train_step,
)
from ddpm_jax.errors import ConfigError

BATCH, DIM, CLIP = 16, 5, 2.0
# Example i pulls the parameters towards x_i: a common direction, scaled so that with 2, 4
# or 8 replicas some replicas' gradients exceed CLIP and some do not.
X = np.repeat(np.array([0.2, 0.1, 0.3, 0.2, 1.0, 0.4, 3.0, 1.5], np.float32), 2)[:, None] * (
  np.array([1.0, 2.0, 3.0, 1.0, 2.0], np.float32)
  + 0.3 * np.random.default_rng(0).standard_normal((BATCH, DIM), np.float32)
)


def _quadratic_loss_grad(batch: tuple, dropout_key: jax.Array) -> tuple:
  """Mean of 0.5 |w - x_i|^2 at w = 0 over the batch: gradient -mean(x_i), in two leaves."""
  del dropout_key
  (x,) = batch

  def loss(w):
    full = jnp.concatenate([w["a"], w["b"]])
    return jnp.mean(0.5 * jnp.sum((full[None] - x) ** 2, axis=1))

  return jax.value_and_grad(loss)({"a": jnp.zeros(3), "b": jnp.zeros(DIM - 3)})


def _expected(replicas: int) -> dict[str, np.ndarray]:
  """The official update mean_r clip(g_r, c) and the metrics, in NumPy (float64)."""
  g = -X.astype(np.float64).reshape(replicas, BATCH // replicas, DIM).mean(1)
  norms = np.linalg.norm(g, axis=1)
  update = (g * np.minimum(1.0, CLIP / norms)[:, None]).mean(0)
  return dict(
    update=update,
    grad_norm=np.linalg.norm(update),
    replica_grad_norm=norms.mean(),
    clip_fraction=(norms > CLIP).mean(),
    loss=0.5 * (X.astype(np.float64) ** 2).sum(1).mean(),
  )


def _training(mode: str, replicas: int, loop: str = "scan") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      clip_mode=mode, clip_replicas=replicas, replica_loop=loop, grad_clip=CLIP, batch_size=BATCH
    )
  )


def _run(plan: clipping.ClipPlan) -> dict[str, np.ndarray]:
  devices = jax.devices()[: plan.devices]
  x = X.reshape(plan.devices, BATCH // plan.devices, DIM)
  key = jax.random.key(0)

  def step(x_device):
    loss, update, metrics = plan.gradient(_quadratic_loss_grad, (x_device,), key)
    return dict(metrics, loss=loss, update=jnp.concatenate([update["a"], update["b"]]))

  out = jax.pmap(step, axis_name=parallel.AXIS, devices=devices)(x)
  return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize(
  "devices,replicas,loop",
  [
    (1, 8, "scan"),
    (1, 8, "vmap"),
    (2, 8, "scan"),
    (4, 8, "vmap"),
    (8, 8, "scan"),
    (8, 4, "scan"),
    (8, 2, "scan"),
    (2, 2, "scan"),
  ],
)
def test_per_replica_update_is_the_mean_of_clipped_replica_gradients(devices, replicas, loop):
  """Every layout of R replicas on D devices (D | R: micro-batches; R | D: device groups)
  gives mean_r clip(g_r, c) on every device, and the same metrics."""
  plan = clipping.ClipPlan.from_config(_training("per_replica", replicas, loop), devices)
  expected, out = _expected(replicas), _run(plan)
  assert 0 < expected["clip_fraction"] < 1  # Some replicas clip, some do not.
  for name, value in expected.items():
    got = out[name]
    np.testing.assert_allclose(
      got, np.broadcast_to(value, got.shape), rtol=2e-6, atol=1e-6, err_msg=name
    )


def test_per_device_is_per_replica_with_one_replica_per_device():
  per_device = clipping.ClipPlan.from_config(_training("per_device", 3), 8)
  assert per_device == clipping.ClipPlan.from_config(_training("per_replica", 0), 8)
  assert (per_device.replicas, per_device.per_device, per_device.groups) == (8, 1, None)


def test_global_clips_only_the_mean():
  """ "global": the plain mean goes to the optimizer (which clips it); clip_fraction says
  whether its norm exceeds grad_clip."""
  out = _run(clipping.ClipPlan.from_config(_training("global", 0), 8))
  mean = -X.astype(np.float64).mean(0)
  np.testing.assert_allclose(out["update"][0], mean, rtol=2e-6, atol=1e-6)
  assert float(out["clip_fraction"][0]) == float(np.linalg.norm(mean) > CLIP)
  assert "replica_grad_norm" not in out


@pytest.mark.parametrize(
  "devices,replicas,batch,message",
  [
    (
      3,
      8,
      24,
      (
        r"8 replicas cannot be laid out on 3 devices; allowed device counts: "
        r"1, 2, 4, 8 or a multiple of 8 \(or set training.clip_mode='global'\)"
      ),
    ),
    (12, 8, 96, r"allowed device counts: 1, 2, 4, 8 or a multiple of 8"),
    (2, 8, 12, r"training.batch_size=12 does not split into 8 equal replicas"),
  ],
)
def test_impossible_layouts_are_refused(devices, replicas, batch, message):
  training = _training("per_replica", replicas)
  training.batch_size = batch
  with pytest.raises(ValueError, match=message):
    clipping.ClipPlan.from_config(training, devices)


def test_config_check_names_the_fields(make_config):
  """On this session's 8 devices R = 3 fits neither way: one line naming the fields."""
  config = make_config(
    **{"training.clip_mode": "per_replica", "training.clip_replicas": 3, "training.batch_size": 24}
  )
  with pytest.raises(
    ConfigError,
    match=r"^training.clip_mode='per_replica', "
    r"training.clip_replicas=3: 3 replicas cannot be laid out on 8 devices",
  ):
    config_checks.check_training(config.training)
  config.training.clip_replicas = -1
  with pytest.raises(ConfigError, match=r"training.clip_replicas=-1 must be an integer >= 0"):
    config_checks.check_training(config.training)


# The tiny config shrunk further (one level, no attention): the property does not depend on
# the network, and each layout compiles its own train step.
_SMALLER = {
  "model.ch": 8,
  "model.ch_mult": (1,),
  "model.attn_resolutions": (),
  "model.num_groups": 4,
}


def _train_20_steps(make_config, num_devices: int, **overrides) -> tuple:
  """(params, metrics of the last step) after 20 steps from the same state and global
  batches on ``num_devices`` devices, with a grad_clip so small that it always binds."""
  config = make_config(**{"training.grad_clip": 1e-3, **_SMALLER, **overrides})
  model = factories.create_model(config)
  tx = train_state.create_optimizer(config.training)
  state = jax.device_get(train_state.create_train_state(config, model, tx))
  batches = input_pipeline.create_train_iterator(
    config.data, global_batch_size=config.training.batch_size, seed=0
  )
  devices = jax.devices()[:num_devices]
  p_step = train_step.make_p_train_step(
    config, model, factories.create_schedule(config.diffusion), tx, devices=devices, num_steps=1
  )
  p_state = parallel.replicate(state, devices)
  for _ in range(20):
    images = next(batches).reshape((num_devices, -1, 8, 8, 3))
    p_state, metrics = p_step(p_state, images)
  return (
    jax.device_get(parallel.unreplicate(p_state)).params,
    {k: float(v) for k, v in parallel.unreplicate(metrics).items()},
  )


@pytest.mark.slow
def test_per_replica_training_does_not_depend_on_the_device_count(make_config):
  """With a grad_clip that always binds, 20 steps of per_replica with R = 8 on 1 and on 2
  devices give the parameters of per_device on 8 devices (the official TPU v3-8 layout);
  global clipping gives other ones."""
  per_replica = {"training.clip_mode": "per_replica", "training.clip_replicas": 8}
  reference, ref_metrics = _train_20_steps(make_config, 8, **{"training.clip_mode": "per_device"})
  assert ref_metrics["clip_fraction"] == 1.0
  for num_devices in (1, 2):
    params, metrics = _train_20_steps(make_config, num_devices, **per_replica)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, reference
    )
    assert metrics["replica_grad_norm"] == pytest.approx(ref_metrics["replica_grad_norm"], rel=1e-5)
  global_params, _ = _train_20_steps(make_config, 1)
  diff = max(
    float(np.abs(a - b).max())
    for a, b in zip(jax.tree.leaves(global_params), jax.tree.leaves(reference), strict=True)
  )
  assert diff > 1e-3, diff
