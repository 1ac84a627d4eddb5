"""Fashion-MNIST 28x28x1 from the local idx files (offline quick start on a CPU).

A small U-Net (686,769 parameters: ch 16, ch_mult 1,2,4, one res block per level,
attention at 7x7) with the paper's diffusion (T=1000, linear betas, eps prediction,
L_simple, fixedlarge) and a recipe shortened for a ~20-minute CPU run: lr 1e-3, 100
warm-up steps, batch 32, EMA 0.995 warmed up as TF's ExponentialMovingAverage with
num_updates, 1,500 steps. Sample
grids use DDIM with 100 steps (1000-step ancestral sampling of 64 images takes ~10x
longer on a CPU); set --config.sampling.method=ancestral for the paper's sampler.

  sudo apt-get install dataset-fashion-mnist   # files under /usr/share/datasets/fashion-mnist
  python main.py --config=configs/fashion_mnist.py --workdir=/tmp/fashion_mnist
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.dataset = "fashion_mnist_files"  # Falls back to tfds "fashion_mnist".
  config.data.image_size = 28
  config.data.num_channels = 1
  config.data.random_flip = True
  config.model.ch = 16
  config.model.ch_mult = (1, 2, 4)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (7,)
  config.model.num_groups = 8
  config.model.dropout = 0.0
  config.training.batch_size = 32
  config.training.num_train_steps = 1500
  config.training.learning_rate = 1e-3
  config.training.warmup_steps = 100
  # The mean gradient is clipped once: one device's semantics (the paper configs clip each
  # of 8 replicas' gradients, as the official TPU run; docs/training.md compares the two).
  config.training.clip_mode = "global"
  config.training.ema_decay = 0.995  # 0.9999 would still average in the init after 1,500 steps.
  config.training.ema_warmup = True  # min(0.995, (1 + k) / (10 + k)): forgets the init early.
  config.training.log_every_steps = 50
  config.training.checkpoint_every_steps = 500
  config.training.sample_every_steps = 500
  config.training.num_grid_samples = 64
  config.sampling.method = "ddim"
  config.sampling.ddim.num_steps = 100
  # Clip DDIM's x0 estimate to [-1, 1], as the ancestral sampler does: after 1,500 steps the
  # estimate often leaves the data range, and unclipped (the DDIM reference code) about a
  # third of the grid saturates into noise.
  config.sampling.ddim.clip_denoised = True
  config.sampling.batch_size = 64
  config.sampling.num_samples = 10_000
  config.eval.batch_size = 64
  config.eval.num_examples = 10_000
  config.eval.fid_num_samples = 10_000
  config.eval.feature_network = "classifier"  # Offline: no Inception weights needed.
  return config
