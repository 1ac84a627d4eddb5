"""LSUN Bedroom 256x256 (paper Table 3, App. B), 2.4M steps, no flips."""

import ml_collections

from configs import _lsun_celeba_256


def get_config() -> ml_collections.ConfigDict:
  return _lsun_celeba_256.get_config(
      "lsun/bedroom", eval_split="validation",
      num_train_steps=2_400_000, random_flip=False)
