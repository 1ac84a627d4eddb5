"""Bits per dimension of the variational bound on a dataset split (paper §3.3, Table 2), and
the rate-distortion curve of progressive lossy compression (§4.3, Fig. 5).

Example i of eval batch j uses the noise of fold_in(fold_in(key(eval.seed), j), global
index of i), so the numbers do not depend on the device count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import diffusion, factories, hosts, input_pipeline, parallel
from ddpm_jax import rng as rng_lib


def make_p_bpd(
  config: ml_collections.ConfigDict,
  schedule: diffusion.DiffusionSchedule,
  model_fn_of_params: Callable[[Any], diffusion.ModelFn],
  *,
  devices: Any = None,
) -> Any:
  """pmapped (params, uint8 images [dev, b, ...], rng) -> calc_bpd_loop outputs per example."""
  diff = config.diffusion

  def per_device(params: Any, images: jnp.ndarray, rng: jax.Array) -> dict:
    x = input_pipeline.to_model_input(images)
    first = jax.lax.axis_index(parallel.AXIS) * x.shape[0]
    keys = rng_lib.example_keys(rng, first, x.shape[0])
    model_fn = model_fn_of_params(params)

    def one(x1: jnp.ndarray, key: jax.Array) -> dict:
      out = diffusion.calc_bpd_loop(
        schedule,
        model_fn,
        x1[None],
        key,
        model_mean_type=diff.model_mean_type,
        model_var_type=diff.model_var_type,
        clip_denoised=True,
      )
      return jax.tree.map(lambda a: a[0], out)

    return jax.vmap(one)(x, keys)

  return jax.pmap(per_device, axis_name=parallel.AXIS, in_axes=(0, 0, None), devices=devices)


def compute_bpd(config: ml_collections.ConfigDict, params: Any) -> dict[str, np.ndarray]:
  """calc_bpd_loop over eval.num_examples of data.eval_split on every device of every
  process; per-example arrays (all examples, on every process)."""
  ev = config.eval
  model, schedule = factories.create_model(config), factories.create_schedule(config.diffusion)
  p_bpd = make_p_bpd(config, schedule, lambda p: factories.model_fn(model, p))
  p_params = parallel.replicate(params)
  batches = input_pipeline.create_eval_iterator(
    config.data, global_batch_size=int(ev.batch_size), num_examples=int(ev.num_examples)
  )
  parts: dict[str, list] = {}
  start, seen = time.perf_counter(), 0
  for j, (images, mask) in enumerate(batches):
    out = p_bpd(p_params, images, rng_lib.batch_key(int(ev.seed), j))
    keep = hosts.gather(np.asarray(mask).reshape(-1))  # Every process's slice, in order.
    for k, v in jax.device_get(out).items():
      parts.setdefault(k, []).append(hosts.gather(np.asarray(v).reshape((-1,) + v.shape[2:]))[keep])
    seen += int(keep.sum())
    logging.info(
      "bits/dim: %d examples, %.2f examples/s", seen, seen / (time.perf_counter() - start)
    )
  return {k: np.concatenate(v) for k, v in parts.items()}


def bpd_summary(total: np.ndarray, prior: np.ndarray, terms: np.ndarray) -> dict[str, float]:
  """Means and standard errors over examples of the bound and its parts (bits/dim)."""
  n = total.shape[0]

  def sem(a):
    return float(np.std(a, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")

  return dict(
    num_examples=n,
    total_bpd=float(total.mean()),
    total_bpd_sem=sem(total),
    prior_bpd=float(prior.mean()),
    decoder_bpd=float(terms[:, 0].mean()),
    diffusion_kl_bpd=float(terms[:, 1:].sum(axis=1).mean()),
    diffusion_kl_bpd_sem=sem(terms[:, 1:].sum(axis=1)),
  )


def rate_distortion(prior: np.ndarray, terms: np.ndarray, mse: np.ndarray) -> dict[str, np.ndarray]:
  """Progressive lossy compression (paper §4.3, Fig. 5, Algorithms 3-4).

  Index i = 0 .. T-1 is the paper's t = i + 1: the receiver holds x_t, decoded so far from
  x_T (cost L_T, the prior term) and the terms of x_{T-1} .. x_t (terms[T-1] .. terms[i+1]),
  so rate[i] = L_T + sum_{j > i} terms[j] (bits/dim): L_T alone at t = T, the bound without
  the decoder term L_0 at t = 1. The distortion is the RMSE of the x_0 estimate from x_t on
  the [0, 255] scale.
  """
  sent_after = np.cumsum(terms.mean(axis=0)[::-1])[::-1]  # sum_{j >= i} terms[j]
  rate = prior.mean() + np.append(sent_after[1:], 0.0)
  distortion = np.sqrt(mse.mean(axis=0)) * 127.5
  return dict(t=np.arange(terms.shape[1]), rate=rate, distortion=distortion)


def plot_rate_distortion(path: str, rd: dict[str, np.ndarray]) -> None:
  """Distortion and rate against t, and distortion against rate (paper Fig. 5), as a PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  t = rd["t"] + 1  # The paper's 1-based t.
  axes[0].plot(t, rd["distortion"])
  axes[0].set(xlabel="t (reverse process steps)", ylabel="distortion (RMSE, [0,255])")
  axes[1].plot(t, rd["rate"])
  axes[1].set(xlabel="t", ylabel="rate (bits/dim)")
  axes[2].plot(rd["rate"], rd["distortion"])
  axes[2].set(xlabel="rate (bits/dim)", ylabel="distortion (RMSE)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
