"""DPM-Solver++ (ddpm_jax/samplers/dpm_solver.py) against closed forms.

Data N(mu, s^2 I): at continuous t, x_t ~ N(alpha_t mu, v_t I) with v_t = alpha_t^2 s^2 +
sigma_t^2, so the exact eps is sigma_t (x - alpha_t mu) / v_t, and (x_t - alpha_t mu) /
sqrt(v_t) is constant along the probability-flow ODE: x_t = alpha_t mu + (x_T - alpha_T mu)
sqrt(v_t / v_T). alpha_t comes from the solver's piecewise-linear log alpha, written here
independently (jnp.interp on the knots (n + 1) / N). Plus the options' checks and a tiny
U-Net evaluated at float t. About 15 s with -n 0 on the 2-core CPU.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import schedules
from ddpm_jax.models import unet as unet_lib
from ddpm_jax.samplers import ModelSpec, ddim_step, dpm_solver
from ddpm_jax.samplers.dpm_solver import DPMSolverOptions, dpm_solver_sample

MU, S = 0.3, 0.5


def _schedule(num_timesteps: int) -> schedules.DiffusionSchedule:
  return schedules.DiffusionSchedule.from_betas(
    schedules.get_beta_schedule("linear", num_timesteps)
  )


class GaussianData:
  """Exact model outputs and ODE solution for data N(mu, s^2 I) (see the module docstring)."""

  def __init__(self, schedule, dtype, mu: float = MU, s: float = S):
    betas = np.asarray(schedule.betas, np.float64)
    self.n = betas.shape[0]
    self.t_knots = jnp.asarray(np.arange(1, self.n + 1) / self.n, dtype)
    self.log_alpha_knots = jnp.asarray(0.5 * np.cumsum(np.log1p(-betas)), dtype)
    self.dtype, self.mu, self.s = dtype, mu, s

  def alpha_sigma(self, t):
    log_alpha = jnp.interp(t, self.t_knots, self.log_alpha_knots)
    return jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2.0 * log_alpha))

  def model_fn(self, mean_type: str = "eps", learned_var: bool = False, counter=None):
    """model_fn(x, t_in): t_in = (t - 1/N) N is mapped back to t = (t_in + 1) / N."""

    def fn(x, t_in):
      if counter is not None:
        jax.debug.callback(lambda: counter.append(1))
      alpha, sigma = self.alpha_sigma((t_in.astype(self.dtype) + 1.0) / self.n)
      alpha = alpha.reshape((-1,) + (1,) * (x.ndim - 1))
      sigma = sigma.reshape(alpha.shape)
      eps = sigma * (x - alpha * self.mu) / (alpha**2 * self.s**2 + sigma**2)
      x0 = (x - sigma * eps) / alpha
      out = {"eps": eps, "xstart": x0, "v": alpha * eps - sigma * x0}[mean_type]
      return jnp.concatenate([out, jnp.full_like(out, 7.0)], -1) if learned_var else out

    return fn

  def exact(self, x_T):
    """The ODE's solution at t = 1/N from x_T at t = 1."""
    (a1, s1), (a0, s0) = self.alpha_sigma(1.0), self.alpha_sigma(1.0 / self.n)
    v1, v0 = a1**2 * self.s**2 + s1**2, a0**2 * self.s**2 + s0**2
    return a0 * self.mu + (x_T - a1 * self.mu) * jnp.sqrt(v0 / v1)


def _x_T(shape=(4, 4, 4, 3), dtype=jnp.float32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _solve(schedule, model_fn, x_T, **kwargs):
  """dpm_solver_sample under one jit (the step tables too, not op by op)."""
  return jax.jit(lambda x: dpm_solver_sample(schedule, model_fn, x, **kwargs))(x_T)


# --- Convergence order ---------------------------------------------------------------------

STEPS = (40, 80)
# (order, third_order) -> the order of convergence: the authors' 3M ("reference", whose D_2
# weight is half the Taylor one) is a second-order method.
SOLVERS = {(1, "reference"): 1, (2, "reference"): 2, (3, "reference"): 2, (3, "taylor"): 3}


@pytest.fixture(scope="module")
def convergence_errors():
  """Max error against the exact solution, float64, T = 1000, logSNR grid, per solver."""
  errors = {}
  with jax.enable_x64(True):
    sched = _schedule(1000)
    data = GaussianData(sched, jnp.float64)
    x_T = _x_T(dtype=jnp.float64)
    exact = data.exact(x_T)
    for order, third in SOLVERS:
      errors[order, third] = [
        float(
          jnp.abs(
            _solve(
              sched,
              data.model_fn(),
              x_T,
              num_steps=m,
              order=order,
              third_order=third,
              lower_order_final=False,
            )
            - exact
          ).max()
        )
        for m in STEPS
      ]
  return errors


@pytest.mark.parametrize("solver", list(SOLVERS), ids=[f"{o}{t[0]}" for o, t in SOLVERS])
def test_error_falls_at_the_solver_order(convergence_errors, solver):
  """Doubling the steps from 40 to 80 divides the error by 2^p: measured p = 0.98, 1.98,
  2.15 (the authors' 3M) and 4.0 (3M with the Taylor weight). At least p - 0.25 separates
  adjacent orders. At most p + 1.25: here the h^3 term of the Taylor 3M's global error
  almost cancels (x_0'' vanishes at both ends of the lambda range), so the h^4 term shows
  at these step counts."""
  errors, order = convergence_errors[solver], SOLVERS[solver]
  slope = np.log2(errors[0] / errors[1])
  assert order - 0.25 <= slope <= order + 1.25, (errors, slope)


def _quadratic(lam, c):
  return c[0] + c[1] * lam + c[2] * lam**2


@pytest.mark.parametrize("degree", [0, 1, 2])
def test_third_order_weights_integrate_quadratics_exactly(degree):
  """The 3M update replaces x_0(lambda) by the quadratic through the last three outputs, so
  for a quadratic x_0 its weights give sigma_t int_{lambda_s}^{lambda_t} e^lambda x_0 dlambda
  exactly, with unequal steps; 1M and 2M are exact for constants."""
  c = [0.7, -0.4, 0.3][: degree + 1] + [0.0] * (2 - degree)
  lam_2, lam_1, lam_s, lam_t = -1.3, -0.9, -0.2, 0.5
  h, h_0, h_1 = lam_t - lam_s, lam_s - lam_1, lam_1 - lam_2
  alpha_t, sigma_t = np.sqrt(1 / (1 + np.exp(-2 * lam_t))), np.sqrt(1 / (1 + np.exp(2 * lam_t)))
  nodes, w = np.polynomial.legendre.leggauss(20)
  lam = lam_s + (nodes + 1) * h / 2
  integral = sigma_t * np.sum(w * np.exp(lam) * _quadratic(lam, c)) * h / 2
  m = np.array([_quadratic(x, c) for x in (lam_s, lam_1, lam_2)])
  with jax.enable_x64(True):
    args = [jnp.asarray([v], jnp.float64) for v in (h, h_0, h_1, alpha_t)]
    got = {
      3: dpm_solver.third_order_weights(*args, d2_factor=2.0),
      2: dpm_solver.second_order_weights(args[0], args[1], args[3]),
      1: dpm_solver.first_order_weights(args[0], args[3]),
    }
    reference = dpm_solver.third_order_weights(*args, d2_factor=1.0)
  for order, weights in got.items():
    if order == 3 or degree == 0:
      np.testing.assert_allclose(np.asarray(weights[0]) @ m, integral, rtol=1e-12)
  # The authors' weights are exact up to linear x_0 only.
  reference_error = abs(float(np.asarray(reference[0]) @ m) - integral)
  assert reference_error < 1e-12 * abs(integral) if degree < 2 else reference_error > 1e-4


# --- Order 1 is DDIM, time grids, step orders ------------------------------------------------


def test_order_one_is_ddim_and_takes_num_steps_evaluations():
  """With T = 100 and 9 steps the time_uniform grid t_i = 1 - i (1 - 1/N) / 9 sits on the
  indices 99, 88, ..., 0, where DPM-Solver-1 is DDIM (eta 0) step for step."""
  sched = _schedule(100)
  data = GaussianData(sched, jnp.float32)
  calls = []
  x_T = _x_T()
  got = _solve(
    sched, data.model_fn(counter=calls), x_T, num_steps=9, order=1, spacing="time_uniform"
  )
  jax.effects_barrier()
  assert len(calls) == 9
  step = jax.jit(
    lambda x, t, s: ddim_step(
      sched,
      data.model_fn()(x, t),
      x,
      t,
      s,
      jnp.zeros_like(x),
      spec=ModelSpec(),
      eta=0.0,
      clip_denoised=False,
    )[0]
  )
  x, batch = x_T, x_T.shape[0]
  for n in range(99, 0, -11):
    x = step(x, jnp.full((batch,), n, jnp.int32), jnp.full((batch,), n - 11, jnp.int32))
  assert float(jnp.abs(x - x_T).max()) > 0.1
  chex.assert_trees_all_close(got, x, atol=2e-5)


def test_time_grids():
  """All grids run from t = 1 to 1/N; logSNR is uniform in lambda, time_quadratic in sqrt(t);
  inverse_lambda undoes marginal_lambda."""
  sched, t = _schedule(1000), np.linspace(1e-3, 1.0, 37)

  @jax.jit
  def grids_and_round_trip(t):
    cs = dpm_solver.continuous_schedule(sched, jnp.float64)
    grids = {name: dpm_solver.time_grid(cs, 7, name) for name in dpm_solver.SPACINGS}
    return (
      grids,
      dpm_solver.marginal_lambda(cs, grids["logSNR"]),
      dpm_solver.inverse_lambda(cs, dpm_solver.marginal_lambda(cs, t)),
    )

  with jax.enable_x64(True):
    grids, lam, t_back = jax.tree.map(np.asarray, grids_and_round_trip(t))
  for grid in grids.values():
    np.testing.assert_allclose([grid[0], grid[-1]], [1.0, 1e-3], rtol=1e-12)
    assert np.all(np.diff(grid) < 0)
  np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-10)
  root = np.sqrt(grids["time_quadratic"])
  np.testing.assert_allclose(np.diff(root), np.diff(root)[0], rtol=1e-10)
  np.testing.assert_allclose(t_back, t, rtol=1e-10)


def test_step_orders():
  """Warm-up min(order, i); lower_order_final lowers the last steps only below 10 steps."""
  np.testing.assert_array_equal(dpm_solver.step_orders(3, 5, True), [1, 2, 3, 2, 1])
  np.testing.assert_array_equal(dpm_solver.step_orders(3, 5, False), [1, 2, 3, 3, 3])
  np.testing.assert_array_equal(dpm_solver.step_orders(2, 9, True), [1] + [2] * 7 + [1])
  np.testing.assert_array_equal(dpm_solver.step_orders(3, 10, True), [1, 2] + [3] * 8)


def test_one_scan_over_the_steps():
  """The steps are one lax.scan of length num_steps, not unrolled."""
  sched = _schedule(100)
  jaxpr = jax.make_jaxpr(
    lambda x: dpm_solver_sample(
      sched, GaussianData(sched, jnp.float32).model_fn(), x, num_steps=6, order=3
    )
  )(_x_T())
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  assert [e.params["length"] for e in scans] == [6]


# --- Mean types ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eps_solution():
  sched = _schedule(100)
  data = GaussianData(sched, jnp.float32)
  return sched, data, _solve(sched, data.model_fn("eps"), _x_T(), num_steps=10)


@pytest.mark.parametrize(
  "mean_type,var_type", [("xstart", "fixedlarge"), ("v", "fixedsmall"), ("eps", "learned_range")]
)
def test_every_mean_type_gives_the_same_solution(eps_solution, mean_type, var_type):
  """The exact model's eps, x_0 and v outputs (a learned variance half is ignored) give one
  data prediction, hence one solution."""
  sched, data, expected = eps_solution
  got = _solve(
    sched,
    data.model_fn(mean_type, var_type == "learned_range"),
    _x_T(),
    num_steps=10,
    model_mean_type=mean_type,
    model_var_type=var_type,
  )
  chex.assert_trees_all_close(got, expected, atol=1e-5)


@pytest.mark.parametrize("mean_type", ["xprev", "score"])
def test_mean_types_without_x0_at_continuous_t_are_refused(mean_type):
  sched = _schedule(100)
  with pytest.raises(ValueError, match=rf"model_mean_type='{mean_type}'.*allowed: eps, "):
    dpm_solver_sample(
      sched,
      GaussianData(sched, jnp.float32).model_fn(),
      _x_T(),
      num_steps=4,
      model_mean_type=mean_type,
    )


# --- Thresholding --------------------------------------------------------------------------


def test_dynamic_threshold_formula():
  """s = max(quantile of |x_0|, threshold_max) per example, x_0 = clip(x_0, -s, s) / s."""
  rng = np.random.default_rng(1)
  x0 = np.stack([3.0 * rng.standard_normal((4, 4, 2)), 0.4 * rng.standard_normal((4, 4, 2))])
  got = np.asarray(dpm_solver.dynamic_threshold(jnp.asarray(x0), 0.9, 1.0))
  s = np.maximum(np.quantile(np.abs(x0).reshape(2, -1), 0.9, axis=1), 1.0)[:, None, None, None]
  np.testing.assert_allclose(got, np.clip(x0, -s, s) / s, rtol=1e-6)
  assert s[0] > 1.0 and np.abs(got[0]).max() == pytest.approx(1.0)
  np.testing.assert_array_equal(got[1], x0[1].astype(np.float32))  # s = 1: unchanged.


def test_dynamic_threshold_below_the_floor_is_a_clip_at_one():
  """A quantile under threshold_max = 1 leaves only the clip to [-1, 1]."""
  x0 = jnp.asarray(np.linspace(-2.0, 2.0, 64).reshape(2, 4, 4, 2), jnp.float32)
  np.testing.assert_array_equal(dpm_solver.dynamic_threshold(x0, 0.2, 1.0), jnp.clip(x0, -1, 1))


def test_thresholded_solve_ends_in_the_unit_box():
  """With thresholding and denoise_to_zero the output is the last x_0 prediction: inside
  [-1, 1], with |x| = 1 reached (wide data: the quantile exceeds 1); one extra call."""
  sched = _schedule(100)
  calls = []
  opts = DPMSolverOptions(num_steps=6, denoise_to_zero=True, thresholding=True)
  model_fn = GaussianData(sched, jnp.float32, s=2.0).model_fn(counter=calls)
  x = jax.jit(lambda x: opts.solve(sched, model_fn, x, ModelSpec()))(_x_T())
  jax.effects_barrier()
  assert len(calls) == opts.nfe(100) == 7
  np.testing.assert_allclose(jnp.abs(x).reshape(x.shape[0], -1).max(axis=1), 1.0, rtol=1e-6)


# --- Options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "fields,match",
  [
    ({"spacing": "cosine"}, r"spacing='cosine' is unknown; allowed: logSNR, time_uniform, "),
    ({"order": 4}, r"order=4 must be an integer in \[1, 3\]"),
    ({"order": 0}, r"order=0 must be an integer in \[1, 3\]"),
    ({"third_order": "exact"}, r"third_order='exact' is unknown; allowed: reference, taylor"),
    ({"num_steps": 2, "order": 3}, r"num_steps=2 must be >= order=3"),
    ({"num_steps": 0, "order": 1}, r"num_steps=0 must be an integer >= 1"),
    ({"threshold_quantile": 0.0}, r"threshold_quantile=0.0 must lie in \(0, 1\]"),
    ({"threshold_quantile": 1.5}, r"threshold_quantile=1.5 must lie in \(0, 1\]"),
    ({"threshold_max": 0.0}, r"threshold_max=0.0 must be > 0"),
  ],
)
def test_options_are_checked_with_one_line(fields, match):
  with pytest.raises(ValueError, match=match) as err:
    DPMSolverOptions(**fields).check(1000, ModelSpec())
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match=match):  # Before any tracing.
    dpm_solver_sample(_schedule(10), None, _x_T(), **{"num_steps": 20, **fields})


def test_option_defaults_and_nfe():
  opts = DPMSolverOptions()
  opts.check(1000, ModelSpec())
  assert (opts.num_steps, opts.order, opts.spacing, opts.lower_order_final, opts.third_order) == (
    20,
    2,
    "logSNR",
    True,
    "reference",
  )
  assert opts.nfe(1000) == 20 and DPMSolverOptions(num_steps=7, denoise_to_zero=True).nfe(1000) == 8
  with pytest.raises(ValueError, match=r"T >= 2 .* got T=1"):
    opts.check(1, ModelSpec())


# --- The U-Net at float t ------------------------------------------------------------------


def test_unet_takes_float_t_and_solves():
  """t = 3.0 gives the output of t = 3; t = 3.5 another, finite one; a 3-step solve through
  the network is finite. Parameters are N(0, 0.1^2) draws (shapes from eval_shape: no init
  compile; a fresh init's zero output layer would hide t)."""
  model = unet_lib.UNet(
    ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=8, dropout=0.0
  )
  x = jnp.concatenate([_x_T((1, 8, 8, 3))] * 2)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), x, jnp.zeros((2,), jnp.int32), train=False)
  )
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.1, a.shape), a.dtype), shapes)
  apply = jax.jit(lambda x, t: model.apply(params, x, t, train=False))
  at_int, at_float = jax.jit(
    lambda x: (apply(x, jnp.array([3, 3], jnp.int32)), apply(x, jnp.array([3.0, 3.5], jnp.float32)))
  )(x)
  chex.assert_trees_all_close(at_float[0], at_int[0], atol=1e-6)
  assert bool(jnp.all(jnp.isfinite(at_float)))
  assert float(jnp.abs(at_float[1] - at_float[0]).max()) > 1e-4
  out = _solve(_schedule(100), apply, x, num_steps=3)
  chex.assert_shape(out, x.shape)
  assert bool(jnp.all(jnp.isfinite(out)))
