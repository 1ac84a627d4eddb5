"""FID / IS of generated samples against a dataset split: the glue for --mode=eval.

The paper's protocol (Ho et al. 2020, App. B): samples quantized to uint8,
features of the Inception 2015-12-05 network (pool3, 2048-d) for FID against the statistics
of the TRAINING set, its 1008 logits for the Inception Score, the Frechet distance in float64
with scipy.linalg.sqrtm as TTUR. `config.eval.feature_network` picks the network:

* "inception": `inception.FIDInceptionV3` with the converted pytorch-fid weights named by
  `config.eval.inception_weights` (see scripts/convert_inception_weights.py);
* "classifier": a small CNN trained once on the dataset's own train split (for datasets
  where Inception features are not meaningful or not at hand offline, e.g. Fashion-MNIST);
  its embedding gives the FID features and its class logits an Inception-Score analogue.
  Optional fields `config.eval.classifier_<option>` (steps, batch_size, learning_rate, width,
  feature_dim, seed) override `classifier.DEFAULT_RECIPE`.

The reference is the first `config.eval.fid_reference_num_examples` (-1: all) images of
`config.eval.fid_reference_split` in stored order, unflipped: the whole CIFAR-10 training
set for Table 1, 50,000 training images for LSUN as StyleGAN2's metric (Table 3).

Each process reads and featurizes only its share of the reference and of the samples;
the feature statistics and Inception Score sums merge exactly across processes, so at
the paper's scale (50,000 samples of 256x256) no host holds another host's images.

Both the classifier and the reference statistics are cached under `cache_dir`; the cache
key of the statistics names the dataset, the split, the count, the network and a
fingerprint of its weights, so a changed network never reuses stale statistics.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging

from ddpm_jax import datasets, hosts, input_pipeline
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import classifier, inception, metrics
from ddpm_jax.evaluation import features as features_lib

IS_SPLITS = 10  # As the OpenAI Inception Score code.
_STATS_VERSION = 1  # Bump when the way reference statistics are computed changes.
_LOG_EVERY_S = 30.0


def _tag(text: str) -> str:
  """A file-name-safe version of a dataset / split / network name."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def classifier_recipe(config) -> dict[str, Any]:
  """classifier.DEFAULT_RECIPE, overridden by the config.eval.classifier_<key> fields."""
  return {
    key: config.eval.get(f"classifier_{key}", default)
    for key, default in classifier.DEFAULT_RECIPE.items()
  }


def get_feature_extractor(config, *, cache_dir: str) -> features_lib.FeatureExtractor:
  """The configured feature network, ready for `features_lib.extract_features`.

  inception: the converted weights of eval.inception_weights. classifier: the cached
  classifier of this dataset and recipe under `cache_dir`, trained (once) on
  data.train_split and tested on data.eval_split when absent.
  """
  if config.eval.feature_network == "inception":
    variables = inception.load_inception_params(config.eval.inception_weights)
    return inception.inception_feature_extractor(
      variables, preprocess=config.eval.inception_preprocess
    )
  data = config.data
  images, labels = input_pipeline.load_labeled_arrays(data, data.train_split)
  num_classes = max(int(labels.max()) + 1, 2)
  recipe = classifier_recipe(config)
  path = classifier.classifier_cache_path(
    cache_dir,
    data.dataset,
    dict(
      recipe,
      split=data.train_split,
      image_shape=list(images.shape[1:]),
      num_classes=num_classes,
      num_train=int(images.shape[0]),
    ),
  )
  eval_images = eval_labels = None
  if not os.path.exists(path):  # Test accuracy is measured once, when training.
    eval_images, eval_labels = input_pipeline.load_labeled_arrays(data, data.eval_split)
  params, meta = classifier.load_or_train_classifier(
    path,
    images,
    labels,
    num_classes=num_classes,
    eval_images=eval_images,
    eval_labels=eval_labels,
    **recipe,
  )
  return classifier.classifier_feature_extractor(
    params,
    images.shape[1:],
    info=dict(
      classifier_test_accuracy=meta.get("test_accuracy"),
      classifier_test_split=data.eval_split,
      classifier_cache=path,
    ),
  )


def _merge_across_processes(running: metrics.RunningStatistics) -> metrics.RunningStatistics:
  """Combines each process's statistics (of its share) into the global ones (Chan et al.);
  only the count, mean and M2 travel, exactly (hosts.gather_float64)."""
  if not hosts.multi():
    return running
  dim = running.mean.shape[0]
  packed = np.concatenate([[running.count], running.mean, running.m2.reshape(-1)])
  merged = metrics.RunningStatistics(dim)
  for row in hosts.gather_float64(packed):
    merged.merge(int(row[0]), row[1 : 1 + dim], row[1 + dim :].reshape(dim, dim))
  return merged


def _reference(
  config, extractor: features_lib.FeatureExtractor, cache_dir: str
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """(mu, sigma, meta) of the features of the first eval.fid_reference_num_examples (-1:
  all) of the reference split, from the cache or computed: each process reads and
  featurizes only its share; the statistics are merged."""
  data, split = config.data, config.eval.fid_reference_split
  first = int(config.eval.fid_reference_num_examples)
  key = dict(
    version=_STATS_VERSION,
    dataset=data.dataset,
    split=split,
    first=first,
    image_shape=[data.image_size, data.image_size, data.num_channels],
    network=extractor.name,
    fingerprint=features_lib.variables_fingerprint(extractor.variables),
  )
  preparation = datasets.get(data.dataset).preparation
  if preparation:  # E.g. LSUN's official crop and Lanczos resize: not the same images.
    key["preparation"] = preparation
  part = _tag(split) if first == -1 else f"{_tag(split)}_first{first}"
  path = os.path.join(
    cache_dir,
    f"fid_stats_{_tag(data.dataset)}_{part}_"
    f"{_tag(preparation) + '_' if preparation else ''}"
    f"{_tag(extractor.name)}_{key['fingerprint']}.npz",
  )
  if os.path.exists(path):
    mu, sigma, meta = metrics.load_stats(path)
    saved = {name: meta.get(name, -1 if name == "first" else None) for name in key}
    if saved != key:  # Files from before "first" cover the whole split.
      raise ConfigError(
        f"reference statistics {path!r} were computed for {saved}, not {key}; delete it"
      )
    return mu, sigma, meta
  logging.info(
    "Computing FID reference statistics of %s:%s%s with %s (cached at %s).",
    data.dataset,
    split,
    "" if first == -1 else f" (first {first})",
    extractor.name,
    path,
  )
  batch = int(config.eval.batch_size)
  chunks = input_pipeline.iterate_share(data, split, batch_size=batch, num_examples=first)
  running = metrics.RunningStatistics(extractor.feature_dim)
  progress = features_lib.Progress(
    f"FID reference statistics of {split} here", logging.info, every_s=_LOG_EVERY_S
  )
  for features, _ in features_lib.iterate_features(extractor, chunks, batch):
    running.update(features)
    progress(running.count)
  running = _merge_across_processes(running)
  if first != -1 and running.count != first:
    raise ConfigError(
      f"eval.fid_reference_num_examples={first} exceeds the {running.count} "
      f"examples of {data.dataset}:{split}"
    )
  mu, sigma = running.statistics()
  meta = dict(key, num_examples=running.count)
  if hosts.is_chief():
    metrics.save_stats(path, mu, sigma, meta)
  return mu, sigma, meta


def reference_statistics(
  config, extractor: features_lib.FeatureExtractor, *, cache_dir: str
) -> tuple[np.ndarray, np.ndarray]:
  """mu [D], sigma [D, D] (float64) of the features of eval.fid_reference_split (its first
  eval.fid_reference_num_examples, -1: all).

  Computed once (streamed in batches of eval.batch_size, each process its share) and
  cached as an .npz under `cache_dir`, keyed by dataset, split, count, network name and
  weights fingerprint.
  """
  mu, sigma, _ = _reference(config, extractor, cache_dir)
  return mu, sigma


def score_samples(
  chunks: Iterable[tuple[np.ndarray, np.ndarray]], num_samples: int, config, *, cache_dir: str
) -> dict[str, Any]:
  """FID (and IS) of a set of num_samples uint8 samples against the reference split, where
  each process passes only its share.

  `chunks` yields this process's (global indices int64 [n], uint8 images [n, H, W, C]): the
  shares of all processes together hold every index of [0, num_samples) once. Each process
  featurizes its own images; only the feature statistics (count, mean, M2) and the
  Inception Score sums of each part travel between processes, so no host holds another
  host's images, features or logits, and the images are never all in one place.

  Returns a JSON-ready dict: fid, inception_score / inception_score_std (over IS_SPLITS
  parts, or None without logits) and inception_score_logits (which logits: the Inception
  network's 1008 or the classifier's own classes), feature_network (config value),
  feature_extractor (name and weights fingerprint), feature_dim, reference_dataset,
  reference_split, num_samples, num_reference, classifier_test_accuracy (classifier only,
  else None).
  """
  data = config.data
  shape = (data.image_size, data.image_size, data.num_channels)
  if num_samples < 2:
    raise ValueError(f"FID needs at least 2 samples, got {num_samples}")
  extractor = get_feature_extractor(config, cache_dir=cache_dir)
  mu_ref, sigma_ref, meta = _reference(config, extractor, cache_dir)
  started, splits = time.time(), min(IS_SPLITS, num_samples)
  running, scores = features_lib.sample_statistics(
    extractor,
    _checked(chunks, shape),
    int(config.eval.batch_size),
    image_shape=shape,
    num_samples=num_samples,
    num_splits=splits,
    progress=features_lib.Progress("FID samples here", logging.info, every_s=_LOG_EVERY_S),
  )
  logging.info("Features of %d samples here in %.1f s.", running.count, time.time() - started)
  running = _merge_across_processes(running)
  if running.count != num_samples:
    raise ValueError(f"the processes' shares hold {running.count} samples, not {num_samples}")
  mu, sigma = running.statistics()
  score = score_std = None
  if scores is not None:
    merged = metrics.InceptionScoreSums(num_samples, splits, scores.sums.shape[1] - 2)
    for sums in hosts.gather_float64(scores.sums):
      merged.merge(sums)
    score, score_std = merged.score()
  return {
    "fid": metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref),
    "inception_score": score,
    "inception_score_std": score_std,
    "inception_score_splits": splits if scores is not None else None,
    "inception_score_logits": extractor.logits_name if scores is not None else None,
    "feature_network": config.eval.feature_network,
    "feature_extractor": f"{extractor.name}@{meta['fingerprint']}",
    "feature_dim": extractor.feature_dim,
    "reference_dataset": data.dataset,
    "reference_split": config.eval.fid_reference_split,
    "num_samples": num_samples,
    "num_reference": int(meta["num_examples"]),
    "classifier_test_accuracy": extractor.info.get("classifier_test_accuracy"),
  }


def _check_images(images: Any, shape: tuple[int, ...]) -> None:
  """ValueError unless ``images`` are uint8 samples [n, *shape]."""
  dtype = getattr(images, "dtype", None)
  if dtype != np.uint8 or np.ndim(images) != 4 or np.shape(images)[1:] != shape:
    raise ValueError(
      f"samples must be uint8 [N, {', '.join(map(str, shape))}] (quantized, as "
      f"sample sets), got {dtype} {np.shape(images)}"
    )


def _checked(
  chunks: Iterable[tuple[np.ndarray, np.ndarray]], shape: tuple[int, ...]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """`chunks`, each checked by `_check_images`."""
  for indices, images in chunks:
    _check_images(images, shape)
    yield indices, images


def evaluate_samples(samples_uint8: np.ndarray, config, *, cache_dir: str) -> dict[str, Any]:
  """`score_samples` of uint8 samples [n, H, W, C] held in memory: this process's
  contiguous part of the set (on one process, all of it); the parts of processes 0, 1, ...
  in order make the set."""
  data = config.data
  _check_images(samples_uint8, (data.image_size, data.image_size, data.num_channels))
  counts = hosts.gather(np.array([samples_uint8.shape[0]], np.int32)).astype(np.int64)
  offset = int(counts[: jax.process_index()].sum())
  indices = offset + np.arange(samples_uint8.shape[0], dtype=np.int64)
  return score_samples([(indices, samples_uint8)], int(counts.sum()), config, cache_dir=cache_dir)
