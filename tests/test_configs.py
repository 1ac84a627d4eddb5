"""Every config loads, passes validation and builds its U-Net; the paper's configs hold the
paper's models, diffusion, training recipes and evaluation protocol (Ho et al. 2020)."""

import importlib
import os

import numpy as np
import pytest

from ddpm_jax import config_checks, factories
from ddpm_jax.models import unet as unet_lib

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIGS = sorted(
  f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_")
)
PAPER = ("default", "cifar10", "celebahq256", "lsun_church", "lsun_bedroom", "lsun_cat")
# The paper's models: the official code's parameter counts (35.7M at 32x32, 114M at 256x256).
PAPER_PARAMS = {
  "default": 35_746_307,
  "cifar10": 35_746_307,
  "celebahq256": 113_673_219,
  "lsun_church": 113_673_219,
  "lsun_bedroom": 113_673_219,
  "lsun_cat": 113_673_219,
}
# What each config trains on, and whether it flips, as the official run script (bedroom
# flipped, cat not; the paper's text says the opposite of bedroom: configs/lsun_bedroom.py).
DATA = {
  "default": ("cifar10", True),
  "cifar10": ("cifar10", True),
  "celebahq256": ("celeb_a_hq/256", True),
  "lsun_church": ("lsun/church_outdoor", True),
  "lsun_bedroom": ("lsun/bedroom", True),
  "lsun_cat": ("lsun/cat", False),
  "fashion_mnist": ("fashion_mnist_files", True),
  "test_tiny": ("synthetic", True),
}


def _config(name: str):
  return importlib.import_module(f"configs.{name}").get_config()


def test_every_config_is_listed():
  """A new config must state what it trains on (and, for a paper model, its size) here."""
  assert set(CONFIGS) == set(DATA) and set(PAPER_PARAMS) == set(PAPER) <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_and_builds(name):
  """Every config passes config_checks in every mode and builds its U-Net for its data
  shape; the paper's configs build the paper's parameter count (traced, not initialised)."""
  config = _config(name)
  for mode in ("train", "sample", "eval"):
    if mode == "eval" and config.eval.feature_network == "inception":
      config.eval.fid_num_samples = 0  # FID needs the converted weights, which tests lack.
    config_checks.check_config(config, mode)
  assert (config.data.dataset, config.data.random_flip) == DATA[name]
  model = factories.create_model(config)
  count = unet_lib.count_params(
    model, image_size=config.data.image_size, num_channels=config.data.num_channels
  )
  assert count == PAPER_PARAMS.get(name, count)


@pytest.mark.parametrize("name", [*PAPER, "fashion_mnist"])
def test_the_papers_diffusion(name):
  """The paper's forward process (§4): T = 1000 linear betas from 1e-4 to 0.02, as built
  from the config; L_simple with eps prediction."""
  config = _config(name)
  betas = np.asarray(factories.create_schedule(config.diffusion).betas, np.float64)
  assert betas.shape == (1000,)
  np.testing.assert_allclose(betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-6)
  assert (config.diffusion.model_mean_type, config.diffusion.loss_type) == ("eps", "mse")


@pytest.mark.parametrize("name", ["celebahq256", "lsun_church", "lsun_bedroom", "lsun_cat"])
def test_256_recipe(name):
  """Appendix B at 256x256: batch 64, learning rate 2e-5, no dropout, EMA decay 0.9999."""
  config = _config(name)
  assert (config.training.batch_size, config.training.learning_rate, config.model.dropout) == (
    64,
    2e-5,
    0.0,
  )
  assert config.training.ema_decay == 0.9999


def test_cifar10_recipe():
  """Appendix B on CIFAR-10: batch 128, learning rate 2e-4 warmed up over 5000 steps,
  gradient clipping at 1, EMA 0.9999, 800k steps, dropout 0.1, sampled with beta_t."""
  config = _config("cifar10")
  tr = config.training
  assert (
    tr.batch_size,
    tr.learning_rate,
    tr.warmup_steps,
    tr.grad_clip,
    tr.ema_decay,
    tr.num_train_steps,
  ) == (128, 2e-4, 5000, 1.0, 0.9999, 800_000)
  assert (
    config.model.dropout,
    config.diffusion.loss_type,
    config.diffusion.model_var_type,
    config.diffusion.num_timesteps,
  ) == (0.1, "mse", "fixedlarge", 1000)


@pytest.mark.parametrize("name", ["celebahq256", "lsun_church", "lsun_bedroom", "lsun_cat"])
def test_256_configs_sample_with_the_posterior_variance(name):
  """The official 256x256 runs sample with beta~_t (fixedsmall), CIFAR-10 with beta_t."""
  config = _config(name)
  assert config.diffusion.model_var_type == "fixedsmall"
  assert _config("cifar10").diffusion.model_var_type == "fixedlarge"


@pytest.mark.parametrize(
  "name, reference_num",
  [
    ("cifar10", -1),
    ("lsun_church", 50_000),
    ("lsun_bedroom", 50_000),
    ("lsun_cat", 50_000),
    ("celebahq256", -1),
  ],
)
def test_evaluation_protocol(name, reference_num):
  """FID of 50,000 samples against the training set: CIFAR-10 all of it (Table 1), LSUN the
  first 50,000 images (StyleGAN2's metric, Table 3); CIFAR-10 bits/dim on the whole test
  split (Table 2)."""
  ev = _config(name).eval
  assert (ev.fid_num_samples, ev.fid_reference_split, ev.fid_reference_num_examples) == (
    50_000,
    "train",
    reference_num,
  )
  if name == "cifar10":
    config = _config("cifar10")
    assert (config.data.eval_split, config.eval.num_examples) == ("test", -1)


@pytest.mark.parametrize("name", CONFIGS)
def test_paper_configs_clip_8_replicas_and_short_ones_the_mean(name):
  """The paper's configs clip each of 8 replicas' gradients, as the official TPU v3-8 run;
  the short CPU configs clip the mean gradient."""
  training = _config(name).training
  if name in ("fashion_mnist", "test_tiny"):
    assert training.clip_mode == "global"
  else:
    assert (training.clip_mode, training.clip_replicas) == ("per_replica", 8)
