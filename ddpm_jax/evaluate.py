"""--mode=eval: bits/dim, rate-distortion and FID / IS of a trained workdir's EMA weights.

Writes under workdir/eval/step_<k>/ and never over an existing result:

  bpd.json                       test-set bits/dim (paper Table 2): total, prior, decoder
  rate_distortion.csv, .png      paper §4.3, Fig. 5
  fid.json                       FID / IS (paper Table 1) against the train-split statistics
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import data_sources
from ddpm_jax import generation
from ddpm_jax import sample
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.evaluation import bpd as bpd_lib

EVAL_DIR = "eval"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """bits/dim and rate-distortion, then FID / IS when eval.fid_num_samples > 0."""
  fid_n = int(config.eval.fid_num_samples)
  data_sources.prepare(config.data, _splits_read(config))  # Data before compute.
  params, step = sample.restore_ema_params(config, workdir)
  files = ("bpd.json", "rate_distortion.csv", "rate_distortion.png") + (
      ("fid.json",) if fid_n else ())
  out = workdir_lib.output_dir(workdir, EVAL_DIR, f"step_{step}", files)

  per_example = bpd_lib.compute_bpd(config, params)
  summary = bpd_lib.bpd_summary(per_example["total_bpd"], per_example["prior_bpd"],
                                per_example["terms_bpd"])
  summary.update(step=step, split=config.data.eval_split, dataset=config.data.dataset)
  rd = bpd_lib.rate_distortion(per_example["prior_bpd"], per_example["terms_bpd"],
                               per_example["mse"])
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "bpd.json"), "w") as f:
    json.dump(summary, f, indent=2)
  np.savetxt(os.path.join(out, "rate_distortion.csv"),
             np.stack([rd["t"] + 1, rd["rate"], rd["distortion"]], axis=1), delimiter=",",
             header="t,rate_bits_per_dim,distortion_rmse_0_255", comments="", fmt="%.6g")
  bpd_lib.plot_rate_distortion(os.path.join(out, "rate_distortion.png"), rd)
  logging.info("bits/dim of step %d on %s: %.4f +- %.4f", step, config.data.eval_split,
               summary["total_bpd"], summary["total_bpd_sem"])
  result: dict[str, Any] = dict(bpd=summary)
  if fid_n:
    result["fid"] = _fid(config, workdir, params, step, fid_n, out)
  return result


def _splits_read(config: ml_collections.ConfigDict) -> list[str]:
  """The splits --mode=eval reads: bits/dim on eval_split; FID against fid_reference_split,
  the classifier feature network trained on train_split."""
  splits = [config.data.eval_split]
  if config.eval.fid_num_samples:
    splits.append(config.eval.fid_reference_split)
    if config.eval.feature_network == "classifier":
      splits.append(config.data.train_split)
  return splits


def _samples_for_fid(config: ml_collections.ConfigDict, workdir: str, params: Any, step: int,
                     num: int) -> tuple[np.ndarray, str]:
  """(samples, where they come from): those of --mode=sample for this step if there are
  enough and the config's sampler made them, otherwise freshly generated (not saved)."""
  settings = generation.sampler_settings(config)
  npz = sample.samples_path(workdir, step)
  if os.path.exists(npz):
    with np.load(npz) as saved:
      same = all(k in saved and saved[k].item() == v for k, v in settings.items())
      if same and saved["samples"].shape[0] >= num:
        return saved["samples"][:num], npz
  samples = generation.generate_samples(config, params, num, seed=int(config.sampling.seed))
  return samples, f"generated ({settings})"


def _fid(config: ml_collections.ConfigDict, workdir: str, params: Any, step: int, num: int,
         out: str) -> dict[str, Any]:
  """FID / IS of ``num`` samples against eval.fid_reference_split, written to fid.json."""
  from ddpm_jax.evaluation import sample_quality  # pylint: disable=import-outside-toplevel
  samples, source = _samples_for_fid(config, workdir, params, step, num)
  cache = os.path.join(workdir_lib.resolve(workdir), EVAL_DIR, "cache")
  result = sample_quality.evaluate_samples(samples, config, cache_dir=cache)
  result.update(step=step, samples=source, sampler=generation.sampler_settings(config))
  with open(os.path.join(out, "fid.json"), "w") as f:
    json.dump(result, f, indent=2)
  logging.info("FID of step %d (%s features, %d samples vs %s): %.3f", step,
               result["feature_network"], num, result["reference_split"], result["fid"])
  return result
