"""LSUN Bedroom 256x256 (paper Table 3, App. B), 2.4M steps, with random flips.

Flips: the paper (App. B) says every dataset but LSUN Bedroom was flipped, while the
official run script (scripts/run_lsun.py) trains bedroom with its default --randflip 1 and
cat with --randflip 0. The configs follow the run script, the commands of the released
checkpoints; --config.data.random_flip=False gives the paper's wording.
"""

import ml_collections

from configs import _lsun_celeba_256


def get_config() -> ml_collections.ConfigDict:
  return _lsun_celeba_256.get_config(
    "lsun/bedroom", eval_split="validation", num_train_steps=2_400_000, random_flip=True
  )
