"""ddpm_jax's DPM-Solver++ against the authors' implementation, on the closed-form model of
Gaussian data N(mu, s^2 I) (exact eps at every continuous t, exact ODE solution).

  # dpm_solver_pytorch.py of github.com/LuChengTHU/dpm-solver, saved anywhere:
  python -m reference_torch.dpm_solver_check --reference=PATH/dpm_solver_pytorch.py

For each setting (schedule, data scale s, order, spacing, steps, lower_order_final,
denoise_to_zero, thresholding) it prints the max difference between ddpm_jax's solution
and the reference's, both in float64 (and ddpm_jax's float32 against it, and the
reference's own float32 against float64), and both errors against the exact solution.
ddpm_jax's third_order="reference" is compared with the authors' 3M as it is;
third_order="taylor" with the authors' code whose D_2 term is given the Taylor weight
(RefD2Doubled below). Needs torch (the test or bench extra). Nothing is asserted.
"""

import importlib.util
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags

from ddpm_jax import schedules
from ddpm_jax.samplers import dpm_solver as ds

flags.DEFINE_string("reference", None, "Path of the authors' dpm_solver_pytorch.py.")
flags.mark_flags_as_required(["reference"])
FLAGS = flags.FLAGS
ref = None  # The reference module, loaded in main().

MU = 0.3


def _ref_d2_doubled():
  """The reference solver with its multistep third-order D_2 weighted by 2 alpha_t phi_3."""
  return type(
    "RefD2Doubled", (ref.DPM_Solver,), {"multistep_dpm_solver_third_update": _third_update_taylor}
  )


def _third_update_taylor(self, x, model_prev_list, t_prev_list, t, solver_type="dpmsolver"):
  """The authors' 3M update with the Taylor weight of D_2 (written here, in their API)."""

  del solver_type
  ns = self.noise_schedule
  m2, m1, m0 = model_prev_list
  t2, t1, t0 = t_prev_list
  l2, l1, l0, lt = (ns.marginal_lambda(u) for u in (t2, t1, t0, t))
  sigma0, sigma_t = ns.marginal_std(t0), ns.marginal_std(t)
  alpha_t = torch.exp(ns.marginal_log_mean_coeff(t))
  h1, h0, h = l1 - l2, l0 - l1, lt - l0
  r0, r1 = h0 / h, h1 / h
  d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
  d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
  d2 = (d1_0 - d1_1) / (r0 + r1)
  phi1 = torch.expm1(-h)
  phi2 = phi1 / h + 1.0
  phi3 = phi2 / h - 0.5
  return (
    sigma_t / sigma0 * x - alpha_t * phi1 * m0 + alpha_t * phi2 * d1 - 2.0 * alpha_t * phi3 * d2
  )


def ref_solve(betas64, x_T, s, cls=None, dtype=torch.float64, thresholding=False, **kw):
  torch.set_default_dtype(dtype)  # every tensor the reference makes (linspace, ...) in dtype
  ns = ref.NoiseScheduleVP("discrete", betas=torch.tensor(betas64), dtype=dtype)
  n = ns.total_N

  def model(x, t_input):  # eps of N(mu, s^2) at t = t_input / 1000 + 1/N (the ref's input)
    t = t_input / 1000.0 + 1.0 / n
    a = torch.exp(ns.marginal_log_mean_coeff(t)).reshape(-1, 1, 1, 1)
    sg = ns.marginal_std(t).reshape(-1, 1, 1, 1)
    return sg * (x - a * MU) / (a**2 * s**2 + sg**2)

  model_fn = ref.model_wrapper(model, ns, model_type="noise")
  solver = (cls or ref.DPM_Solver)(
    model_fn,
    ns,
    algorithm_type="dpmsolver++",
    correcting_x0_fn="dynamic_thresholding" if thresholding else None,
  )
  out = solver.sample(torch.tensor(x_T, dtype=dtype), method="multistep", **kw)
  torch.set_default_dtype(torch.float64)
  return out.double().numpy(), n


def exact_solution(schedule, x_T, s):
  """The probability-flow ODE's solution at t = 1/N: (x - alpha mu) / sqrt(alpha^2 s^2 +
  sigma^2) is constant along it (no thresholding, no denoise_to_zero)."""
  with jax.enable_x64(True):
    cs = ds.continuous_schedule(schedule, jnp.float64)
    n = cs.num_knots.astype(jnp.float64)
    la1, la0 = ds.marginal_log_alpha(cs, jnp.float64(1.0)), ds.marginal_log_alpha(cs, 1.0 / n)
    a1, a0 = np.exp(float(la1)), np.exp(float(la0))
    s1, s0 = np.sqrt(-np.expm1(2 * float(la1))), np.sqrt(-np.expm1(2 * float(la0)))
  return a0 * MU + (x_T - a1 * MU) * np.sqrt(a0**2 * s**2 + s0**2) / np.sqrt(a1**2 * s**2 + s1**2)


def jax_model(schedule, s, dtype):
  """eps of N(mu, s^2) with log alpha interpolated linearly between the knots (n+1)/N."""
  cs = ds.continuous_schedule(schedule, dtype)

  def model(x, t_in):
    n = cs.num_knots.astype(dtype)
    t = t_in / n + 1.0 / n
    la = ds.marginal_log_alpha(cs, t).reshape(-1, 1, 1, 1)
    a, sg = jnp.exp(la), jnp.sqrt(-jnp.expm1(2 * la))
    return sg * (x - a * MU) / (a**2 * s**2 + sg**2)

  return model


def run(schedule_name, s, rows, thresholding=False):
  sched = schedules.DiffusionSchedule.from_betas(schedules.get_beta_schedule(schedule_name, 1000))
  betas64 = np.asarray(sched.betas, np.float64)
  x_T = np.random.default_rng(0).standard_normal((4, 8, 8, 3))
  for order, spacing, steps, lof, d2z in rows:
    kw = dict(
      steps=steps, order=order, skip_type=spacing, lower_order_final=lof, denoise_to_zero=d2z
    )
    ref64, n_kept = ref_solve(betas64, x_T, s, thresholding=thresholding, **kw)
    ref32, _ = ref_solve(betas64, x_T, s, dtype=torch.float32, thresholding=thresholding, **kw)
    opts = dict(
      num_steps=steps,
      order=order,
      spacing=spacing,
      lower_order_final=lof,
      denoise_to_zero=d2z,
      thresholding=thresholding,
    )
    with jax.enable_x64(True):
      ours64 = np.asarray(
        ds.dpm_solver_sample(
          sched, jax_model(sched, s, jnp.float64), jnp.asarray(x_T, jnp.float64), **opts
        )
      )
    ours32 = np.asarray(
      ds.dpm_solver_sample(
        sched, jax_model(sched, s, jnp.float32), jnp.asarray(x_T, jnp.float32), **opts
      ),
      np.float64,
    )
    line = (
      f"{schedule_name:7s} N={n_kept:4d} s={s} thr={int(thresholding)} order={order} "
      f"{spacing:12s} steps={steps:2d} lof={int(lof)} d2z={int(d2z)} | "
      f"|ours64-ref64| {np.abs(ours64 - ref64).max():.1e}  "
      f"|ours32-ref64| {np.abs(ours32 - ref64).max():.1e}  "
      f"|ref32-ref64| {np.abs(ref32 - ref64).max():.1e}"
    )
    if not (thresholding or d2z):
      exact = exact_solution(sched, x_T, s)
      line += (
        f"  |ours64-exact| {np.abs(ours64 - exact).max():.1e}"
        f"  |ref64-exact| {np.abs(ref64 - exact).max():.1e}"
      )
    if order == 3:
      fixed, _ = ref_solve(betas64, x_T, s, cls=_ref_d2_doubled(), thresholding=thresholding, **kw)
      with jax.enable_x64(True):
        taylor = np.asarray(
          ds.dpm_solver_sample(
            sched,
            jax_model(sched, s, jnp.float64),
            jnp.asarray(x_T, jnp.float64),
            third_order="taylor",
            **opts,
          )
        )
      line += f"  |taylor64-ref64(2 D2)| {np.abs(taylor - fixed).max():.1e}"
      if not (thresholding or d2z):
        line += f"  |taylor64-exact| {np.abs(taylor - exact).max():.1e}"
    print(line, flush=True)


def main(argv):
  del argv
  global ref
  spec = importlib.util.spec_from_file_location("dpm_solver_pytorch", FLAGS.reference)
  ref = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ref)
  torch.set_default_dtype(torch.float64)
  grid = list(itertools.product((1, 2, 3), ("logSNR", "time_uniform"), (10, 20), (True,), (False,)))
  grid += [
    (2, "logSNR", 8, True, False),
    (3, "logSNR", 8, True, False),
    (3, "logSNR", 8, False, False),
    (2, "time_quadratic", 10, True, True),
    (3, "logSNR", 20, True, True),
  ]
  run("linear", 0.5, grid)
  run("cosine", 0.5, [(2, "logSNR", 10, True, False), (3, "time_uniform", 20, True, True)])
  run(
    "linear",
    1.5,
    [
      (2, "logSNR", 10, True, True),
      (3, "logSNR", 20, True, True),
      (2, "time_uniform", 8, True, False),
    ],
    thresholding=True,
  )


if __name__ == "__main__":
  app.run(main)
