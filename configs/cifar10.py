"""CIFAR-10 32x32, unconditional (paper §4, App. B): 35.7M-parameter U-Net, L_simple,
fixedlarge variance, Adam 2e-4 with 5000 warm-up steps, batch 128, EMA 0.9999, 800k steps.

The base config already holds this recipe; this file names it, and the evaluation of
Tables 1 and 2: bits/dim on all 10,000 test images, FID of 50,000 samples against all
50,000 training images.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.dataset = "cifar10"
  config.data.eval_split = "test"
  config.eval.num_examples = -1  # The whole test split (10,000 images).
  config.eval.fid_num_samples = 50_000
  config.eval.fid_reference_split = "train"
  config.eval.fid_reference_num_examples = -1  # The whole training split (50,000).
  return config
