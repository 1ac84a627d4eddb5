"""LSUN Cat 256x256 (paper Table 3, App. B), 1.8M steps."""

import ml_collections

from configs import _lsun_celeba_256


def get_config() -> ml_collections.ConfigDict:
  return _lsun_celeba_256.get_config(
      "lsun/cat", eval_split="train",
      num_train_steps=1_800_000, random_flip=True)
