"""Sample quality against cost: FID / IS and images/s of several samplers on ONE trained
workdir, every row from the same x_T (same sampling.seed and batch layout).

  python -m bench.sampler_quality --config=configs/fashion_mnist.py --workdir=W \
      --num_samples=1000 [--rows=ancestral,ddim10,dpm2_logSNR_20] [--out=FILE.jsonl]

A row is a name from ROWS (the sampler's config.sampling overrides). For each row the
pmapped sampler is compiled and run once untimed (one batch), then timed over the
num_samples / sampling.batch_size batches: images/s is the steady-state rate, compile
excluded. The samples are then scored like --mode=eval (sample_quality.evaluate_samples:
the config's feature network, against eval.fid_reference_split; the reference statistics
and the classifier are cached under the workdir's eval/cache). Prints one JSON line per
row; nothing is asserted.

With --samples_dir each row's uint8 samples are kept there as <row>_n<N>.npz, and every
row is also compared with the samples of --ode_reference (default ddim1000, any N) found
there: the same x_T, so the RMS difference in pixel levels (0..255) over their common
samples is how far a solver lands from the finely solved ODE, whatever the model's FID.
--rescore=N samples nothing: it scores the first N kept samples of each row (from the
largest <row>_n<M>.npz, M >= N), so that rows sampled at different N compare at one N.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from bench import common
from ddpm_jax import checkpointing, config_checks, factories, generation, parallel, samplers
from ddpm_jax import rng as rng_lib
from ddpm_jax.evaluation import sample_quality


def _rows() -> dict[str, dict[str, Any]]:
  """Ancestral (Algorithm 2, x_0 clipped as the official code), DDIM at 10..1000 steps and
  DPM-Solver++ 2M / 3M: the probability-flow ODE as it is (DDIM unclipped, no
  thresholding), and, suffixed _clip / _thr, DDIM with x_0 clipped and DPM-Solver++ with
  dynamic thresholding."""
  rows: dict[str, dict[str, Any]] = {"ancestral": {"method": "ancestral"}}
  for clip in (False, True):
    for steps in (10, 20, 50, 100, 1000):
      rows[f"ddim{steps}{'_clip' if clip else ''}"] = {
        "method": "ddim",
        "ddim.num_steps": steps,
        "ddim.eta": 0.0,
        "ddim.clip_denoised": clip,
      }
  for thresholding in (False, True):
    for third in ("reference", "taylor"):
      for order in (2, 3):
        for spacing in ("logSNR", "time_uniform"):
          for steps in (10, 15, 20, 50):
            if order == 2 and third == "taylor":
              continue  # The third-order weight does not touch 2M.
            name = (
              f"dpm{order}{'t' if third == 'taylor' else ''}_{spacing}_{steps}"
              f"{'_thr' if thresholding else ''}"
            )
            rows[name] = {
              "method": "dpm_solver",
              "dpm_solver.order": order,
              "dpm_solver.spacing": spacing,
              "dpm_solver.num_steps": steps,
              "dpm_solver.third_order": third,
              "dpm_solver.thresholding": thresholding,
            }
  return rows


ROWS = _rows()
# The comparison of docs/sampling.md: the ODE as it is, DPM-Solver++ in both 3M variants.
TABLE = [r for r in ROWS if not r.endswith(("_clip", "_thr"))]
config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "A trained workdir (its latest EMA weights are used).")
flags.DEFINE_integer("num_samples", 1000, "Samples per row.")
flags.DEFINE_list("rows", TABLE, f"Rows to run, from: {', '.join(ROWS)}.")
flags.DEFINE_string("out", "", "Also append the JSON lines to this file.")
flags.DEFINE_string("samples_dir", "", "Keep each row's samples here (and compare rows).")
flags.DEFINE_string("ode_reference", "ddim1000", "The row the others are compared with.")
flags.DEFINE_integer("rescore", 0, "Score the first N kept samples of each row (no sampling).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def row_config(base: Any, overrides: dict[str, Any]) -> Any:
  config = base.copy_and_resolve_references()
  config.unlock()
  for dotted, value in overrides.items():
    *groups, field = dotted.split(".")
    node = config.sampling
    for group in groups:
      node = node[group]
    node[field] = value
  config.lock()
  return config


def sample_timed(config: Any, params: Any, num: int) -> tuple[np.ndarray, float, float]:
  """(uint8 samples, compile + first-call seconds, steady-state images/s)."""
  batch, seed = int(config.sampling.batch_size), int(config.sampling.seed)
  model, schedule = factories.create_model(config), factories.create_schedule(config.diffusion)
  sampler = generation.make_pmapped_sampler(config, model, schedule, batch // jax.device_count())
  replicated = parallel.replicate(params)
  start = time.perf_counter()
  first = np.asarray(sampler(replicated, rng_lib.batch_key(seed, 0)))
  first_call_s = time.perf_counter() - start
  out, start = [first.reshape((-1,) + first.shape[2:])], time.perf_counter()
  for i in range(1, -(-num // batch)):
    images = np.asarray(sampler(replicated, rng_lib.batch_key(seed, i)))
    out.append(images.reshape((-1,) + images.shape[2:]))
  steady = len(out) - 1
  rate = steady * batch / (time.perf_counter() - start) if steady else float("nan")
  return np.concatenate(out)[:num], first_call_s, rate


def kept_samples(name: str) -> np.ndarray | None:
  """The samples of row ``name`` kept in --samples_dir, from its largest <name>_n<N>.npz."""
  sizes = {}
  for f in os.listdir(FLAGS.samples_dir):
    prefix, _, rest = f.rpartition("_n")
    if prefix == name and rest.endswith(".npz") and rest[:-4].isdigit():
      sizes[int(rest[:-4])] = f
  if not sizes:
    return None
  with np.load(os.path.join(FLAGS.samples_dir, sizes[max(sizes)])) as saved:
    return saved["samples"]


def ode_distance(samples: np.ndarray) -> dict[str, Any]:
  """RMS pixel difference (0..255) to the --ode_reference samples kept in --samples_dir."""
  reference = kept_samples(FLAGS.ode_reference)
  if reference is None:
    return {}
  n = min(len(reference), len(samples))
  diff = samples[:n].astype(np.float64) - reference[:n].astype(np.float64)
  return {
    "ode_reference": FLAGS.ode_reference,
    "ode_rms_levels": float(np.sqrt(np.mean(diff**2))),
    "ode_compared": n,
  }


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  unknown = [r for r in FLAGS.rows if r not in ROWS]
  if unknown:
    raise app.UsageError(f"--rows: unknown {unknown}; known: {', '.join(ROWS)}")
  if FLAGS.rescore and not FLAGS.samples_dir:
    raise app.UsageError("--rescore needs --samples_dir")
  params, step = checkpointing.restore_ema_params(FLAGS.config, FLAGS.workdir, -1)
  cache = os.path.join(os.path.abspath(FLAGS.workdir), "eval", "cache")
  for name in FLAGS.rows:
    config = row_config(FLAGS.config, ROWS[name])
    config_checks.check_config(config, "sample")
    options = samplers.from_config(config.sampling)
    if FLAGS.rescore:
      kept = kept_samples(name)
      if kept is None or len(kept) < FLAGS.rescore:
        raise app.UsageError(f"--rescore={FLAGS.rescore}: {name} has no kept file that large")
      samples = kept[: FLAGS.rescore]
      scores = sample_quality.evaluate_samples(samples, config, cache_dir=cache)
      record = {
        "bench": "sampler_quality_rescored",
        "row": name,
        "step": step,
        "num_samples": FLAGS.rescore,
        "nfe": options.nfe(int(config.diffusion.num_timesteps)),
        **{k: scores[k] for k in ("fid", "inception_score", "feature_network")},
      }
      common.emit(record, FLAGS.out)
      continue
    samples, first_call_s, rate = sample_timed(config, params, FLAGS.num_samples)
    scores = sample_quality.evaluate_samples(samples, config, cache_dir=cache)
    distance = {}
    if FLAGS.samples_dir:
      os.makedirs(FLAGS.samples_dir, exist_ok=True)
      np.savez(os.path.join(FLAGS.samples_dir, f"{name}_n{FLAGS.num_samples}.npz"), samples=samples)
      distance = ode_distance(samples)
    record = {
      "bench": "sampler_quality",
      "row": name,
      "step": step,
      "sampler": samplers.settings(options),
      "nfe": options.nfe(int(config.diffusion.num_timesteps)),
      "num_samples": FLAGS.num_samples,
      "seed": int(config.sampling.seed),
      "batch_size": int(config.sampling.batch_size),
      "images_per_s": rate,
      "first_call_s": first_call_s,
      "fid": scores["fid"],
      "inception_score": scores["inception_score"],
      "inception_score_std": scores["inception_score_std"],
      "feature_network": scores["feature_network"],
      "num_reference": scores["num_reference"],
      **distance,
    }
    record.update(common.machine())
    common.emit(record, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
