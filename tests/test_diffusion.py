"""Tests for ddpm_jax.diffusion: closed forms, Monte-Carlo moments and identities.

Expectations are computed independently in float64 NumPy from the paper's equations.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from ddpm_jax import diffusion as d
from ddpm_jax import schedules
from tests import gaussian as g

T = 1000
SHAPE = (4, 8, 8, 3)


@pytest.fixture(scope="module")
def betas():
  return schedules.get_beta_schedule("linear", T)


@pytest.fixture(scope="module")
def sched(betas):
  return d.DiffusionSchedule.from_betas(betas)


def _x0(key=0, shape=SHAPE):
  """Images on the 256-level grid in [-1, 1], edges included."""
  levels = jax.random.randint(jax.random.PRNGKey(key), shape, 0, 256)
  levels = levels.at[0, 0, :3, 0].set(jnp.array([0, 255, 128]))
  return levels.astype(jnp.float32) / 127.5 - 1.0


def _np_cdf(x):
  """The tanh approximation of the normal CDF, re-derived here in float64."""
  return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


# --- The schedule tables -------------------------------------------------------------


def test_tables_match_float64_closed_forms(sched, betas):
  abar = np.cumprod(1.0 - betas)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  post_var = betas * (1 - abar_prev) / (1 - abar)
  for name, expected in [
    ("alphas_cumprod", abar),
    ("sqrt_recipm1_alphas_cumprod", np.sqrt(1 / abar - 1)),
    ("posterior_variance", post_var),
    ("posterior_mean_coef1", betas * np.sqrt(abar_prev) / (1 - abar)),
    ("posterior_mean_coef2", (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar)),
  ]:
    table = getattr(sched, name)
    assert table.dtype == jnp.float32 and table.shape == (T,)
    np.testing.assert_allclose(np.asarray(table), expected, rtol=2e-6, err_msg=name)
  assert sched.posterior_variance[0] == 0.0
  # The clipped log variance uses beta~ of the second step in place of log(0).
  np.testing.assert_allclose(
    sched.posterior_log_variance_clipped[:2], np.log(post_var[1]), rtol=1e-6
  )
  np.testing.assert_allclose(sched.fixedlarge_log_variance[0], np.log(post_var[1]), rtol=1e-6)
  np.testing.assert_allclose(sched.fixedlarge_log_variance[1:], np.log(betas[1:]), rtol=1e-6)
  assert sched.num_timesteps == T


def test_from_betas_rejects_bad_betas():
  with pytest.raises(ValueError, match=r"\(0, 1\].*1.5"):
    d.DiffusionSchedule.from_betas(np.array([0.1, 1.5]))
  with pytest.raises(ValueError, match=r"\(0, 1\].*0.0"):
    d.DiffusionSchedule.from_betas(np.array([0.0, 0.1]))
  with pytest.raises(ValueError, match="1-D"):
    d.DiffusionSchedule.from_betas(np.zeros((2, 2)) + 0.1)


def test_schedule_is_a_pytree_that_jits_and_pmaps(sched):
  leaves = jax.tree_util.tree_leaves(sched)
  assert len(leaves) == 14 and all(x.shape == (T,) for x in leaves)
  x0, t = _x0(), jnp.array([0, 10, 500, 999], jnp.int32)
  noise = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
  expected = d.q_sample(sched, x0, t, noise)
  n = jax.local_device_count()
  mapped = jax.pmap(d.q_sample, in_axes=(None, 0, 0, 0))(
    sched,
    jnp.tile(x0[None], (n, 1, 1, 1, 1)),
    jnp.tile(t[None], (n, 1)),
    jnp.tile(noise[None], (n, 1, 1, 1, 1)),
  )
  chex.assert_trees_all_close(mapped[-1], expected, atol=1e-6)
  vmapped = jax.vmap(d.q_sample, in_axes=(None, 0, 0, 0))(
    sched, x0[:, None], t[:, None], noise[:, None]
  )
  chex.assert_trees_all_close(vmapped[:, 0], expected, atol=1e-6)


# --- Forward process ---------------------------------------------------------------


class ForwardTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_q_sample_moments_match_q_mean_variance(self):
    sched = d.DiffusionSchedule.from_betas(schedules.get_beta_schedule("linear", T))
    n = 20000
    x0 = jnp.full((n, 2), 0.7).at[:, 1].set(-0.3)
    t = jnp.full((n,), 300, jnp.int32)
    noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
    xt = self.variant(d.q_sample)(sched, x0, t, noise)
    mean, var, log_var = self.variant(d.q_mean_variance)(sched, x0, t)
    chex.assert_shape([xt, mean, var, log_var], (n, 2))
    np.testing.assert_allclose(log_var, np.log(var), rtol=1e-5)
    v = float(var[0, 0])
    np.testing.assert_allclose(var, v)
    # Sample mean within 5 standard errors, sample variance within 5 of its standard error.
    np.testing.assert_allclose(xt.mean(0), mean[0], atol=5 * np.sqrt(v / n))
    np.testing.assert_allclose(xt.var(0), var[0], atol=5 * v * np.sqrt(2 / n))
    abar = np.cumprod(1 - schedules.get_beta_schedule("linear", T))[300]
    np.testing.assert_allclose(mean[0], np.sqrt(abar) * np.array([0.7, -0.3]), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_predict_xstart_from_eps_inverts_q_sample(self):
    sched = d.DiffusionSchedule.from_betas(schedules.get_beta_schedule("linear", T))
    x0 = _x0()
    t = jnp.array([0, 1, 400, 999], jnp.int32)
    eps = jax.random.normal(jax.random.PRNGKey(3), SHAPE)
    xt = d.q_sample(sched, x0, t, eps)
    rec = self.variant(d.predict_xstart_from_eps)(sched, xt, t, eps)
    # float32 error grows like sqrt(1/abar_T) ~ 156 at t=999.
    chex.assert_trees_all_close(rec, x0, atol=1e-4)
    chex.assert_trees_all_close(
      self.variant(d.predict_eps_from_xstart)(sched, xt, t, x0), eps, atol=1e-4
    )


def test_posterior_is_consistent_with_the_forward_process(betas, sched):
  """x_t ~ q(x_t|x_0) then x_{t-1} ~ q(x_{t-1}|x_t,x_0) has the joint law of the chain.

  The marginal of x_{t-1} must be q(x_{t-1}|x_0) and Cov(x_{t-1}, x_t) must equal
  sqrt(alpha_t) (1 - abar_{t-1}), as when x_t is drawn from q(x_t|x_{t-1}) (Eq. 2).
  """
  n, t_ = 40000, 200
  abar = np.cumprod(1 - betas)
  x0 = jnp.full((n, 1), 0.5)
  t = jnp.full((n,), t_, jnp.int32)
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(7), 4)
  xt = d.q_sample(sched, x0, t, jax.random.normal(k1, x0.shape))
  mean, var, log_var = d.q_posterior_mean_variance(sched, x0, xt, t)
  xprev = mean + jnp.exp(0.5 * log_var) * jax.random.normal(k2, x0.shape)
  np.testing.assert_allclose(var[0, 0], betas[t_] * (1 - abar[t_ - 1]) / (1 - abar[t_]), rtol=1e-5)
  m_prev, v_prev = np.sqrt(abar[t_ - 1]) * 0.5, 1 - abar[t_ - 1]
  xprev, xt = np.asarray(xprev[:, 0], np.float64), np.asarray(xt[:, 0], np.float64)
  assert abs(xprev.mean() - m_prev) < 5 * np.sqrt(v_prev / n)
  assert abs(xprev.var() - v_prev) < 5 * v_prev * np.sqrt(2 / n)
  cov = np.mean((xprev - xprev.mean()) * (xt - xt.mean()))
  expected_cov = np.sqrt(1 - betas[t_]) * v_prev
  assert abs(cov - expected_cov) < 5 * np.sqrt(v_prev * (1 - abar[t_]) / n)
  # And the reverse direction: x_{t-1} ~ q(x_{t-1}|x_0) pushed through q(x_t|x_{t-1}).
  prev = d.q_sample(sched, x0, t - 1, jax.random.normal(k3, x0.shape))
  pushed = np.sqrt(1 - betas[t_]) * prev + np.sqrt(betas[t_]) * jax.random.normal(k4, x0.shape)
  pushed = np.asarray(pushed[:, 0], np.float64)
  assert abs(pushed.mean() - np.sqrt(abar[t_]) * 0.5) < 5 * np.sqrt((1 - abar[t_]) / n)
  assert abs(pushed.var() - (1 - abar[t_])) < 5 * (1 - abar[t_]) * np.sqrt(2 / n)


# --- Likelihood pieces -------------------------------------------------------------


def test_normal_kl():
  m = jnp.array([0.3, -1.0, 2.0])
  lv = jnp.array([0.0, -2.0, 1.0])
  np.testing.assert_allclose(d.normal_kl(m, lv, m, lv), 0.0, atol=1e-7)
  m2, lv2 = jnp.array([0.0, 0.5, 1.0]), jnp.array([1.0, -1.0, 0.5])
  s1, s2 = np.exp(0.5 * np.asarray(lv, np.float64)), np.exp(0.5 * np.asarray(lv2, np.float64))
  expected = np.log(s2 / s1) + (s1**2 + (np.asarray(m) - np.asarray(m2)) ** 2) / (2 * s2**2) - 0.5
  np.testing.assert_allclose(d.normal_kl(m, lv, m2, lv2), expected, rtol=1e-5)


def test_approx_cdf_is_close_to_the_exact_one():
  x = np.linspace(-6, 6, 1001)
  np.testing.assert_allclose(
    d.approx_standard_normal_cdf(jnp.asarray(x)), scipy.special.ndtr(x), atol=3e-4
  )


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.9, -6.0), (-1.2, 0.5), (0.3, -1.0)])
def test_discretized_gaussian_sums_to_one(mean, log_scale):
  x = jnp.linspace(-1.0, 1.0, 256)
  logp = d.discretized_gaussian_log_likelihood(
    x, means=jnp.full_like(x, mean), log_scales=jnp.full_like(x, log_scale)
  )
  assert float(np.sum(np.exp(np.asarray(logp, np.float64)))) == pytest.approx(1.0, abs=2e-5)
  assert jnp.all(logp <= 0)


def test_discretized_gaussian_hand_computed():
  x = jnp.array([-1.0, 1 / 255, 1.0])
  mean, log_scale = 0.1, -0.5
  s = np.exp(log_scale)
  xs = np.asarray(x, np.float64)
  expected = np.log(
    [
      _np_cdf((xs[0] - mean + 1 / 255) / s),
      _np_cdf((xs[1] - mean + 1 / 255) / s) - _np_cdf((xs[1] - mean - 1 / 255) / s),
      1 - _np_cdf((xs[2] - mean - 1 / 255) / s),
    ]
  )
  got = d.discretized_gaussian_log_likelihood(
    x, means=jnp.full(3, mean), log_scales=jnp.full(3, log_scale)
  )
  np.testing.assert_allclose(got, expected, rtol=1e-4)


# --- Reverse process: every parameterisation round-trips ---------------------------


def _true_outputs(sched, x0, t, noise):
  """What a perfect model outputs under each mean type."""
  xt = d.q_sample(sched, x0, t, noise)
  post_mean = d.q_posterior_mean_variance(sched, x0, xt, t)[0]
  return (
    xt,
    post_mean,
    {"eps": noise, "xstart": x0, "xprev": post_mean, "v": d.v_target(sched, x0, t, noise)},
  )


class ReverseTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.filterwarnings("ignore")
  def test_every_mean_and_variance_type_round_trips(self):
    sched = d.DiffusionSchedule.from_betas(schedules.get_beta_schedule("linear", T))
    betas = schedules.get_beta_schedule("linear", T)
    x0, t = _x0(), jnp.array([0, 5, 300, 800], jnp.int32)
    noise = jax.random.normal(jax.random.PRNGKey(11), SHAPE)
    xt, post_mean, outs = _true_outputs(sched, x0, t, noise)
    post_log_var = d.q_posterior_mean_variance(sched, x0, xt, t)[2]
    # beta~ at the paper's t=2: beta_2 (1 - abar_1) / (1 - abar_2), with 1 - abar_1 = beta_1.
    beta_tilde_2 = betas[1] * betas[0] / (1 - (1 - betas[0]) * (1 - betas[1]))
    var_outputs = {
      "fixedsmall": None,
      "fixedlarge": None,
      "learned": post_log_var,  # a model that outputs log beta~ directly.
      "learned_range": jnp.full(SHAPE, 1.0),  # v = 1 selects log beta_t.
    }
    for mean_type, out in outs.items():
      for var_type, var_out in var_outputs.items():
        model_output = out if var_out is None else jnp.concatenate([out, var_out], -1)
        fn = self.variant(
          lambda mo, mt=mean_type, vt=var_type: d.p_mean_variance(
            sched, mo, xt, t, model_mean_type=mt, model_var_type=vt, clip_denoised=False
          )
        )
        res = fn(model_output)
        chex.assert_shape(list(res.values()), SHAPE)
        # float32 reconstruction error scales with 1/sqrt(abar_t) for eps (t=800: ~20).
        chex.assert_trees_all_close(res["pred_xstart"], x0, atol=2e-3)
        chex.assert_trees_all_close(res["mean"], post_mean, atol=2e-4)
        expected_log_var = {
          "fixedsmall": post_log_var,
          "learned": post_log_var,
          "fixedlarge": np.log(np.append(beta_tilde_2, betas[1:]))[np.asarray(t)],
          "learned_range": np.log(betas)[np.asarray(t)],
        }[var_type]
        expected_log_var = np.broadcast_to(
          np.reshape(expected_log_var, (-1, 1, 1, 1))
          if np.ndim(expected_log_var) == 1
          else expected_log_var,
          SHAPE,
        )
        np.testing.assert_allclose(
          res["log_variance"], expected_log_var, rtol=1e-5, err_msg=f"{mean_type}/{var_type}"
        )
    # fixedsmall's variance itself is beta~ (0 at t=0); fixedlarge's is beta_t.
    small = d.p_mean_variance(
      sched, noise, xt, t, model_mean_type="eps", model_var_type="fixedsmall", clip_denoised=True
    )
    large = d.p_mean_variance(
      sched, noise, xt, t, model_mean_type="eps", model_var_type="fixedlarge", clip_denoised=True
    )
    assert float(small["variance"][0].max()) == 0.0
    np.testing.assert_allclose(large["variance"][:, 0, 0, 0], betas[np.asarray(t)], rtol=1e-6)

  def test_learned_range_interpolates_in_log_space(self):
    sched = d.DiffusionSchedule.from_betas(schedules.get_beta_schedule("linear", T))
    xt, t = jnp.zeros((3, 2)), jnp.array([10, 10, 10], jnp.int32)
    v = jnp.array([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]])
    out = d.p_mean_variance(
      sched,
      jnp.concatenate([xt, v], -1),
      xt,
      t,
      model_mean_type="eps",
      model_var_type="learned_range",
      clip_denoised=True,
    )
    lo, hi = float(sched.posterior_log_variance_clipped[10]), float(sched.log_betas[10])
    np.testing.assert_allclose(out["log_variance"][:, 0], [lo, (lo + hi) / 2, hi], rtol=1e-6)

  def test_clip_denoised_clips_pred_xstart(self):
    sched = d.DiffusionSchedule.from_betas(schedules.get_beta_schedule("linear", T))
    xt, t = jnp.full((2, 3), 5.0), jnp.array([500, 500], jnp.int32)
    out = d.p_mean_variance(
      sched,
      jnp.zeros((2, 3)),
      xt,
      t,
      model_mean_type="eps",
      model_var_type="fixedlarge",
      clip_denoised=True,
    )
    np.testing.assert_array_equal(out["pred_xstart"], 1.0)
    raw = d.p_mean_variance(
      sched,
      jnp.zeros((2, 3)),
      xt,
      t,
      model_mean_type="eps",
      model_var_type="fixedlarge",
      clip_denoised=False,
    )
    assert float(raw["pred_xstart"].min()) > 5.0


# --- The variational bound ---------------------------------------------------------


def test_vb_terms_vanish_for_the_true_posterior(sched):
  x0 = _x0()
  t = jnp.array([1, 50, 500, 999], jnp.int32)
  noise = jax.random.normal(jax.random.PRNGKey(5), SHAPE)
  xt, _, outs = _true_outputs(sched, x0, t, noise)
  for mean_type in ("eps", "xprev", "xstart"):
    res = d.vb_terms_bpd(
      sched,
      outs[mean_type],
      x0,
      xt,
      t,
      model_mean_type=mean_type,
      model_var_type="fixedsmall",
      clip_denoised=False,
    )
    chex.assert_shape(res["output"], (4,))
    np.testing.assert_allclose(res["output"], 0.0, atol=5e-5, err_msg=mean_type)
  # With the larger variance the KL is that of N(mu, beta~) from N(mu, beta), by hand.
  res = d.vb_terms_bpd(
    sched, noise, x0, xt, t, model_mean_type="eps", model_var_type="fixedlarge", clip_denoised=False
  )
  b = np.asarray(sched.betas, np.float64)[np.asarray(t)]
  bt = np.asarray(sched.posterior_variance, np.float64)[np.asarray(t)]
  expected = 0.5 * (np.log(b / bt) + bt / b - 1) / math.log(2)
  np.testing.assert_allclose(res["output"], expected, rtol=2e-3, atol=1e-6)


def test_calc_bpd_loop_equals_a_hand_computation():
  """Point-mass data and its exact eps-predictor: every term is known in closed form.

  With pred_xstart = x_0 exactly, the t>0 terms are KL(N(mu, beta~_t) || N(mu, beta_t)),
  the decoder term is the discretized Gaussian NLL of x_0 under N(x_0, beta~_1 clipped),
  and the prior is KL(N(sqrt(abar_T) x_0, 1-abar_T) || N(0, 1)): none depends on the noise.
  """
  t_max = 20
  betas = schedules.get_beta_schedule("linear", t_max, beta_start=1e-3, beta_end=0.2)
  sched = d.DiffusionSchedule.from_betas(betas)
  x0 = _x0(shape=(2, 4, 4, 1))
  sab, s1ab = sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod

  def model_fn(xt, t):  # the exact noise, given the data is x0.
    return (xt - sab[t][:, None, None, None] * x0) / s1ab[t][:, None, None, None]

  res = jax.jit(
    lambda x: d.calc_bpd_loop(
      sched,
      model_fn,
      x,
      jax.random.PRNGKey(0),
      model_mean_type="eps",
      model_var_type="fixedlarge",
      clip_denoised=True,
    )
  )(x0)
  chex.assert_shape([res["terms_bpd"], res["mse"]], (2, t_max))
  chex.assert_shape([res["total_bpd"], res["prior_bpd"]], (2,))

  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  bt = betas * (1 - abar_prev) / (1 - abar)
  kl_terms = 0.5 * (np.log(betas[1:] / bt[1:]) + bt[1:] / betas[1:] - 1) / math.log(2)
  s = np.sqrt(bt[1])
  xs = np.asarray(x0, np.float64)
  p = np.where(
    xs < -0.999,
    _np_cdf((1 / 255) / s),
    np.where(
      xs > 0.999, 1 - _np_cdf(-(1 / 255) / s), _np_cdf((1 / 255) / s) - _np_cdf(-(1 / 255) / s)
    ),
  )
  decoder = -np.log(p).mean(axis=(1, 2, 3)) / math.log(2)
  m, v = np.sqrt(abar[-1]) * xs, 1 - abar[-1]
  prior = (0.5 * (-1 - np.log(v) + v + m**2)).mean(axis=(1, 2, 3)) / math.log(2)
  np.testing.assert_allclose(
    res["terms_bpd"][:, 1:], np.broadcast_to(kl_terms, (2, t_max - 1)), rtol=1e-3, atol=1e-6
  )
  np.testing.assert_allclose(res["terms_bpd"][:, 0], decoder, rtol=1e-4)
  np.testing.assert_allclose(res["prior_bpd"], prior, rtol=1e-4)
  np.testing.assert_allclose(res["total_bpd"], decoder + prior + kl_terms.sum(), rtol=1e-4)
  np.testing.assert_allclose(res["mse"], 0.0, atol=1e-6)


def test_calc_bpd_loop_is_one_scan(sched):
  def fn(x):
    return d.calc_bpd_loop(
      sched,
      lambda xt, t: xt,
      x,
      jax.random.PRNGKey(0),
      model_mean_type="eps",
      model_var_type="fixedlarge",
      clip_denoised=True,
    )

  jaxpr = jax.make_jaxpr(fn)(jnp.zeros((2, 4, 4, 3)))
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  assert len(scans) == 1 and scans[0].params["length"] == T
  # The model is traced once (inside the scan body), not T times.
  assert len(str(jaxpr)) < 20000


# --- Training losses ---------------------------------------------------------------


@pytest.mark.parametrize("mean_type", d.MEAN_TYPES)
def test_losses_vanish_for_a_perfect_model(sched, mean_type):
  x0, t = _x0(), jnp.array([1, 50, 500, 900], jnp.int32)
  noise = jax.random.normal(jax.random.PRNGKey(2), SHAPE)
  _, _, outs = _true_outputs(sched, x0, t, noise)

  def perfect(xt, tt):
    return outs[mean_type]

  mse = d.training_losses(
    sched,
    perfect,
    x0,
    t,
    noise,
    model_mean_type=mean_type,
    model_var_type="fixedlarge",
    loss_type="mse",
  )
  chex.assert_shape(mse, (4,))
  np.testing.assert_allclose(mse, 0.0, atol=1e-10)
  kl = d.training_losses(
    sched,
    perfect,
    x0,
    t,
    noise,
    model_mean_type=mean_type,
    model_var_type="fixedsmall",
    loss_type="kl",
  )
  np.testing.assert_allclose(kl, 0.0, atol=5e-5)


def test_mse_is_l_simple(sched):
  x0, t = _x0(), jnp.array([3, 30, 300, 999], jnp.int32)
  noise = jax.random.normal(jax.random.PRNGKey(4), SHAPE)
  loss = d.training_losses(
    sched,
    lambda xt, tt: jnp.zeros_like(xt),
    x0,
    t,
    noise,
    model_mean_type="eps",
    model_var_type="fixedlarge",
    loss_type="mse",
  )
  np.testing.assert_allclose(loss, np.mean(np.asarray(noise) ** 2, axis=(1, 2, 3)), rtol=1e-6)


def test_hybrid_trains_the_variance_only_through_the_vb_term(sched):
  x0, t = _x0(), jnp.array([3, 30, 300, 999], jnp.int32)
  noise = jax.random.normal(jax.random.PRNGKey(6), SHAPE)
  out0 = 0.1 * jax.random.normal(jax.random.PRNGKey(8), SHAPE[:-1] + (6,))

  def loss(out, loss_type):
    return d.training_losses(
      sched,
      lambda xt, tt: out,
      x0,
      t,
      noise,
      model_mean_type="eps",
      model_var_type="learned_range",
      loss_type=loss_type,
    ).sum()

  g_hybrid = jax.grad(loss)(out0, "hybrid")
  g_mse_part = jax.grad(lambda o: jnp.mean(jnp.square(noise - o[..., :3]), axis=(1, 2, 3)).sum())(
    out0
  )
  np.testing.assert_allclose(g_hybrid[..., :3], g_mse_part[..., :3], rtol=1e-5, atol=1e-9)
  assert float(jnp.abs(g_hybrid[..., 3:]).max()) > 0
  # The value adds vb_weight * T times the VLB term.
  vb = d.training_losses(
    sched,
    lambda xt, tt: out0,
    x0,
    t,
    noise,
    model_mean_type="eps",
    model_var_type="learned_range",
    loss_type="kl",
  )
  mse = np.mean((np.asarray(noise) - np.asarray(out0[..., :3])) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(
    d.training_losses(
      sched,
      lambda xt, tt: out0,
      x0,
      t,
      noise,
      model_mean_type="eps",
      model_var_type="learned_range",
      loss_type="hybrid",
    ),
    mse + 0.001 * T * np.asarray(vb),
    rtol=1e-4,
  )


def test_prior_bpd_is_small_for_the_linear_schedule(sched):
  # abar_T ~ 4e-5: q(x_T|x_0) is nearly N(0, I), as the paper notes (L_T ~ 1e-5 bits/dim).
  prior = d.prior_bpd(sched, _x0())
  assert float(prior.max()) < 1e-4 and float(prior.min()) >= 0


# --- Bad input ---------------------------------------------------------------------


def test_bad_input_is_rejected_at_trace_time(sched):
  x0, t = _x0(), jnp.array([0, 1, 2, 3], jnp.int32)
  kw = dict(model_mean_type="eps", model_var_type="fixedlarge", clip_denoised=True)
  with pytest.raises(ValueError, match=r"model_mean_type 'score'.*eps, xstart, xprev, v"):
    d.p_mean_variance(sched, x0, x0, t, **{**kw, "model_mean_type": "score"})
  with pytest.raises(ValueError, match=r"model_var_type 'big'.*fixedlarge"):
    d.p_mean_variance(sched, x0, x0, t, **{**kw, "model_var_type": "big"})
  with pytest.raises(ValueError, match=r"loss_type 'l1'.*mse, kl, hybrid"):
    d.training_losses(
      sched,
      lambda a, b: a,
      x0,
      t,
      x0,
      model_mean_type="eps",
      model_var_type="fixedlarge",
      loss_type="l1",
    )
  with pytest.raises(ValueError, match=r"'learned'.*\(4, 8, 8, 6\).*\(4, 8, 8, 3\)"):
    d.p_mean_variance(sched, x0, x0, t, **{**kw, "model_var_type": "learned"})
  with pytest.raises(ValueError, match=r"'fixedlarge'.*\(4, 8, 8, 6\)"):
    d.p_mean_variance(sched, jnp.zeros((4, 8, 8, 6)), x0, t, **kw)
  with pytest.raises(ValueError, match=r"t must have shape \[B\]=\[4\].*\(3,\)"):
    d.q_sample(sched, x0, t[:3], x0)
  with pytest.raises(ValueError, match=r"integer.*float32"):
    d.q_sample(sched, x0, t.astype(jnp.float32), x0)
  with pytest.raises(ValueError, match=r"noise shape \(4, 8, 8, 1\)"):
    d.q_sample(sched, x0, t, x0[..., :1])
  with pytest.raises(ValueError, match="'mse' cannot train model_var_type 'learned'"):
    d.training_losses(
      sched,
      lambda a, b: a,
      x0,
      t,
      x0,
      model_mean_type="eps",
      model_var_type="learned",
      loss_type="mse",
    )
  # Raised while tracing, before any compile or compute.
  with pytest.raises(ValueError, match="model_mean_type"):
    jax.jit(lambda x: d.p_mean_variance(sched, x, x, t, **{**kw, "model_mean_type": "e"}))(x0)


# --- The score view: eps_theta is a scaled score (Song et al. 2021, §4.3) -------------------

MU, S = 0.2, 0.5


@pytest.mark.parametrize("mean_type", d.MEAN_TYPES)
@pytest.mark.parametrize("var_type", ["fixedlarge", "learned_range"])
def test_score_matches_gaussian_closed_form(mean_type, var_type):
  """grad log q(x_t) from each parameterisation's exact output, at every t; a learned
  variance's extra channels are ignored. Non-eps types equal -eps_hat / sqrt(1 - abar)."""
  t = np.arange(g.T, dtype=np.int32)
  x_t = g.q_t_samples(jax.random.key(0), t, (g.T, 2, 2, 3), MU, S)
  learned = var_type == "learned_range"
  output = g.exact_output_fn(MU, S, mean_type, learned)(x_t, jnp.asarray(t))
  got = jax.jit(
    lambda o, x: d.score(
      g.SCHED, o, x, jnp.asarray(t), model_mean_type=mean_type, model_var_type=var_type
    )
  )(output, x_t)
  expected = g.closed_form_score(np.asarray(x_t, np.float64), t, MU, S)
  np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
  if mean_type != "eps":
    tt = jnp.asarray(t)
    mean_out = output[..., :3] if learned else output
    pred_xstart = d.predict_xstart(g.SCHED, mean_out, x_t, tt, model_mean_type=mean_type)
    eps_hat = d.predict_eps_from_xstart(g.SCHED, x_t, tt, pred_xstart)
    np.testing.assert_allclose(got, -eps_hat / jnp.sqrt(1 - g.abar(tt, 4)), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("mean_type", d.MEAN_TYPES)
def test_l_simple_is_weighted_denoising_score_matching(mean_type):
  """Per example, L_simple = w_t mean ||s_theta(x_t) + z / sigma_t||^2 (Vincent 2011) with
  sigma_t^2 = 1 - abar_t the VP marginal variance and w_t = sigma_t^2 for eps (Ho et al.
  §3.2), sigma_t^4 / abar_t for xstart, sigma_t^2 / abar_t for v and coef1_t^2 sigma_t^4 /
  abar_t for xprev. Any model works: the identity holds output by output."""
  shape = (16, 2, 2, 3)
  x0 = jax.random.uniform(jax.random.key(7), shape, minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.key(8), shape)
  t = jnp.linspace(0, g.T - 1, 16).astype(jnp.int32)

  def model_fn(x, t):
    return 0.3 * x + jnp.sin(3 * x) + 0.01 * t.reshape(-1, 1, 1, 1)

  loss = d.training_losses(
    g.SCHED,
    model_fn,
    x0,
    t,
    noise,
    model_mean_type=mean_type,
    model_var_type="fixedlarge",
    loss_type="mse",
  )
  x_t = d.q_sample(g.SCHED, x0, t, noise)
  score = d.score(g.SCHED, model_fn(x_t, t), x_t, t, model_mean_type=mean_type)
  sigma_sq = 1 - g.ABAR[np.asarray(t)]
  dsm = np.mean(
    np.square(np.asarray(score + noise / jnp.sqrt(sigma_sq).reshape(-1, 1, 1, 1), np.float64)),
    axis=(1, 2, 3),
  )
  abar = g.ABAR[np.asarray(t)]
  coef1 = np.asarray(g.SCHED.posterior_mean_coef1, np.float64)[np.asarray(t)]
  weight = {
    "eps": sigma_sq,
    "xstart": sigma_sq**2 / abar,
    "v": sigma_sq / abar,
    "xprev": coef1**2 * sigma_sq**2 / abar,
  }[mean_type]
  np.testing.assert_allclose(loss, weight * dsm, rtol=2e-3)
