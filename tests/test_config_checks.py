"""Every config rule raises ConfigError with one line naming the field, the value and what
is allowed (ddpm_jax/config_checks.py), and good configs pass."""

import pytest

from configs import default as default_config
from ddpm_jax import config_checks, data_sources
from ddpm_jax.errors import ConfigError


@pytest.mark.parametrize(
  "mode,overrides,match",
  [
    ("train", {"training.batch_size": 12}, r"batch_size=12 .*8 devices"),
    (
      "train",
      {"data.dataset": "imagenet"},
      r"data.dataset='imagenet' is unknown; allowed: cifar10",
    ),
    ("train", {"training.learning_rate": 0.0}, r"learning_rate=0.0 must be > 0"),
    ("train", {"training.learning_rate": -1e-4}, "learning_rate=-0.0001"),
    ("train", {"training.num_train_steps": 0}, "num_train_steps=0 must be a positive integer"),
    ("train", {"training.ema_decay": 1.0}, r"ema_decay=1.0 must lie in \[0, 1\)"),
    ("train", {"data.image_size": 9}, "Image size 9"),
    ("train", {"diffusion.loss_type": "l1"}, r"diffusion.loss_type='l1' is unknown"),
    ("train", {"sampling.method": "euler"}, r"sampling.method='euler' is unknown"),
    ("train", {"training.steps_per_call": 0}, "steps_per_call=0 must be a positive integer"),
    ("train", {"training.steps_per_call": 3}, "log_every_steps=20 must be a multiple of"),
    ("train", {"training.nonfinite": "ignore"}, r"training.nonfinite='ignore' is unknown"),
    ("train", {"model.dtype": "float64"}, r"compute dtype 'float64'"),
    ("train", {"model.num_groups": 5}, r"num_groups=5"),
    ("train", {"model.ch_mult": (1, "x")}, r"model.ch_mult=.*tuple of positive integers"),
    ("train", {"diffusion.beta_end": 1e-4}, r"beta_end=0.0001 must be > diffusion.beta_start"),
    ("train", {"diffusion.model_var_type": "learned"}, r"loss_type='mse' cannot train"),
    ("train", {"data.data_dir": "/nonexistent/data"}, r"'/nonexistent/data' is not an existing"),
    ("sample", {"sampling.num_samples": 0}, "sampling.num_samples=0 must be a positive integer"),
    (
      "sample",
      {"sampling.method": "ddim", "sampling.ddim.num_steps": 101},
      r"sampling.ddim.num_steps=101 must be an integer in \[1, 100\]",
    ),
    (
      "sample",
      {"sampling.batch_size": 12},
      r"sampling.batch_size=12 \(a global batch\) is not divisible by the 8",
    ),
    ("sample", {"sampling.checkpoint_step": -5}, r"checkpoint_step=-5 must be an integer >= 0"),
    ("sample", {"sampling.tag": "a/b"}, "sampling.tag='a/b' may hold only"),
    (
      "eval",
      {"eval.batch_size": 12},
      r"eval.batch_size=12 \(a global batch\) is not divisible by the 8 devices",
    ),
    ("eval", {"eval.num_examples": 0}, r"eval.num_examples=0 must be a positive integer \(or -1"),
    ("eval", {"eval.fid_num_samples": 1}, "fid_num_samples=1 must be 0"),
    ("eval", {"eval.feature_network": "vgg"}, r"eval.feature_network='vgg' is unknown"),
    (
      "eval",
      {"eval.feature_network": "inception", "eval.inception_weights": ""},
      "eval.inception_weights='' is not an existing file",
    ),
    ("eval", {"eval.fid_reference_split": "valid"}, "eval.fid_reference_split='valid'"),
    (
      "eval",
      {"eval.fid_reference_num_examples": 0},
      r"eval.fid_reference_num_examples=0 must be a positive integer \(or -1\)",
    ),
    (
      "eval",
      {
        "data.dataset": "cifar10",
        "data.image_size": 32,
        "model.attn_resolutions": (16,),
        "eval.fid_reference_num_examples": 100,
        "eval.fid_reference_split": "train[:1000]",
      },
      r"eval.fid_reference_num_examples=100 takes the first images of an unsliced split",
    ),
    ("eval", {"eval.classifier_learning_rate": 0.0}, "classifier_learning_rate=0.0 must be > 0"),
    ("bogus", {}, r"--mode='bogus' is unknown"),
    ("train", {"training.keep_every_steps": 150}, r"keep_every_steps=150 must be a multiple"),
    (
      "eval",
      {"eval.checkpoint_steps": "all", "eval.fid_num_samples": 0},
      r"set eval.fid_num_samples > 0",
    ),
    (
      "eval",
      {"eval.checkpoint_steps": "10,x", "eval.fid_num_samples": 4},
      r"eval.checkpoint_steps='10,x' must be",
    ),
    (
      "eval",
      {"eval.feature_network": "inception", "eval.inception_preprocess": "torch"},
      r"eval.inception_preprocess='torch' is unknown; allowed: tf, pytorch_fid",
    ),
    ("train", {"diffusion.beta_schedule": "jsd"}, r"'jsd' ends with beta_T = 1 .*divides by zero"),
    ("train", {"training.clip_mode": "local"}, r"training.clip_mode='local' is unknown"),
    (
      "sample",
      {"sampling.method": "ddim", "sampling.ddim.skip": "cubic"},
      r"sampling.ddim.skip='cubic' is unknown; allowed: uniform, quad",
    ),
    (
      "sample",
      {"sampling.method": "ddim", "sampling.ddim.eta": -1.0},
      r"sampling.ddim.eta=-1.0 must be >= 0",
    ),
    (
      "sample",
      {"sampling.method": "pc", "sampling.pc.predictor": "euler"},
      r"sampling.pc.predictor='euler' is unknown; allowed: ancestral, ddim",
    ),
    (
      "sample",
      {"sampling.method": "pc", "sampling.pc.predictor": "pc"},
      r"sampling.pc.predictor='pc' is unknown; allowed: ancestral, ddim",
    ),
    (
      "sample",
      {"sampling.method": "pc", "sampling.pc.corrector_steps": -1},
      r"sampling.pc.corrector_steps=-1 must be an integer >= 0",
    ),
    (
      "sample",
      {"sampling.method": "pc", "sampling.pc.snr": 0.0},
      r"sampling.pc.snr=0.0 must be > 0",
    ),
    (
      "sample",
      {"sampling.method": "pc", "sampling.pc.predictor": "ddim", "sampling.ddim.num_steps": 101},
      r"sampling.ddim.num_steps=101 must be an integer in \[1, 100\]",
    ),
    (
      "sample",
      {"sampling.method": "annealed_langevin", "sampling.annealed_langevin.num_steps": 0},
      r"sampling.annealed_langevin.num_steps=0 must be an integer in \[1, 100\]",
    ),
    (
      "sample",
      {"sampling.method": "annealed_langevin", "sampling.annealed_langevin.langevin_steps": 0},
      r"sampling.annealed_langevin.langevin_steps=0 must be an integer >= 1",
    ),
    (
      "sample",
      {
        "sampling.method": "annealed_langevin",
        "sampling.annealed_langevin.langevin_step_size": -1e-5,
      },
      r"sampling.annealed_langevin.langevin_step_size=-1e-05 must be > 0",
    ),
    (
      "sample",
      {"sampling.method": "dpm_solver", "sampling.dpm_solver.order": 4},
      r"sampling.dpm_solver.order=4 must be an integer in \[1, 3\]",
    ),
    (
      "sample",
      {"sampling.method": "dpm_solver", "sampling.dpm_solver.spacing": "karras"},
      r"sampling.dpm_solver.spacing='karras' is unknown; allowed: logSNR, time_uniform, "
      r"time_quadratic",
    ),
    (
      "sample",
      {
        "sampling.method": "dpm_solver",
        "sampling.dpm_solver.num_steps": 2,
        "sampling.dpm_solver.order": 3,
      },
      r"sampling.dpm_solver.num_steps=2 must be >= order=3",
    ),
    (
      "sample",
      {"sampling.method": "dpm_solver", "diffusion.model_mean_type": "xprev"},
      r"sampling.dpm_solver: model_mean_type='xprev' has no x_0 at the non-integer times",
    ),
    (
      "train",
      {
        "sampling.method": "annealed_langevin",
        "sampling.annealed_langevin.num_steps": 100,
        "diffusion.beta_schedule": "jsd",
        "diffusion.model_mean_type": "xstart",
      },
      r"annealed_langevin' with sampling.annealed_langevin.num_steps=100 reaches t=T-1.*'jsd'",
    ),
  ],
)
def test_bad_field_is_one_config_error(make_config, mode, overrides, match):
  with pytest.raises(ConfigError, match=match) as info:
    config_checks.check_config(make_config(**overrides), mode)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize(
  "overrides,message",
  [
    (dict(dataset="cifar10", image_size=64), r"image_size=64.*'cifar10', which is 32x32x3"),
    (dict(dataset="cifar10", num_channels=1), r"num_channels=1.*32x32x3"),
    (dict(dataset="synthetic", image_size=0), r"data.image_size=0 must be a positive"),
    (dict(dataset="lsun/bedroom", image_size=64, num_channels=1), "num_channels=1"),
    (dict(dataset="cifar10", eval_split="validation"), r"eval_split='validation'.*train, test"),
    (dict(dataset="celeb_a_hq/256", image_size=256), r"eval_split='test'.*allowed: train"),
    (dict(dataset="synthetic", train_split="train[:10]"), r"train_split='train\[:10\]'"),
    (dict(dataset="cifar10", data_dir="/nonexistent/tfds"), r"'/nonexistent/tfds' is not an"),
  ],
)
def test_bad_data_config_is_rejected(overrides, message):
  data = default_config.get_config().data
  data.update(overrides)
  with pytest.raises(ConfigError, match=message):
    config_checks.check_data(data)


def test_data_dir_without_idx_files_names_path_and_package(tmp_path):
  data = default_config.get_config().data
  data.update(dataset="fashion_mnist_files", image_size=28, num_channels=1, data_dir=str(tmp_path))
  with pytest.raises(
    ConfigError,
    match=r"train-images-idx3-ubyte.gz not found.*"
    r"apt-get install dataset-fashion-mnist",
  ):
    config_checks.check_data(data)


def test_valid_data_configs_pass():
  data = default_config.get_config().data
  config_checks.check_data(data)
  data.update(dataset="lsun/church_outdoor", image_size=64, eval_split="validation")
  config_checks.check_data(data)  # LSUN is resized to any size.
  data.update(dataset="cifar10", image_size=32, eval_split="train[:1000]")
  config_checks.check_data(data)
  assert data_sources.FASHION_MNIST_FILES["train"] == "train-images-idx3-ubyte.gz"


@pytest.mark.parametrize("mode", ["train", "sample", "eval"])
def test_the_tiny_config_passes_every_mode(make_config, mode):
  config_checks.check_config(make_config(), mode)


def test_the_heartbeat_timeout_of_a_pod_is_an_integer_of_at_least_2_s(make_config):
  assert config_checks.check_distributed(make_config()) == 60
  assert config_checks.check_distributed(make_config(heartbeat_timeout_seconds=2)) == 2
  for bad in (1, 0, -60):  # (ConfigDict and the integer flag refuse other types.)
    with pytest.raises(
      ConfigError,
      match=rf"^heartbeat_timeout_seconds={bad!r} must be an "
      r"integer >= 2\.$",
    ):
      config_checks.check_distributed(make_config(heartbeat_timeout_seconds=bad))
