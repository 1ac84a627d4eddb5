"""LSUN Cat 256x256 (paper Table 3, App. B), 1.8M steps, without flips.

Flips: the official run script (scripts/run_lsun.py) trains cat with --randflip 0 and
bedroom with its default 1, while the paper (App. B) says every dataset but LSUN Bedroom
was flipped. The configs follow the run script, the commands of the released checkpoints;
--config.data.random_flip=True gives the paper's wording.
"""

import ml_collections

from configs import _lsun_celeba_256


def get_config() -> ml_collections.ConfigDict:
  return _lsun_celeba_256.get_config(
    "lsun/cat", eval_split="train", num_train_steps=1_800_000, random_flip=False
  )
