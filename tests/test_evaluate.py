"""Tests of --mode=sample and --mode=eval (ddpm_jax/evaluate.py) on a tiny trained workdir,
and of the bits/dim machinery against closed forms for Gaussian data."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test_tiny
from ddpm_jax import diffusion
from ddpm_jax import evaluate
from ddpm_jax import input_pipeline
from ddpm_jax import schedules
from ddpm_jax import train


def _config(**overrides):
  config = test_tiny.get_config()
  config.training.num_train_steps = 20
  config.training.sample_every_steps = 0
  config.sampling.method = "ddim"
  config.sampling.num_steps = 5
  config.sampling.num_samples = 12
  config.eval.num_examples = 20
  config.eval.fid_num_samples = 0
  for dotted, value in overrides.items():
    group, field = dotted.split(".")
    config[group][field] = value
  return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("evaluate"))
  train.train_and_evaluate(_config(), path)
  return path


def _snapshot(path):
  return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getmtime(os.path.join(d, f)))
                for d, _, files in os.walk(path) for f in files)


def test_sample_mode_writes_npz_and_grid_and_never_overwrites(workdir):
  path = evaluate.run_sample(_config(), workdir)
  assert path == os.path.join(workdir, "samples", "step_20", "samples.npz")
  samples = np.load(path)["samples"]
  chex.assert_shape(samples, (12, 8, 8, 3))
  assert samples.dtype == np.uint8 and samples.std() > 0
  assert os.path.exists(os.path.join(workdir, "samples", "step_20", "grid.png"))
  before = _snapshot(workdir)
  with pytest.raises(ValueError, match="already holds"):
    evaluate.run_sample(_config(), workdir)
  assert _snapshot(workdir) == before


def test_eval_mode_bpd_rate_distortion_and_fid(workdir):
  results = evaluate.run_eval(_config(**{"eval.fid_num_samples": 16}), workdir)
  result = results["bpd"]
  out = os.path.join(workdir, "eval", "step_20")
  with open(os.path.join(out, "bpd.json")) as f:
    saved = json.load(f)
  assert saved == pytest.approx(result, nan_ok=True)
  assert saved["num_examples"] == 20 and saved["step"] == 20
  parts = saved["prior_bpd"] + saved["decoder_bpd"] + saved["diffusion_kl_bpd"]
  assert saved["total_bpd"] == pytest.approx(parts, rel=1e-5)
  assert 0 < saved["total_bpd_sem"] < saved["total_bpd"]
  rd = np.loadtxt(os.path.join(out, "rate_distortion.csv"), delimiter=",", skiprows=1)
  chex.assert_shape(rd, (100, 3))
  np.testing.assert_array_equal(rd[:, 0], np.arange(1, 101))
  # t = 1: everything but the decoder term L_0 has been sent; t = T: only the prior L_T.
  assert rd[0, 1] == pytest.approx(saved["total_bpd"] - saved["decoder_bpd"], rel=1e-4)
  assert rd[-1, 1] == pytest.approx(saved["prior_bpd"], rel=1e-4)
  assert np.all(np.diff(rd[:, 1]) <= 1e-6)  # Rate falls as fewer terms have been sent.
  assert os.path.getsize(os.path.join(out, "rate_distortion.png")) > 1000
  with open(os.path.join(out, "fid.json")) as f:
    fid = json.load(f)
  assert fid.pop("sampler") == results["fid"].pop("sampler")
  assert fid == pytest.approx(results["fid"], nan_ok=True)
  assert (fid["feature_network"], fid["reference_split"], fid["num_samples"], fid["step"]) == (
      "classifier", "train", 16, 20)
  assert np.isfinite(fid["fid"]) and fid["fid"] > 0
  assert fid["samples"].startswith("generated")  # The 12 saved samples are too few.
  assert "'method': 'ddim', 'num_steps': 5" in fid["samples"]
  with pytest.raises(ValueError, match="already holds"):
    evaluate.run_eval(_config(), workdir)


def test_bpd_does_not_depend_on_device_count(workdir):
  config = _config()
  params, _ = evaluate.restore_ema_params(config, workdir)
  model, schedule = train.create_model(config), train.create_schedule(config.diffusion)
  fn_of = lambda p: (lambda x_t, t: model.apply({"params": p}, x_t, t, train=False))
  images, _ = next(input_pipeline.create_eval_iterator(config.data, global_batch_size=16))
  rng = jax.random.key(3)
  out8 = evaluate.make_p_bpd(config, schedule, fn_of)(train.replicate(params),
                                                      images, rng)
  one = jax.devices()[:1]
  out1 = evaluate.make_p_bpd(config, schedule, fn_of, devices=one)(
      train.replicate(params, devices=one), images.reshape((1, 16, 8, 8, 3)), rng)
  for k in ("total_bpd", "terms_bpd", "mse"):
    np.testing.assert_allclose(np.asarray(out8[k]).reshape(16, -1),
                               np.asarray(out1[k]).reshape(16, -1), rtol=2e-5, atol=1e-6)


def test_bound_terms_of_exact_gaussian_model_match_closed_form():
  """x_0 ~ N(mu, s^2) per dimension, exact E[eps | x_t], fixedsmall variance, no clipping.

  For t >= 1 the mean error is coef1 (x_0 - E[x_0|x_t]), so E[L_t] = KL of the variances +
  coef1^2 Var(x_0 | x_t) / (2 sigma_t^2), Var(x_0|x_t) = s^2 (1-abar) / (abar s^2 + 1-abar);
  the prior term is E KL(N(sqrt(abar_T) x_0, 1-abar_T) || N(0, 1)). In bits: / ln 2.
  """
  T, mu, s = 50, 0.1, 0.3
  betas = schedules.get_beta_schedule("linear", T, beta_start=1e-3, beta_end=0.3)
  sched = diffusion.DiffusionSchedule.from_betas(betas)
  abar = np.cumprod(1 - betas)
  abar_prev = np.concatenate([[1.0], abar[:-1]])

  def eps_fn(x_t, t):
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * mu) / (a * s**2 + 1 - a)

  x0 = mu + s * jax.random.normal(jax.random.key(0), (2048, 1, 1, 4))
  out = jax.jit(lambda x, k: diffusion.calc_bpd_loop(
      sched, eps_fn, x, k, model_mean_type="eps", model_var_type="fixedsmall",
      clip_denoised=False))(x0, jax.random.key(1))
  post_var = betas * (1 - abar_prev) / (1 - abar)
  coef1 = betas * np.sqrt(abar_prev) / (1 - abar)
  var_x0 = s**2 * (1 - abar) / (abar * s**2 + 1 - abar)
  with np.errstate(divide="ignore", invalid="ignore"):  # t=0 (beta~ = 0) is not compared.
    expected = (coef1**2 * var_x0 / (2 * post_var)) / np.log(2)  # sigma^2 = beta~: no var. KL.
  terms = np.asarray(out["terms_bpd"])
  mean, sem = terms.mean(0), terms.std(0) / np.sqrt(terms.shape[0])
  np.testing.assert_array_less(np.abs(mean[1:] - expected[1:]), 5 * sem[1:] + 1e-6)
  prior = 0.5 * (-np.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * (mu**2 + s**2) - 1)
  # The prior term is ~1.6e-5 bits: float32 cancellation in the KL limits it to ~1e-6.
  assert float(out["prior_bpd"].mean()) == pytest.approx(prior / np.log(2), abs=1e-6)
  # Rate-distortion: rate non-increasing in t, distortion (exact posterior mean) increasing.
  rd = evaluate.rate_distortion(np.asarray(out["prior_bpd"]), terms, np.asarray(out["mse"]))
  assert np.all(np.diff(rd["rate"]) <= 1e-7)
  assert np.all(np.diff(rd["distortion"]) > -0.02 * rd["distortion"][1:])
  assert rd["distortion"][-1] == pytest.approx(127.5 * np.sqrt(var_x0[-1]), rel=0.05)


@pytest.mark.parametrize("overrides,match", [
    ({"sampling.checkpoint_step": 7}, r"No checkpoint at step 7.*available: \[20\]"),
    ({"sampling.num_samples": 0}, "sampling.num_samples=0 must be a positive integer"),
    ({"sampling.method": "ddim", "sampling.num_steps": 101}, r"num_steps=101 must lie in \[1"),
    ({"sampling.batch_size": 12}, "sampling.batch_size=12 is not divisible by the 8 devices"),
])
def test_sample_bad_input_writes_nothing(workdir, overrides, match):
  before = _snapshot(workdir)
  with pytest.raises(ValueError, match=match):
    evaluate.run_sample(_config(**overrides), workdir)
  assert _snapshot(workdir) == before


def test_no_checkpoint(tmp_path):
  with pytest.raises(ValueError, match="No checkpoint in"):
    evaluate.run_sample(_config(), str(tmp_path))
  with pytest.raises(ValueError, match="No checkpoint in"):
    evaluate.run_eval(_config(), str(tmp_path))
  assert os.listdir(tmp_path) == []
