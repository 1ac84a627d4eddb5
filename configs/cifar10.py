"""CIFAR-10 32x32, unconditional (paper §4, App. B): 35.7M-parameter U-Net, L_simple,
fixedlarge variance, Adam 2e-4 with 5000 warm-up steps, batch 128, EMA 0.9999, 800k steps.

The base config already holds this recipe; this file names it.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.dataset = "cifar10"
  return config
