"""Which gradient is clipped: the batch mean once, or each of R replicas' before the mean.

The paper's training (App. B) clips gradients at global norm 1; its official code ran on a
TPU v3-8 with CrossShardOptimizer: each of the 8 replicas took the gradient of its loss / 8,
clipped it at grad_clip / 8 and the cross-replica sum applied the result, so the update is
sum_r clip(g_r / R, c / R) = mean_r clip(g_r, c), with g_r the gradient of the mean loss
of replica r's B / R examples. A ``ClipPlan`` reproduces that for any R on any device count
D: with D dividing R each device computes the gradients of its R / D replicas (micro-batches
of B / R examples, vmapped or scanned), with R dividing D a replica spans D / R devices
(grouped all-reduce). "global" clips the mean gradient once (the optimizer does it), one
device's semantics.

Replica r holds global examples [r B/R, (r+1) B/R): the same examples, timesteps, noise and
flips on every D (they are keyed by global example index, rng.py). Dropout masks are drawn
per forward pass: per replica when D divides R, so they do not depend on D either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddpm_jax.parallel import AXIS

# "per_device": one replica per device (the official code's semantics on exactly 8 devices);
# "per_replica": training.clip_replicas replicas whatever the device count.
CLIP_MODES = ("global", "per_device", "per_replica")
REPLICA_LOOPS = ("scan", "vmap")

# loss_grad(batch, dropout_key) -> (mean loss, its gradient), batch a tuple of [n, ...] arrays.
LossGrad = Callable[[tuple, jax.Array], tuple[jnp.ndarray, Any]]


def clip_by_norm(grads: Any, max_norm: float) -> tuple[Any, jnp.ndarray]:
  """(grads scaled to global norm <= max_norm, their norm): optax.clip_by_global_norm's
  arithmetic, written to vmap over replicas."""
  norm = optax.tree.norm(grads)
  keep = norm < max_norm
  return jax.tree.map(
    lambda g: jnp.where(keep, g, g / norm.astype(g.dtype) * max_norm), grads
  ), norm


@dataclasses.dataclass(frozen=True)
class ClipPlan:
  """How one train step turns its devices' gradients into the one the optimizer applies.

  Attributes:
    mode: "global" (the mean, clipped by the optimizer) or "per_replica".
    grad_clip: the norm bound c.
    replicas: R (per_replica); devices: D, the devices of the pmap.
    loop: how a device runs its R / D > 1 replicas: "vmap" all at once (the activations of
      the whole device batch, as "global", and R / D gradients), "scan" one micro-batch
      after another (the activations of one replica).
  """

  mode: str
  grad_clip: float
  replicas: int
  devices: int
  loop: str = "vmap"

  @classmethod
  def from_config(cls, training: ml_collections.ConfigDict, devices: int) -> ClipPlan:
    """The plan of config.training on ``devices`` devices; ValueError (one line) when the
    replicas cannot be laid out on them or do not split the global batch evenly."""
    mode, grad_clip = str(training.clip_mode), float(training.grad_clip)
    loop = str(training.replica_loop)
    if mode == "global":
      return cls("global", grad_clip, 1, devices, loop)
    replicas = devices if mode == "per_device" else int(training.clip_replicas) or devices
    if replicas % devices and devices % replicas:
      allowed = [d for d in range(1, replicas + 1) if replicas % d == 0]
      raise ValueError(
        f"{replicas} replicas cannot be laid out on {devices} devices; allowed device "
        f"counts: {', '.join(map(str, allowed))} or a multiple of {replicas} (or set "
        "training.clip_mode='global')"
      )
    if int(training.batch_size) % replicas:
      raise ValueError(
        f"training.batch_size={training.batch_size} does not split into {replicas} equal replicas"
      )
    return cls("per_replica", grad_clip, replicas, devices, loop)

  @property
  def per_device(self) -> int:
    """Replicas computed on each device, one after another (1 when one spans devices)."""
    return max(self.replicas // self.devices, 1)

  @property
  def groups(self) -> list[list[int]] | None:
    """The device groups of the replicas when one spans several devices, else None."""
    span = self.devices // self.replicas
    if self.mode == "global" or span <= 1:
      return None
    return [list(range(r * span, (r + 1) * span)) for r in range(self.replicas)]

  def gradient(
    self, loss_grad: LossGrad, batch: tuple, dropout_key: jax.Array
  ) -> tuple[jnp.ndarray, Any, dict[str, jnp.ndarray]]:
    """(mean loss, the gradient for the optimizer, metrics) of this device's ``batch``.

    Metrics: grad_norm, the norm of that gradient (global: before the optimizer's clip);
    clip_fraction, the share of replicas (global: of the one mean) clipped; per_replica
    also replica_grad_norm, the mean over replicas of |g_r| (the official code logged
    that divided by R: the norm of the gradient of loss / R). Call under
    pmap(axis_name=AXIS).
    """
    device = jax.lax.axis_index(AXIS)
    if self.mode == "global":
      loss, grads = loss_grad(batch, jax.random.fold_in(dropout_key, device))
      grads = jax.lax.pmean(grads, AXIS)
      norm = optax.tree.norm(grads)
      return (
        jax.lax.pmean(loss, AXIS),
        grads,
        dict(grad_norm=norm, clip_fraction=(norm > self.grad_clip).astype(jnp.float32)),
      )
    if self.per_device == 1:  # One replica per device, or one spread over a device group.
      loss, grads = loss_grad(batch, jax.random.fold_in(dropout_key, device))
      if self.groups is not None:
        grads = jax.lax.pmean(grads, AXIS, axis_index_groups=self.groups)
      clipped, norms = clip_by_norm(grads, self.grad_clip)
      losses, norms = loss[None], norms[None]
    else:
      losses, clipped, norms = self._micro_batches(loss_grad, batch, dropout_key, device)
    update = jax.lax.pmean(clipped, AXIS)
    return (
      jax.lax.pmean(jnp.mean(losses), AXIS),
      update,
      dict(
        grad_norm=optax.tree.norm(update),
        replica_grad_norm=jax.lax.pmean(jnp.mean(norms), AXIS),
        clip_fraction=jax.lax.pmean(jnp.mean((norms > self.grad_clip).astype(jnp.float32)), AXIS),
      ),
    )

  def _micro_batches(
    self, loss_grad: LossGrad, batch: tuple, dropout_key: jax.Array, device: jnp.ndarray
  ) -> tuple[jnp.ndarray, Any, jnp.ndarray]:
    """(losses [m], mean of the m clipped gradients, norms [m]) of this device's m replicas
    (replica device * m + j is micro-batch j)."""
    m = self.per_device
    micro = jax.tree.map(lambda x: x.reshape((m, x.shape[0] // m) + x.shape[1:]), batch)
    keys = jax.vmap(lambda j: jax.random.fold_in(dropout_key, device * m + j))(jnp.arange(m))

    def one(micro_batch: tuple, key: jax.Array) -> tuple[jnp.ndarray, Any, jnp.ndarray]:
      loss, grads = loss_grad(micro_batch, key)
      clipped, norm = clip_by_norm(grads, self.grad_clip)
      return loss, clipped, norm

    if self.loop == "vmap":
      losses, clipped, norms = jax.vmap(one)(micro, keys)
      return losses, jax.tree.map(lambda g: jnp.mean(g, axis=0), clipped), norms

    def body(total: Any, xs: tuple) -> tuple[Any, tuple[jnp.ndarray, jnp.ndarray]]:
      loss, clipped, norm = one(*xs)
      return jax.tree.map(jnp.add, total, clipped), (loss, norm)

    zeros = jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype),
      jax.eval_shape(lambda: one(jax.tree.map(lambda x: x[0], micro), keys[0])[1]),
    )
    total, (losses, norms) = jax.lax.scan(body, zeros, (micro, keys))
    return losses, jax.tree.map(lambda g: g / m, total), norms
