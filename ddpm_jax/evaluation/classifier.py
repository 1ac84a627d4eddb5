"""A small CNN classifier trained on the dataset itself, used as an FID / IS feature network.

The paper's FID / IS use ImageNet Inception features (Ho et al. 2020, App. B). For datasets
where those are not meaningful (28x28 grayscale Fashion-MNIST) or the Inception weights are
not available offline, the same statistics are computed on the penultimate layer (a
`feature_dim`-d ReLU embedding) and the class logits of this classifier, trained once on
the dataset's training split and cached to an .npz. Such numbers are comparable only
between runs that use the same classifier; evaluation records name it by a fingerprint of
its weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from flax import traverse_util

from ddpm_jax.evaluation import features as features_lib

# The training recipe used when none is given: ~90% test accuracy on Fashion-MNIST
# (about 4 epochs) in a few CPU minutes.
DEFAULT_RECIPE: dict[str, Any] = dict(
  steps=2000, batch_size=128, learning_rate=2e-3, width=16, feature_dim=128, seed=0
)
_LOG_EVERY = 250


class SmallCNN(nn.Module):
  """conv3x3(w)-conv3x3/2(w)-conv3x3(2w)-conv3x3/2(2w)-dense(feature_dim)-dense(classes).

  __call__(images uint8 [N, H, W, C]) -> (features [N, feature_dim], logits [N, classes]).
  """

  num_classes: int
  width: int = 16
  feature_dim: int = 128

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = images.astype(jnp.float32) / 127.5 - 1.0
    for i, (mult, stride) in enumerate(((1, 1), (1, 2), (2, 1), (2, 2))):
      x = nn.relu(nn.Conv(self.width * mult, (3, 3), (stride, stride), name=f"conv{i}")(x))
    x = x.reshape((x.shape[0], -1))
    features = nn.relu(nn.Dense(self.feature_dim, name="embed")(x))
    return features, nn.Dense(self.num_classes, name="logits")(features)


def _check_data(images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
  if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f"labels must be integers of shape ({images.shape[0]},), got {labels.dtype} {labels.shape}"
    )
  if num_classes < 2:
    raise ValueError(f"num_classes={num_classes} must be >= 2")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")


def _init_params(model: SmallCNN, seed: int, image_shape: tuple[int, ...]) -> dict[str, Any]:
  """LeCun-normal kernels (std 1/sqrt(fan_in)) and zero biases, drawn with NumPy.

  NumPy rather than jax.random: compiling threefry for every parameter costs seconds on a
  CPU, far more than this network's training step; the draw is equally deterministic.
  """
  abstract = jax.eval_shape(
    model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.uint8)
  )
  rng = np.random.default_rng((seed, 0))  # Stream 0: init; stream 1: batch order.
  flat = {}
  for path, leaf in sorted(traverse_util.flatten_dict(abstract["params"]).items()):
    if path[-1] == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      flat[path] = rng.normal(0.0, 1.0 / np.sqrt(fan_in), leaf.shape).astype(np.float32)
    else:
      flat[path] = np.zeros(leaf.shape, np.float32)
  return traverse_util.unflatten_dict(flat)


def _learning_rate(learning_rate: float, step: int, steps: int) -> np.float32:
  """Cosine decay from `learning_rate` at step 0 to 0 at `steps`."""
  return np.float32(learning_rate * 0.5 * (1.0 + np.cos(np.pi * step / steps)))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
def _train_step(
  model: SmallCNN,
  params: Any,
  opt_state: Any,
  images: jax.Array,
  labels: jax.Array,
  learning_rate: jax.Array,
) -> tuple[Any, Any, jax.Array]:
  """One Adam step on the mean softmax cross-entropy of a batch; returns the loss too.

  The learning rate is an argument (not a constant), so one compiled step serves every
  schedule and step count.
  """

  def loss_fn(p):
    _, logits = model.apply({"params": p}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = optax.scale_by_adam().update(grads, opt_state, params)
  updates = jax.tree_util.tree_map(lambda u: -learning_rate * u, updates)
  return optax.apply_updates(params, updates), opt_state, loss


def train_classifier(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  num_classes: int,
  steps: int = DEFAULT_RECIPE["steps"],
  batch_size: int = DEFAULT_RECIPE["batch_size"],
  seed: int = DEFAULT_RECIPE["seed"],
  learning_rate: float = DEFAULT_RECIPE["learning_rate"],
  width: int = DEFAULT_RECIPE["width"],
  feature_dim: int = DEFAULT_RECIPE["feature_dim"],
) -> dict[str, Any]:
  """Trains `SmallCNN` with Adam (cosine-decayed rate) on softmax cross-entropy.

  Batches are drawn without replacement from per-epoch permutations of a NumPy generator
  seeded with `seed`, and so is the initialisation (`_init_params`): the result is a
  deterministic function of the inputs and the seed. Returns the params (NumPy arrays).
  """
  images, labels = np.asarray(images), np.asarray(labels)
  _check_data(images, labels, num_classes)
  if steps < 1 or batch_size < 1:
    raise ValueError(f"steps={steps} and batch_size={batch_size} must both be >= 1")
  if batch_size > images.shape[0]:
    raise ValueError(f"batch_size={batch_size} exceeds the {images.shape[0]} training images")

  model = SmallCNN(num_classes, width, feature_dim)
  params = _init_params(model, seed, images.shape[1:])
  opt_state = optax.scale_by_adam().init(params)
  rng = np.random.default_rng((seed, 1))
  order, position = rng.permutation(images.shape[0]), 0
  start = time.time()
  for step in range(1, steps + 1):
    if position + batch_size > order.size:
      order, position = rng.permutation(images.shape[0]), 0
    idx = order[position : position + batch_size]
    position += batch_size
    params, opt_state, loss = _train_step(
      model,
      params,
      opt_state,
      images[idx],
      labels[idx].astype(np.int32),
      _learning_rate(learning_rate, step - 1, steps),
    )
    if step % _LOG_EVERY == 0 or step == steps:
      logging.info(
        "feature classifier: step %d/%d, loss %.4f, %.1f steps/s",
        step,
        steps,
        float(loss),
        step / (time.time() - start),
      )
  return jax.device_get(params)


def _model_for(params: Mapping[str, Any]) -> SmallCNN:
  """Rebuilds the SmallCNN whose parameter shapes these are."""
  return SmallCNN(
    num_classes=params["logits"]["bias"].shape[0],
    width=params["conv0"]["bias"].shape[0],
    feature_dim=params["embed"]["bias"].shape[0],
  )


def classifier_feature_extractor(
  params: Mapping[str, Any],
  image_shape: tuple[int, int, int],
  *,
  info: Mapping[str, Any] | None = None,
) -> features_lib.FeatureExtractor:
  """FeatureExtractor: uint8 images of `image_shape` -> (embedding, class logits).

  Its name is 'small-cnn'; evaluation records and caches add `features_lib.variables_fingerprint`
  of the weights, which identifies the exact classifier.
  """
  model = _model_for(params)

  def apply_fn(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return model.apply({"params": params}, images)

  return features_lib.FeatureExtractor(
    name="small-cnn",
    apply_fn=apply_fn,
    variables=params,
    feature_dim=model.feature_dim,
    image_hw=tuple(image_shape[:2]),
    channels=(image_shape[2],),
    logits_name=f"small-cnn class logits ({model.num_classes} classes)",
    info=dict(info or {}),
  )


def classifier_accuracy(
  params: Mapping[str, Any], images: np.ndarray, labels: np.ndarray, batch_size: int = 1000
) -> float:
  """Top-1 accuracy of the classifier on (images, labels), batched over the devices."""
  images, labels = np.asarray(images), np.asarray(labels)
  _check_data(images, labels, _model_for(params).num_classes)
  if not images.shape[0]:
    raise ValueError("accuracy needs at least one image")
  extractor = classifier_feature_extractor(params, images.shape[1:])
  _, logits = features_lib.extract_features(extractor, images, batch_size)
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


def classifier_cache_path(directory: str, dataset_name: str, recipe: Mapping[str, Any]) -> str:
  """<directory>/classifier_<dataset>_<hash of recipe>.npz.

  `recipe` is everything the trained weights depend on (split, image shape, classes,
  hyperparameters): another recipe gets another file, never a stale network.
  """
  if not dataset_name:
    raise ValueError("dataset_name must be non-empty")
  tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset_name)
  digest = hashlib.sha256(json.dumps(dict(recipe), sort_keys=True).encode()).hexdigest()
  return os.path.join(directory, f"classifier_{tag}_{digest[:10]}.npz")


def save_classifier(path: str, params: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
  """Writes params (flat '/'-joined keys) and a JSON meta record to an .npz, atomically."""
  flat = traverse_util.flatten_dict(jax.device_get(dict(params)), sep="/")
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  tmp_path = f"{path}.tmp{os.getpid()}.npz"
  np.savez(
    tmp_path,
    __meta__=np.array(json.dumps(dict(meta), sort_keys=True)),
    **{key: np.asarray(value) for key, value in flat.items()},
  )
  os.replace(tmp_path, path)


def load_classifier(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads (params, meta) written by `save_classifier`."""
  with np.load(path, allow_pickle=False) as data:
    if "__meta__" not in data.files:
      raise ValueError(f"{path!r} is not a classifier cache (no __meta__ entry)")
    meta = json.loads(str(data["__meta__"]))
    flat = {key: data[key] for key in data.files if key != "__meta__"}
  return traverse_util.unflatten_dict(flat, sep="/"), meta


def load_or_train_classifier(
  cache_path: str,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  num_classes: int,
  eval_images: np.ndarray | None = None,
  eval_labels: np.ndarray | None = None,
  **recipe: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Loads the cached classifier, or trains one on (images, labels) and caches it.

  `recipe` holds `train_classifier`'s keyword options (DEFAULT_RECIPE where absent). When
  training, the accuracy on (eval_images, eval_labels), if given, is stored in the meta as
  `test_accuracy`. A cache trained with other data shapes or another recipe raises
  ValueError (delete it to retrain) rather than silently serving another network.

  Returns:
    (params, meta) with meta holding the recipe, num_train and test_accuracy (or None).
  """
  images, labels = np.asarray(images), np.asarray(labels)
  _check_data(images, labels, num_classes)
  unknown = sorted(set(recipe) - set(DEFAULT_RECIPE))
  if unknown:
    raise ValueError(f"unknown classifier options {unknown}; allowed: {sorted(DEFAULT_RECIPE)}")
  recipe = {**DEFAULT_RECIPE, **recipe}
  wanted = dict(
    recipe,
    image_shape=list(images.shape[1:]),
    num_classes=num_classes,
    num_train=int(images.shape[0]),
  )
  if os.path.exists(cache_path):
    params, meta = load_classifier(cache_path)
    found = {key: meta.get(key) for key in wanted}
    if found != wanted:
      raise ValueError(
        f"classifier cache {cache_path!r} was trained with {found}, not "
        f"{wanted}; delete it to retrain"
      )
    return params, meta
  logging.info(
    "Training the feature classifier on %d images (%s); cached at %s.",
    images.shape[0],
    recipe,
    cache_path,
  )
  params = train_classifier(images, labels, num_classes=num_classes, **recipe)
  accuracy = None
  if eval_images is not None:
    accuracy = classifier_accuracy(params, eval_images, eval_labels)
    logging.info("Feature classifier test accuracy: %.4f", accuracy)
  meta = dict(wanted, test_accuracy=accuracy)
  if jax.process_index() == 0:
    save_classifier(cache_path, params, meta)
  return params, meta
