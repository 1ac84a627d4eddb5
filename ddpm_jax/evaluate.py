"""--mode=sample and --mode=eval: samples, bits/dim, rate-distortion and FID / IS of a workdir.

Both restore the EMA parameters of the latest checkpoint (or sampling.checkpoint_step) and
write under the workdir, never over an existing result:

  samples/step_<k>[_<tag>]/samples.npz   key "samples": uint8 [N, H, W, C], plus grid.png
                                 (sampling.tag names a second sample set of the same step)
  eval/step_<k>/bpd.json         test-set bits/dim (paper Table 2): total, prior, decoder
  eval/step_<k>/rate_distortion.csv, .png   paper §4.3, Fig. 5
  eval/step_<k>/fid.json         FID / IS (paper Table 1) against the train-split statistics
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import checkpointing
from ddpm_jax import diffusion
from ddpm_jax import input_pipeline
from ddpm_jax import train
from ddpm_jax import train_logging

SAMPLES_FILE = "samples.npz"


def _check_positive(name: str, value: Any) -> int:
  if isinstance(value, bool) or int(value) != value or int(value) <= 0:
    raise ValueError(f"{name}={value!r} must be a positive integer.")
  return int(value)


def _check_divisible(name: str, value: int) -> None:
  if value % jax.device_count():
    raise ValueError(f"{name}={value} is not divisible by the {jax.device_count()} devices.")


def restore_ema_params(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, int]:
  """EMA parameters of sampling.checkpoint_step (-1: latest); nothing is written."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  ckpt_dir = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
  if not os.path.isdir(ckpt_dir):
    raise ValueError(f"No checkpoint in {ckpt_dir!r}; train first (--mode=train).")
  checkpointing.check_or_write_config(config, workdir, write=False)
  # Restore only: nothing is saved, so the keep limit never prunes a checkpoint.
  checkpointer = checkpointing.Checkpointer(workdir, keep=1_000_000)
  try:
    return checkpointer.restore_params(int(config.sampling.checkpoint_step))
  finally:
    checkpointer.close()


def _output_dir(workdir: str, kind: str, step: int | str, files: tuple[str, ...]) -> str:
  """workdir/<kind>/step_<k>/; refuses to overwrite any of ``files`` already there."""
  out = os.path.join(os.path.abspath(os.path.expanduser(workdir)), kind, f"step_{step}")
  existing = [f for f in files if os.path.exists(os.path.join(out, f))]
  if existing:
    raise ValueError(f"{out} already holds {existing}; move them away to recompute.")
  return out


def generate_samples(config: ml_collections.ConfigDict, params: Any, num_samples: int, *,
                     seed: int) -> np.ndarray:
  """num_samples uint8 images [N, H, W, C] on all devices, batches of sampling.batch_size."""
  batch = int(config.sampling.batch_size)
  model, schedule = train.create_model(config), train.create_schedule(config.diffusion)
  p_sample = train.make_p_sample(config, model, schedule, batch // jax.device_count())
  p_params = train.replicate(params)
  num_batches = -(-num_samples // batch)
  out, start = [], time.perf_counter()
  for i in range(num_batches):
    images = np.asarray(p_sample(p_params, jax.random.fold_in(jax.random.key(seed), i)))
    out.append(images.reshape((-1,) + images.shape[2:]))
    done = min((i + 1) * batch, num_samples)
    rate = done / (time.perf_counter() - start)
    logging.info("sampled %d/%d images, %.2f images/s, ETA %.0f s", done, num_samples, rate,
                 (num_samples - done) / rate)
  return np.concatenate(out)[:num_samples]


def _sampler_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What produced a sample set; stored next to the samples and in fid.json."""
  smp = config.sampling
  return dict(method=str(smp.method), num_steps=int(smp.num_steps), eta=float(smp.eta),
              clip_denoised=bool(smp.clip_denoised), seed=int(smp.seed))


def run_sample(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=sample: writes samples/step_<k>/samples.npz and grid.png; returns the npz path."""
  smp = config.sampling
  train.validate_config(config, mode="sample")
  num = _check_positive("sampling.num_samples", smp.num_samples)
  _check_divisible("sampling.batch_size", _check_positive("sampling.batch_size", smp.batch_size))
  params, step = restore_ema_params(config, workdir)
  tag = str(smp.get("tag", ""))
  if tag and not tag.replace("_", "").replace("-", "").isalnum():
    raise ValueError(f"sampling.tag={tag!r} may hold only letters, digits, '_' and '-'.")
  out = _output_dir(workdir, "samples", f"{step}_{tag}" if tag else step,
                    (SAMPLES_FILE, "grid.png"))
  samples = generate_samples(config, params, num, seed=int(smp.seed))
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, SAMPLES_FILE)
  np.savez(path, samples=samples, **_sampler_settings(config))
  train_logging.save_png(os.path.join(out, "grid.png"), train_logging.image_grid(samples[:64]))
  logging.info("Wrote %d samples of step %d to %s", num, step, path)
  return path


def make_p_bpd(config: ml_collections.ConfigDict, schedule: diffusion.DiffusionSchedule,
               model_fn_of_params: Any, *, devices: Any = None) -> Any:
  """pmapped (params, uint8 images [dev, b, ...], rng) -> calc_bpd_loop outputs per example.

  Example i of eval batch j uses the noise of fold_in(fold_in(rng, j), global index of i),
  so the numbers do not depend on the device count.
  """
  diff = config.diffusion

  def per_device(params: Any, images: jnp.ndarray, rng: jax.Array) -> dict:
    x = input_pipeline.to_model_input(images)
    first = jax.lax.axis_index(train.AXIS) * x.shape[0]
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(first + jnp.arange(x.shape[0]))
    model_fn = model_fn_of_params(params)

    def one(x1: jnp.ndarray, key: jax.Array) -> dict:
      out = diffusion.calc_bpd_loop(schedule, model_fn, x1[None], key,
                                    model_mean_type=diff.model_mean_type,
                                    model_var_type=diff.model_var_type, clip_denoised=True)
      return jax.tree.map(lambda a: a[0], out)

    return jax.vmap(one)(x, keys)

  return jax.pmap(per_device, axis_name=train.AXIS, in_axes=(0, 0, None), devices=devices)


def bpd_summary(total: np.ndarray, prior: np.ndarray, terms: np.ndarray) -> dict[str, float]:
  """Means and standard errors over examples of the bound and its parts (bits/dim)."""
  n = total.shape[0]
  sem = lambda a: float(np.std(a, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
  return dict(num_examples=n, total_bpd=float(total.mean()), total_bpd_sem=sem(total),
              prior_bpd=float(prior.mean()), decoder_bpd=float(terms[:, 0].mean()),
              diffusion_kl_bpd=float(terms[:, 1:].sum(axis=1).mean()),
              diffusion_kl_bpd_sem=sem(terms[:, 1:].sum(axis=1)))


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


def compute_bpd(config: ml_collections.ConfigDict, params: Any) -> dict[str, np.ndarray]:
  """calc_bpd_loop over eval.num_examples of data.eval_split; per-example arrays."""
  ev = config.eval
  model, schedule = train.create_model(config), train.create_schedule(config.diffusion)
  p_bpd = make_p_bpd(config, schedule, lambda p: (
      lambda x_t, t: model.apply({"params": p}, x_t, t, train=False)))
  p_params = train.replicate(params)
  batches = input_pipeline.create_eval_iterator(
      config.data, global_batch_size=int(ev.batch_size), num_examples=int(ev.num_examples))
  parts: dict[str, list] = {}
  start, seen = time.perf_counter(), 0
  for j, (images, mask) in enumerate(batches):
    out = p_bpd(p_params, images, jax.random.fold_in(jax.random.key(int(ev.seed)), j))
    keep = np.asarray(mask).reshape(-1)
    for k, v in jax.device_get(out).items():
      parts.setdefault(k, []).append(np.asarray(v).reshape((-1,) + v.shape[2:])[keep])
    seen += int(keep.sum())
    logging.info("bits/dim: %d examples, %.2f examples/s", seen,
                 seen / (time.perf_counter() - start))
  return {k: np.concatenate(v) for k, v in parts.items()}


def _plot_rate_distortion(path: str, rd: dict[str, np.ndarray]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  t = rd["t"] + 1  # The paper's 1-based t.
  axes[0].plot(t, rd["distortion"]); axes[0].set(xlabel="t (reverse process steps)",
                                                 ylabel="distortion (RMSE, [0,255])")
  axes[1].plot(t, rd["rate"]); axes[1].set(xlabel="t", ylabel="rate (bits/dim)")
  axes[2].plot(rd["rate"], rd["distortion"]); axes[2].set(xlabel="rate (bits/dim)",
                                                          ylabel="distortion (RMSE)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """--mode=eval: bits/dim and rate-distortion, then FID / IS when eval.fid_num_samples > 0."""
  ev = config.eval
  train.validate_config(config, mode="eval")
  input_pipeline.validate_data_config(config.data)
  _check_divisible("eval.batch_size", _check_positive("eval.batch_size", ev.batch_size))
  if int(ev.num_examples) != -1:
    _check_positive("eval.num_examples", ev.num_examples)
  fid_n = int(ev.fid_num_samples)
  if fid_n < 0:
    raise ValueError(f"eval.fid_num_samples={fid_n} must be >= 0 (0 skips FID).")
  if fid_n:
    from ddpm_jax.evaluation import sample_quality
    sample_quality.check_feature_network(config)
  params, step = restore_ema_params(config, workdir)
  files = ("bpd.json", "rate_distortion.csv", "rate_distortion.png") + (
      ("fid.json",) if fid_n else ())
  out = _output_dir(workdir, "eval", step, files)

  per_example = compute_bpd(config, params)
  summary = bpd_summary(per_example["total_bpd"], per_example["prior_bpd"],
                        per_example["terms_bpd"])
  summary.update(step=step, split=config.data.eval_split, dataset=config.data.dataset)
  rd = rate_distortion(per_example["prior_bpd"], per_example["terms_bpd"], per_example["mse"])
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "bpd.json"), "w") as f:
    json.dump(summary, f, indent=2)
  np.savetxt(os.path.join(out, "rate_distortion.csv"),
             np.stack([rd["t"] + 1, rd["rate"], rd["distortion"]], axis=1), delimiter=",",
             header="t,rate_bits_per_dim,distortion_rmse_0_255", comments="", fmt="%.6g")
  _plot_rate_distortion(os.path.join(out, "rate_distortion.png"), rd)
  logging.info("bits/dim of step %d on %s: %.4f +- %.4f", step, config.data.eval_split,
               summary["total_bpd"], summary["total_bpd_sem"])
  result: dict[str, Any] = dict(bpd=summary)
  if fid_n:
    result["fid"] = _fid(config, workdir, params, step, fid_n, out)
  return result


def _fid(config: ml_collections.ConfigDict, workdir: str, params: Any, step: int, num: int,
         out: str) -> dict[str, Any]:
  """FID / IS of `num` samples: those of --mode=sample for this step if there are enough and
  the config's sampler made them, otherwise freshly generated with it (not saved)."""
  from ddpm_jax.evaluation import sample_quality
  npz = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "samples", f"step_{step}",
                     SAMPLES_FILE)
  settings = _sampler_settings(config)
  if settings["method"] == "ancestral":
    settings.pop("num_steps"), settings.pop("eta")  # Not used by the ancestral sampler.
  samples, source = np.zeros((0,)), f"generated ({settings})"
  if os.path.exists(npz):
    with np.load(npz) as saved:
      same = all(k in saved and saved[k].item() == v for k, v in settings.items())
      if same and saved["samples"].shape[0] >= num:
        samples, source = saved["samples"], npz
  if samples.shape[0] < num:
    _check_divisible("sampling.batch_size", int(config.sampling.batch_size))
    samples = generate_samples(config, params, num, seed=int(config.sampling.seed))
  cache = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "eval", "cache")
  result = sample_quality.evaluate_samples(samples[:num], config, cache_dir=cache)
  result.update(step=step, samples=source, sampler=settings)
  with open(os.path.join(out, "fid.json"), "w") as f:
    json.dump(result, f, indent=2)
  logging.info("FID of step %d (%s features, %d samples vs %s): %.3f", step,
               result["feature_network"], num, result["reference_split"], result["fid"])
  return result
