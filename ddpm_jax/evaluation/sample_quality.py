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

Both the classifier and the reference statistics are cached under `cache_dir`; the cache
key of the statistics names the dataset, the split, the network and a fingerprint of its
weights, so a changed network never reuses stale statistics.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Iterator

import jax
import numpy as np
from absl import logging

from ddpm_jax import datasets
from ddpm_jax import hosts
from ddpm_jax import input_pipeline
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import classifier, fid, inception

IS_SPLITS = 10  # As the OpenAI Inception Score code.
_STATS_VERSION = 1  # Bump when the way reference statistics are computed changes.
_LOG_EVERY_S = 30.0


def _tag(text: str) -> str:
  """A file-name-safe version of a dataset / split / network name."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def classifier_recipe(config) -> dict[str, Any]:
  """classifier.DEFAULT_RECIPE, overridden by the config.eval.classifier_<key> fields."""
  return {key: config.eval.get(f"classifier_{key}", default)
          for key, default in classifier.DEFAULT_RECIPE.items()}


def get_feature_extractor(config, *, cache_dir: str) -> fid.FeatureExtractor:
  """The configured feature network, ready for `fid.extract_features`.

  inception: the converted weights of eval.inception_weights. classifier: the cached
  classifier of this dataset and recipe under `cache_dir`, trained (once) on
  data.train_split and tested on data.eval_split when absent.
  """
  if config.eval.feature_network == "inception":
    variables = inception.load_inception_params(config.eval.inception_weights)
    return inception.inception_feature_extractor(
        variables, preprocess=config.eval.inception_preprocess)
  data = config.data
  images, labels = input_pipeline.load_labeled_arrays(data, data.train_split)
  num_classes = max(int(labels.max()) + 1, 2)
  recipe = classifier_recipe(config)
  path = classifier.classifier_cache_path(cache_dir, data.dataset, dict(
      recipe, split=data.train_split, image_shape=list(images.shape[1:]),
      num_classes=num_classes, num_train=int(images.shape[0])))
  eval_images = eval_labels = None
  if not os.path.exists(path):  # Test accuracy is measured once, when training.
    eval_images, eval_labels = input_pipeline.load_labeled_arrays(data, data.eval_split)
  params, meta = classifier.load_or_train_classifier(
      path, images, labels, num_classes=num_classes, eval_images=eval_images,
      eval_labels=eval_labels, **recipe)
  return classifier.classifier_feature_extractor(params, images.shape[1:], info=dict(
      classifier_test_accuracy=meta.get("test_accuracy"), classifier_test_split=data.eval_split,
      classifier_cache=path))


def _reference_batches(config, split: str, global_batch: int) -> Iterator[np.ndarray]:
  """This process's real (unpadded) images of each eval batch of `split`, flattened."""
  iterator = input_pipeline.create_eval_iterator(config.data, global_batch_size=global_batch,
                                                 split=split)
  started, last_log, done = time.time(), time.time(), 0
  for images, mask in iterator:
    real = images.reshape((-1,) + images.shape[2:])[mask.reshape(-1)]
    done += real.shape[0]
    if time.time() - last_log > _LOG_EVERY_S:
      last_log = time.time()
      logging.info("FID reference statistics of %s: %d images, %.1f images/s", split, done,
                   done / (last_log - started))
    yield real


def _merge_across_processes(running: fid.RunningStatistics) -> fid.RunningStatistics:
  """Combines each process's statistics (of its slice of the split) into the global ones."""
  if jax.process_count() == 1:
    return running
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  def split64(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # float64 as 2 float32s.
    high = x.astype(np.float32)
    return high, (x - high).astype(np.float32)

  gathered = multihost_utils.process_allgather(dict(
      count=np.array(running.count, np.int32), mean=split64(running.mean),
      m2=split64(running.m2)))
  def join(pair: tuple[np.ndarray, np.ndarray], process: int) -> np.ndarray:
    return pair[0][process].astype(np.float64) + pair[1][process].astype(np.float64)

  merged = fid.RunningStatistics(running.mean.shape[0])
  for p in range(jax.process_count()):
    merged.merge(int(gathered["count"][p]), join(gathered["mean"], p), join(gathered["m2"], p))
  return merged


def _reference(config, extractor: fid.FeatureExtractor,
               cache_dir: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """(mu, sigma, meta) of the reference split's features, from the cache or computed."""
  data, split = config.data, config.eval.fid_reference_split
  key = dict(version=_STATS_VERSION, dataset=data.dataset, split=split,
             image_shape=[data.image_size, data.image_size, data.num_channels],
             network=extractor.name, fingerprint=fid.variables_fingerprint(extractor.variables))
  preparation = datasets.get(data.dataset).preparation
  if preparation:  # E.g. LSUN's official crop and Lanczos resize: not the same images.
    key["preparation"] = preparation
  path = os.path.join(cache_dir, f"fid_stats_{_tag(data.dataset)}_{_tag(split)}_"
                                 f"{_tag(preparation) + '_' if preparation else ''}"
                                 f"{_tag(extractor.name)}_{key['fingerprint']}.npz")
  if os.path.exists(path):
    mu, sigma, meta = fid.load_stats(path)
    if {name: meta.get(name) for name in key} != key:
      raise ConfigError(f"reference statistics {path!r} were computed for "
                       f"{ {name: meta.get(name) for name in key} }, not {key}; delete it")
    return mu, sigma, meta
  devices = jax.process_count() * jax.local_device_count()
  global_batch = -(-int(config.eval.batch_size) // devices) * devices
  logging.info("Computing FID reference statistics of %s:%s with %s (cached at %s).",
               data.dataset, split, extractor.name, path)
  running = fid.RunningStatistics(extractor.feature_dim)
  local_batch = global_batch // jax.process_count()
  for features, _ in fid.iterate_features(
      extractor, _reference_batches(config, split, global_batch), local_batch):
    running.update(features)
  running = _merge_across_processes(running)
  mu, sigma = running.statistics()
  meta = dict(key, num_examples=running.count)
  if hosts.is_chief():
    fid.save_stats(path, mu, sigma, meta)
  return mu, sigma, meta


def reference_statistics(config, extractor: fid.FeatureExtractor, *,
                         cache_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """mu [D], sigma [D, D] (float64) of the features of all of eval.fid_reference_split.

  Computed once (streamed in batches of eval.batch_size) and cached as an .npz under
  `cache_dir`, keyed by dataset, split, network name and weights fingerprint.
  """
  mu, sigma, _ = _reference(config, extractor, cache_dir)
  return mu, sigma


def evaluate_samples(samples_uint8: np.ndarray, config, *, cache_dir: str) -> dict[str, Any]:
  """FID (and IS) of uint8 samples [N, H, W, C] against the reference split.

  On a pod every process passes the same N samples and featurizes its contiguous share;
  the statistics are merged exactly (Chan et al.) and the logits gathered.

  Returns a JSON-ready dict: fid, inception_score / inception_score_std (over IS_SPLITS
  parts, or None without logits) and inception_score_logits (which logits: the Inception
  network's 1008 or the classifier's own classes), feature_network (config value),
  feature_extractor (name and weights fingerprint), feature_dim, reference_dataset,
  reference_split, num_samples, num_reference, classifier_test_accuracy (classifier only,
  else None).
  """
  data = config.data
  shape = (data.image_size, data.image_size, data.num_channels)
  dtype = getattr(samples_uint8, "dtype", None)
  if dtype != np.uint8 or np.ndim(samples_uint8) != 4 or samples_uint8.shape[1:] != shape:
    raise ValueError(f"samples must be uint8 [N, {', '.join(map(str, shape))}] (quantized, as "
                     f"samples.npz), got {dtype} {np.shape(samples_uint8)}")
  num = int(samples_uint8.shape[0])
  if num < 2:
    raise ValueError(f"FID needs at least 2 samples, got {num}")
  extractor = get_feature_extractor(config, cache_dir=cache_dir)
  mu_ref, sigma_ref, meta = _reference(config, extractor, cache_dir)
  started = time.time()
  share = hosts.my_slice(num)  # Each process featurizes its part; statistics are merged.
  features, logits = fid.extract_features(extractor, samples_uint8[share],
                                          config.eval.batch_size)
  logging.info("Features of %d samples in %.1f s.", features.shape[0], time.time() - started)
  running = fid.RunningStatistics(extractor.feature_dim)
  running.update(features)
  mu, sigma = _merge_across_processes(running).statistics()
  logits = None if logits is None else hosts.gather_ragged(logits)
  score = score_std = None
  splits = min(IS_SPLITS, num)
  if logits is not None:
    score, score_std = fid.inception_score(logits, num_splits=splits)
  return {
      "fid": fid.frechet_distance(mu, sigma, mu_ref, sigma_ref),
      "inception_score": score,
      "inception_score_std": score_std,
      "inception_score_splits": splits if logits is not None else None,
      "inception_score_logits": extractor.logits_name if logits is not None else None,
      "feature_network": config.eval.feature_network,
      "feature_extractor": f"{extractor.name}@{meta['fingerprint']}",
      "feature_dim": extractor.feature_dim,
      "reference_dataset": data.dataset,
      "reference_split": config.eval.fid_reference_split,
      "num_samples": num,
      "num_reference": int(meta["num_examples"]),
      "classifier_test_accuracy": extractor.info.get("classifier_test_accuracy"),
  }
