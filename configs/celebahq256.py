"""CelebA-HQ 256x256 (paper Fig. 1, App. B), 0.5M steps."""

import ml_collections

from configs import _lsun_celeba_256


def get_config() -> ml_collections.ConfigDict:
  return _lsun_celeba_256.get_config(
    "celeb_a_hq/256", eval_split="train", num_train_steps=500_000, random_flip=True
  )
