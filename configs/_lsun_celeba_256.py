"""Shared 256x256 recipe of the paper's CelebA-HQ and LSUN models (App. B)."""

import ml_collections

from configs import default


def get_config(
  dataset: str, *, num_train_steps: int, eval_split: str, random_flip: bool = True
) -> ml_collections.ConfigDict:
  """The 113,673,219-parameter U-Net (ch_mult 1,1,2,2,4,4, attention at 16x16), dropout 0,
  Adam 2e-5, batch 64, EMA 0.9999, sampling with the posterior variance ('fixedsmall');
  only the dataset, flips and length differ."""
  config = default.get_config()
  config.data.dataset = dataset
  config.data.image_size = 256
  config.data.num_channels = 3
  config.data.random_flip = random_flip
  config.data.eval_split = eval_split  # CelebA-HQ and LSUN cat have no held-out split.
  config.data.shuffle_buffer = 10_000
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.0
  # The official 256x256 runs (run_lsun.py, run_celebahq.py) use the older GaussianDiffusion,
  # whose p_sample uses the posterior variance beta~_t; only CIFAR-10 samples with beta_t.
  config.diffusion.model_var_type = "fixedsmall"
  config.training.batch_size = 64
  config.training.learning_rate = 2e-5
  config.training.num_train_steps = num_train_steps
  config.training.num_grid_samples = 16
  config.sampling.batch_size = 64
  config.eval.batch_size = 64
  if dataset.startswith("lsun/"):
    # Table 3's FIDs use StyleGAN2's metric: 50,000 samples against the first 50,000
    # training images (its reader with shuffling off, no mirroring).
    config.eval.fid_reference_num_examples = 50_000
  return config
