"""A tiny run for tests and smoke checks: synthetic 8x8x3 data, a ~60k-parameter U-Net,
T=100. Trains at several steps per second on a CPU.

  python main.py --config=configs/test_tiny.py --workdir=/tmp/tiny
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.dataset = "synthetic"
  config.data.image_size = 8
  config.data.num_channels = 3
  config.model.ch = 16
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.num_groups = 8
  config.model.dropout = 0.0
  config.diffusion.num_timesteps = 100
  config.training.batch_size = 16
  config.training.num_train_steps = 200
  config.training.learning_rate = 1e-3
  config.training.warmup_steps = 0  # Constant lr: the first step already moves the params.
  config.training.clip_mode = "global"  # Any device count, any batch.
  config.training.ema_decay = 0.99
  config.training.log_every_steps = 20
  config.training.checkpoint_every_steps = 100
  config.training.sample_every_steps = 100
  config.training.num_grid_samples = 8
  config.sampling.batch_size = 8
  config.sampling.num_samples = 16
  config.eval.batch_size = 16
  config.eval.num_examples = 32
  config.eval.fid_num_samples = 16
  config.eval.feature_network = "classifier"
  config.eval.classifier_steps = 30
  config.eval.classifier_batch_size = 32
  return config
