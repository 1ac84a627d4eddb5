"""LSUN Church 256x256 (paper Table 3, App. B), 1.2M steps."""

import ml_collections

from configs import _lsun_celeba_256


def get_config() -> ml_collections.ConfigDict:
  return _lsun_celeba_256.get_config(
    "lsun/church_outdoor", eval_split="validation", num_train_steps=1_200_000, random_flip=True
  )
