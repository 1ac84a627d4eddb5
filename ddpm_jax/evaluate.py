"""--mode=eval: bits/dim, rate-distortion and FID / IS of a trained workdir's EMA weights.

Every process of a pod computes its share; process 0 writes the results, once.

Writes under workdir/eval/step_<k>/ and never over an existing result:

  bpd.json                       test-set bits/dim (paper Table 2): total, prior, decoder
  rate_distortion.csv, .png      paper §4.3, Fig. 5
  fid.json                       FID / IS (paper Table 1) against the train-split statistics;
                                 each process scores its share of the samples (read from
                                 the shards of --mode=sample or generated on its devices),
                                 and only statistics are merged

With eval.checkpoint_steps ("all" or a list of steps) it instead scores FID / IS at each of
those checkpoints, as the paper's minimum FID over training (App. B): fid.json per step,
and workdir/eval/fid_over_training.csv and .png over all of them. An interrupted sweep
resumes: steps whose fid.json exists are read, not recomputed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import checkpointing, data_sources, generation, hosts, sample_files
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import bpd as bpd_lib

EVAL_DIR = "eval"


SWEEP_FILE = "fid_over_training"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """bits/dim and rate-distortion, then FID / IS when eval.fid_num_samples > 0; or the FID
  sweep over checkpoints when eval.checkpoint_steps is set."""
  fid_n = int(config.eval.fid_num_samples)
  hosts.agree(lambda: data_sources.prepare(config.data, _splits_read(config)))
  if config.eval.checkpoint_steps:
    return fid_over_training(config, workdir)
  params, step = checkpointing.restore_ema_params(
    config, workdir, int(config.sampling.checkpoint_step)
  )
  files = ("bpd.json", "rate_distortion.csv", "rate_distortion.png") + (
    ("fid.json",) if fid_n else ()
  )
  out = workdir_lib.output_dir(workdir, EVAL_DIR, f"step_{step}", files)

  per_example = bpd_lib.compute_bpd(config, params)
  summary = bpd_lib.bpd_summary(
    per_example["total_bpd"], per_example["prior_bpd"], per_example["terms_bpd"]
  )
  summary.update(step=step, split=config.data.eval_split, dataset=config.data.dataset)
  rd = bpd_lib.rate_distortion(
    per_example["prior_bpd"], per_example["terms_bpd"], per_example["mse"]
  )
  if hosts.is_chief():
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bpd.json"), "w") as f:
      json.dump(summary, f, indent=2)
    np.savetxt(
      os.path.join(out, "rate_distortion.csv"),
      np.stack([rd["t"] + 1, rd["rate"], rd["distortion"]], axis=1),
      delimiter=",",
      header="t,rate_bits_per_dim,distortion_rmse_0_255",
      comments="",
      fmt="%.6g",
    )
    bpd_lib.plot_rate_distortion(os.path.join(out, "rate_distortion.png"), rd)
  logging.info(
    "bits/dim of step %d on %s: %.4f +- %.4f",
    step,
    config.data.eval_split,
    summary["total_bpd"],
    summary["total_bpd_sem"],
  )
  result: dict[str, Any] = dict(bpd=summary)
  if fid_n:
    result["fid"] = _fid(config, workdir, params, step, fid_n, out)
  return result


def sweep_steps(spec: str, available: list[int]) -> list[int]:
  """The checkpoints eval.checkpoint_steps names: "all", or comma-separated steps (each must
  exist; ConfigError listing the available ones otherwise)."""
  if spec == "all":
    return sorted(available)
  steps = sorted({int(s) for s in spec.split(",")})
  missing = [s for s in steps if s not in available]
  if missing:
    raise ConfigError(
      f"eval.checkpoint_steps={spec!r}: no checkpoint at step(s) {missing}; "
      f"available: {sorted(available)} (keep more with "
      "training.keep_every_steps)."
    )
  return steps


def fid_over_training(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """FID / IS of the EMA weights at every checkpoint of eval.checkpoint_steps; the paper
  reports the minimum over training checkpoints (App. B). Returns the rows and the best."""
  steps = hosts.agree(
    lambda: sweep_steps(str(config.eval.checkpoint_steps), checkpointing.checkpoint_steps(workdir))
  )
  rows = []
  for step in steps:
    out = os.path.join(workdir_lib.resolve(workdir), EVAL_DIR, f"step_{step}")
    path = os.path.join(out, "fid.json")
    if os.path.exists(path):  # Scored by an earlier (interrupted) sweep.
      with open(path) as f:
        result = json.load(f)
    else:
      params, _ = checkpointing.restore_ema_params(config, workdir, step)
      result = _fid(config, workdir, params, step, int(config.eval.fid_num_samples), out)
    rows.append(dict(step=step, fid=result["fid"], inception_score=result["inception_score"]))
    if hosts.is_chief():
      _write_sweep(os.path.join(workdir_lib.resolve(workdir), EVAL_DIR, SWEEP_FILE), rows)
  best = min(rows, key=lambda r: r["fid"])
  logging.info(
    "Minimum FID over %d checkpoints: %.3f at step %d.", len(rows), best["fid"], best["step"]
  )
  return dict(fid_over_training=rows, best=best)


def _write_sweep(prefix: str, rows: list[dict[str, Any]]) -> None:
  """prefix.csv (step, fid, inception_score) and prefix.png (FID against step)."""
  with open(prefix + ".csv.tmp", "w") as f:
    f.write("step,fid,inception_score\n")
    for r in rows:
      score = "" if r["inception_score"] is None else f"{r['inception_score']:.6g}"
      f.write(f"{r['step']},{r['fid']:.6g},{score}\n")
  os.replace(prefix + ".csv.tmp", prefix + ".csv")
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 3.6))
  ax.plot([r["step"] for r in rows], [r["fid"] for r in rows], marker="o")
  best = min(rows, key=lambda r: r["fid"])
  ax.set(
    xlabel="training step", ylabel="FID", title=f"minimum {best['fid']:.3f} at step {best['step']}"
  )
  fig.tight_layout()
  fig.savefig(prefix + ".png", dpi=100)
  plt.close(fig)


def _splits_read(config: ml_collections.ConfigDict) -> list[str]:
  """The splits --mode=eval reads: bits/dim on eval_split; FID against fid_reference_split,
  the classifier feature network trained on train_split."""
  splits = [] if config.eval.checkpoint_steps else [config.data.eval_split]
  if config.eval.fid_num_samples:
    splits.append(config.eval.fid_reference_split)
    if config.eval.feature_network == "classifier":
      splits.append(config.data.train_split)
  return splits


def _fid_samples(
  config: ml_collections.ConfigDict, workdir: str, params: Any, step: int, num: int
) -> tuple[Iterator[tuple[np.ndarray, np.ndarray]], str]:
  """(this process's share of the FID samples as (global indices, images) chunks, where
  they come from): the set of --mode=sample for this step if it holds enough and the
  config's sampler made it, each process reading its share from the shards; otherwise
  generated afresh, each process keeping the images of its own devices (not saved)."""
  settings = generation.sampler_settings(config)
  path = sample_files.find_set(workdir, step)
  if path is not None:
    saved = sample_files.open_set(path)
    if saved.settings == settings and saved.num_samples >= num:
      return saved.share(num, int(config.eval.batch_size)), path
  chunks = generation.local_batches(config, params, num, seed=int(config.sampling.seed))
  return chunks, f"generated ({settings})"


def _fid(
  config: ml_collections.ConfigDict, workdir: str, params: Any, step: int, num: int, out: str
) -> dict[str, Any]:
  """FID / IS of ``num`` samples against eval.fid_reference_split, written to fid.json."""
  from ddpm_jax.evaluation import sample_quality

  chunks, source = _fid_samples(config, workdir, params, step, num)
  cache = os.path.join(workdir_lib.resolve(workdir), EVAL_DIR, "cache")
  result = sample_quality.score_samples(chunks, num, config, cache_dir=cache)
  result.update(step=step, samples=source, sampler=generation.sampler_settings(config))
  if hosts.is_chief():
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "fid.json"), "w") as f:
      json.dump(result, f, indent=2)
  logging.info(
    "FID of step %d (%s features, %d samples vs %s): %.3f",
    step,
    result["feature_network"],
    num,
    result["reference_split"],
    result["fid"],
  )
  return result
