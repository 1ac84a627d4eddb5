r"""FID (and Inception Score) of two files, on the paper's protocol.

  python -m ddpm_jax.fid A.npz B.npz --inception_weights=W.npz [--batch_size=N]
      [--save_stats=OUT.npz] [--preprocess=tf|pytorch_fid]

Each of A and B is a samples file (key `samples`: uint8 [N >= 2, H, W, C in {1, 3}], as
older sets' samples.npz or one shard), a sample set of --mode=sample (its samples.json
index or its folder: every shard), or a statistics file (keys `mu` [2048] and `sigma`
[2048, 2048], as TTUR's fid_stats_*.npz or a --save_stats output). Samples are read from
disk one batch at a time and go through the FID Inception network
(`ddpm_jax.evaluation.inception`, weights converted by scripts/convert_inception_weights.py)
with the input protocol --preprocess ("tf": the TF 2015-12-05 graph's own resize and
scaling, as TTUR / OpenAI and so the paper; "pytorch_fid": pytorch-fid's). Prints one JSON
line: fid, the Inception Score of A (mean and std over 10 splits, as the OpenAI code) when A
is a samples file and the weights have the logits layer (else null, with the reason),
the image counts, the feature extractor's name and weights fingerprint. --save_stats
writes mu / sigma of A with a meta record. Progress (images/s) is logged to stderr. A bad
input file ends the run with exit status 2 and one `error: ...` line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import zipfile
from typing import Any

import numpy as np

from ddpm_jax import sample_files
from ddpm_jax.evaluation import features as features_lib
from ddpm_jax.evaluation import inception, metrics

IS_SPLITS = 10  # As the OpenAI Inception Score code.
_LOG_EVERY_S = 10.0
_EXIT_BAD_INPUT = 2

logger = logging.getLogger("ddpm_jax.fid")
logger.propagate = False  # main() attaches its own stderr handler.


@dataclasses.dataclass(frozen=True)
class Source:
  """One command-line input: uint8 samples (read lazily), or Gaussian statistics."""

  path: str
  samples: sample_files.SampleSet | None = None
  mu: np.ndarray | None = None
  sigma: np.ndarray | None = None
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_images(self) -> int | None:
    """N of a samples file; a statistics file's recorded count, if any."""
    if self.samples is not None:
      return self.samples.num_samples
    return self.meta.get("num_images")


def _check_samples(path: str, samples: sample_files.SampleSet) -> sample_files.SampleSet:
  """Raises ValueError unless `samples` is uint8 [N >= 2, H, W, C in {1, 3}]."""
  if samples.dtype != np.uint8:
    raise ValueError(
      f"{path}: samples have dtype {samples.dtype}; allowed: uint8 (quantized images in [0, 255])"
    )
  if len(samples.shape) != 4 or samples.shape[-1] not in (1, 3) or min(samples.shape[1:3]) < 1:
    raise ValueError(
      f"{path}: samples have shape {samples.shape}; allowed: [N, H, W, C] with C in (1, 3)"
    )
  if samples.shape[0] < 2:
    raise ValueError(f"{path}: {samples.shape[0]} samples; FID needs N >= 2")
  return samples


def _check_statistics(
  path: str, mu: np.ndarray, sigma: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Raises ValueError unless mu [2048] and sigma [2048, 2048] are finite real numbers."""
  dim = inception.POOL3_DIM
  if mu.shape != (dim,) or sigma.shape != (dim, dim):
    raise ValueError(
      f"{path}: mu {mu.shape} / sigma {sigma.shape}; allowed: mu ({dim},) and "
      f"sigma ({dim}, {dim}) of Inception pool3 features"
    )
  if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
    raise ValueError(
      f"{path}: mu / sigma have dtypes {mu.dtype} / {sigma.dtype}; allowed: floating point"
    )
  mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f"{path}: mu / sigma contain non-finite values")
  return mu, sigma


def read_source(path: str) -> Source:
  """Reads a samples or statistics .npz, or a sample set's index (samples.json) or folder;
  raises a one-line ValueError for a bad file. Samples stay on disk until they are
  featurized, a batch at a time."""
  if os.path.isdir(path) or path.endswith(".json"):
    try:
      return Source(path, samples=_check_samples(path, sample_files.open_set(path)))
    except (OSError, KeyError, TypeError, json.JSONDecodeError, zipfile.BadZipFile) as e:
      raise ValueError(f"{path}: not a readable sample set ({type(e).__name__}: {e})") from e
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file")
  try:
    data = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__})") from e
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise ValueError(
      f"{path}: a single .npy array; allowed: an .npz with key 'samples' or keys 'mu' and 'sigma'"
    )
  try:
    with data:
      if "samples" in data.files:
        return Source(path, samples=_check_samples(path, sample_files.open_set(path)))
      if "mu" in data.files and "sigma" in data.files:
        mu, sigma = _check_statistics(path, data["mu"], data["sigma"])
        meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
        return Source(path, mu=mu, sigma=sigma, meta=meta if isinstance(meta, dict) else {})
      keys = sorted(data.files)
  except (OSError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: corrupt .npz member ({type(e).__name__}: {e})") from e
  raise ValueError(
    f"{path} has keys {keys}; allowed: 'samples' (uint8 images) or 'mu' and 'sigma' (statistics)"
  )


def sample_statistics(
  extractor: features_lib.FeatureExtractor,
  samples: sample_files.SampleSet | np.ndarray,
  batch_size: int,
  label: str,
) -> tuple[np.ndarray, np.ndarray, metrics.InceptionScoreSums | None]:
  """(mu, sigma, Inception Score sums or None) of uint8 samples, streamed through
  `extractor` one batch at a time (`features_lib.sample_statistics`: the statistics equal
  `compute_statistics` of all features, the sums give the IS of all logits)."""
  if not isinstance(samples, sample_files.SampleSet):
    samples = sample_files.SampleSet.from_array(samples)
  num = samples.num_samples
  logger.info(
    "%s: Inception features of %d images (%s), batches of %d",
    label,
    num,
    extractor.name,
    batch_size,
  )
  started = time.monotonic()
  running, scores = features_lib.sample_statistics(
    extractor,
    samples.chunks(0, num, batch_size),
    batch_size,
    image_shape=samples.shape[1:],
    num_samples=num,
    num_splits=min(IS_SPLITS, num),
    progress=features_lib.Progress(label, logger.info, total=num, every_s=_LOG_EVERY_S),
  )
  seconds = time.monotonic() - started
  logger.info(
    "%s: %d images in %.1f s (%.1f images/s)",
    label,
    running.count,
    seconds,
    running.count / max(seconds, 1e-9),
  )
  mu, sigma = running.statistics()
  return mu, sigma, scores


def _feature_extractor_name(
  a: Source, b: Source, extractor: features_lib.FeatureExtractor | None
) -> str | None:
  """The one feature extractor behind both inputs (ValueError if recorded names differ).

  Statistics files written by --save_stats record the extractor's name, which includes the
  input protocol, so statistics of another network or --preprocess are never compared.
  """
  names = {
    source.path: source.meta.get("feature_extractor")
    for source in (a, b)
    if source.samples is None and source.meta.get("feature_extractor")
  }
  if extractor is not None:
    names["this run"] = extractor.name
  if len(set(names.values())) > 1:
    raise ValueError(
      f"feature extractors differ: {names}; allowed: statistics of the same "
      f"network and --preprocess"
    )
  return next(iter(names.values()), None)


def build_extractor(weights: str | None, preprocess: str) -> features_lib.FeatureExtractor:
  """The FID Inception feature extractor from converted weights (ValueError if unusable)."""
  if not weights:
    raise ValueError(
      "--inception_weights is required when an input is a samples file; "
      "convert the weights with scripts/convert_inception_weights.py"
    )
  if not os.path.isfile(weights):
    raise ValueError(
      f"--inception_weights={weights!r} is not an existing file; convert the "
      f"weights with scripts/convert_inception_weights.py"
    )
  variables = inception.load_inception_params(weights)
  return inception.inception_feature_extractor(variables, preprocess)


def evaluate(
  a: Source,
  b: Source,
  *,
  weights: str | None,
  preprocess: str,
  batch_size: int,
  save_stats: str | None = None,
) -> dict[str, Any]:
  """FID between A and B, the Inception Score of A's samples, and the run's record."""
  extractor = fingerprint = None
  if a.samples is not None or b.samples is not None:
    extractor = build_extractor(weights, preprocess)
    fingerprint = features_lib.variables_fingerprint(extractor.variables)
  name = _feature_extractor_name(a, b, extractor)

  stats, scores_a = {}, None
  for label, source in (("A", a), ("B", b)):
    if source.samples is None:
      stats[label] = (source.mu, source.sigma)
      continue
    mu, sigma, scores = sample_statistics(extractor, source.samples, batch_size, label)
    stats[label] = (mu, sigma)
    if label == "A":
      scores_a = scores
  if save_stats:
    meta = {
      "feature_extractor": name,
      "num_images": a.num_images,
      "weights_fingerprint": fingerprint or a.meta.get("weights_fingerprint"),
      "source": os.path.abspath(a.path),
    }
    metrics.save_stats(save_stats, *stats["A"], meta=meta)
  record = {"fid": metrics.frechet_distance(*stats["A"], *stats["B"])}
  record.update(_inception_score_record(a, scores_a))
  record.update(
    num_images_a=a.num_images,
    num_images_b=b.num_images,
    feature_extractor=name,
    weights_fingerprint=fingerprint,
    preprocess=preprocess if extractor else None,
  )
  return record


def _inception_score_record(a: Source, scores: metrics.InceptionScoreSums | None) -> dict[str, Any]:
  """inception_score / _std / _splits of A's logits, or nulls and why it is unavailable."""
  if scores is not None:
    score, std = scores.score()
    return {
      "inception_score": score,
      "inception_score_std": std,
      "inception_score_splits": scores.num_splits,
      "inception_score_unavailable": None,
    }
  if a.samples is None:
    reason = "A is a statistics file; the Inception Score needs samples"
  else:
    reason = inception.NO_LOGITS_MESSAGE
  return {
    "inception_score": None,
    "inception_score_std": None,
    "inception_score_splits": None,
    "inception_score_unavailable": reason,
  }


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
  return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m ddpm_jax.fid", description=__doc__.strip().splitlines()[0]
  )
  parser.add_argument("a", metavar="A.npz", help="samples, sample set index or statistics file")
  parser.add_argument("b", metavar="B.npz", help="samples, sample set index or statistics file")
  parser.add_argument(
    "--inception_weights",
    default="",
    help="converted Inception weights (.npz); needed for samples files",
  )
  parser.add_argument(
    "--batch_size", type=_positive_int, default=100, help="images per network call (default 100)"
  )
  parser.add_argument("--save_stats", default="", help="write mu / sigma of A to this .npz")
  parser.add_argument(
    "--preprocess",
    choices=inception.PREPROCESSINGS,
    default="tf",
    help="network input protocol (default tf: the paper's TF graph)",
  )
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  """Runs the command line; returns the exit status (0, or 2 for a bad input)."""
  args = parse_args(argv)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  try:
    a, b = read_source(args.a), read_source(args.b)
    record = evaluate(
      a,
      b,
      weights=args.inception_weights,
      preprocess=args.preprocess,
      batch_size=args.batch_size,
      save_stats=args.save_stats or None,
    )
  except (ValueError, OSError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return _EXIT_BAD_INPUT
  finally:
    logger.removeHandler(handler)
  print(json.dumps(record), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
