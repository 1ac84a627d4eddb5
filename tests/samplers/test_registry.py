"""The samplers as one family: generate runs each method in one scan, and config.sampling
maps onto options objects (and back onto the records stored with samples)."""

import dataclasses

import jax
import pytest

from ddpm_jax import samplers
from tests.gaussian import SCHED, SHAPE, T, exact_output_fn

EPS = samplers.ModelSpec()
# Every method at a setting whose levels are T (the scan length checked below).
AT_T_LEVELS = {
    "ancestral": samplers.AncestralOptions(),
    "ddim": samplers.DDIMOptions(num_steps=T),
    "pc": samplers.PCOptions(samplers.DDIMOptions(num_steps=T)),
    "annealed_langevin": samplers.AnnealedLangevinOptions(num_steps=T),
}


def test_every_method_has_a_test_setting():
  assert set(AT_T_LEVELS) == set(samplers.METHODS)


@pytest.mark.parametrize("method", sorted(AT_T_LEVELS))
def test_one_scan_not_unrolled(method):
  jaxpr = jax.make_jaxpr(lambda rng: samplers.generate(
      SCHED, exact_output_fn(0.0, 1.0), rng, SHAPE, AT_T_LEVELS[method],
      spec=EPS))(jax.random.key(0)).jaxpr
  scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
  assert len(scans) == 1 and scans[0].params["length"] == T
  # T unrolled steps would be thousands of equations; annealed Langevin's final denoising
  # step (one network evaluation) sits outside the scan.
  assert len(jaxpr.eqns) < 60


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
  config = make_config(**{"sampling.method": "pc", "sampling.pc.predictor": "ddim",
                          "sampling.pc.snr": 0.3, "sampling.ddim.num_steps": 10,
                          "sampling.ddim.skip": "quad"})
  options = samplers.from_config(config.sampling)
  assert options == samplers.PCOptions(
      samplers.DDIMOptions(num_steps=10, skip="quad", clip_denoised=False), snr=0.3)
  assert [group for group, _ in samplers.nested(options)] == ["ddim", "pc"]
  assert samplers.settings(options) == {
      "method": "pc", "predictor.method": "ddim", "predictor.num_steps": 10,
      "predictor.eta": 0.0, "predictor.skip": "quad", "predictor.clip_denoised": False,
      "corrector_steps": 1, "snr": 0.3}
  assert options.nfe(T) == 20


def test_generate_refuses_what_is_not_a_samplers_options():
  with pytest.raises(ValueError, match="dict are no sampler's"):
    samplers.generate(SCHED, None, jax.random.key(0), SHAPE, {"method": "ddim"}, spec=EPS)
  with pytest.raises(ValueError, match="method='heun' is unknown"):
    samplers.from_config({"method": "heun"})
