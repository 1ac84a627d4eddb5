"""The samplers as one family: generate runs each method in one scan, and config.sampling
maps onto options objects (and back onto the records stored with samples)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import samplers
from tests.gaussian import SCHED, SHAPE, T

EPS = samplers.ModelSpec()
# Every method at a setting whose levels are T (the scan length checked below).
AT_T_LEVELS = {
  "ancestral": samplers.AncestralOptions(),
  "ddim": samplers.DDIMOptions(num_steps=T),
  "pc": samplers.PCOptions(samplers.DDIMOptions(num_steps=T)),
  "annealed_langevin": samplers.AnnealedLangevinOptions(num_steps=T),
  "dpm_solver": samplers.DPMSolverOptions(num_steps=T, order=3),
}


def test_every_method_has_a_test_setting():
  assert set(AT_T_LEVELS) == set(samplers.METHODS)


def smooth_model(x, t):
  """Any model defined at integer and continuous t (DPM-Solver evaluates non-integer t)."""
  return 0.5 * x + 0.01 * t.reshape((-1,) + (1,) * (x.ndim - 1))


def _jaxpr(options):
  return jax.make_jaxpr(
    lambda rng: samplers.generate(SCHED, smooth_model, rng, SHAPE, options, spec=EPS)
  )(jax.random.key(0)).jaxpr


@pytest.mark.parametrize("method", sorted(AT_T_LEVELS))
def test_one_scan_not_unrolled(method):
  """One scan of the method's T levels; the program does not grow with the level count
  (half the levels: the same number of equations)."""
  options = AT_T_LEVELS[method]
  jaxpr = _jaxpr(options)
  scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
  assert len(scans) == 1 and scans[0].params["length"] == T
  fewer = {f.name: T // 2 for f in dataclasses.fields(options) if f.name == "num_steps"}
  inner = options.predictor if method == "pc" else None
  half = (
    dataclasses.replace(options, predictor=dataclasses.replace(inner, num_steps=T // 2))
    if inner is not None
    else dataclasses.replace(options, **fewer)
  )
  if half != options:
    assert len(_jaxpr(half).eqns) == len(jaxpr.eqns)


def test_every_method_starts_from_the_same_x_T():
  """generate draws x_T from the rng's x_T stream for every method: DPM-Solver through
  generate equals dpm_solver_sample from that x_T."""
  options = samplers.DPMSolverOptions(num_steps=5)
  fn = smooth_model
  rng = jax.random.key(3)
  x_T = jax.random.normal(jax.random.split(rng)[0], SHAPE, jnp.float32)
  np.testing.assert_array_equal(
    samplers.generate(SCHED, fn, rng, SHAPE, options, spec=EPS),
    samplers.dpm_solver_sample(SCHED, fn, x_T, num_steps=5),
  )


def test_config_groups_are_the_options_fields(make_config):
  """config.sampling has one group per method with exactly its options' fields and
  defaults (a nested method's field holds that method's name)."""
  groups = samplers.default_groups()
  assert set(groups) == set(samplers.METHODS)
  for method, cls in samplers.METHODS.items():
    assert set(groups[method]) == {f.name for f in dataclasses.fields(cls)}
    built = samplers.from_config(dict(groups, method=method))
    assert built == cls(), method
  assert groups["pc"]["predictor"] == "ancestral"
  config = make_config()
  for method in samplers.METHODS:
    assert set(config.sampling[method].keys()) == set(groups[method]), method


def test_from_config_resolves_the_predictor_group(make_config):
  config = make_config(
    **{
      "sampling.method": "pc",
      "sampling.pc.predictor": "ddim",
      "sampling.pc.snr": 0.3,
      "sampling.ddim.num_steps": 10,
      "sampling.ddim.skip": "quad",
    }
  )
  options = samplers.from_config(config.sampling)
  assert options == samplers.PCOptions(
    samplers.DDIMOptions(num_steps=10, skip="quad", clip_denoised=False), snr=0.3
  )
  assert [group for group, _ in samplers.nested(options)] == ["ddim", "pc"]
  assert samplers.settings(options) == {
    "method": "pc",
    "predictor.method": "ddim",
    "predictor.num_steps": 10,
    "predictor.eta": 0.0,
    "predictor.skip": "quad",
    "predictor.clip_denoised": False,
    "corrector_steps": 1,
    "snr": 0.3,
  }
  assert options.nfe(T) == 20


def test_generate_refuses_what_is_not_a_samplers_options():
  with pytest.raises(ValueError, match="dict are no sampler's"):
    samplers.generate(SCHED, None, jax.random.key(0), SHAPE, {"method": "ddim"}, spec=EPS)
  with pytest.raises(ValueError, match="method='heun' is unknown"):
    samplers.from_config({"method": "heun"})
