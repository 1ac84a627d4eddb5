"""The samplers of ddpm_jax, one family: each method has an options class (its fields and
defaults, written once), a loop of single reverse steps in one lax.scan, and a public
function that takes the options as keywords.

  ancestral_sample     the paper's Algorithm 2 (ancestral.py)
  ddim_sample          DDIM (ddim.py)
  pc_sample            predictor-corrector with a Langevin corrector (langevin.py)
  annealed_langevin_sample  NCSN's annealed Langevin dynamics (langevin.py)
  dpm_solver_sample    multistep DPM-Solver++ of the probability-flow ODE (dpm_solver.py)
  interpolate, slerp   latent-space interpolation (interpolation.py)

`generate(schedule, model_fn, rng, shape, options, spec=spec)` runs the method of an options
object; `from_config` builds the options of config.sampling (registry.py). Everything is a
pure function of (schedule, model_fn, rng, shape): jit, pmap and vmap compose over it.
``model_fn(x_t, t) -> model_output`` is any callable; t is 0-based int32 [B] (t=0 is the
paper's t=1).
"""

from ddpm_jax.samplers.ancestral import AncestralOptions, ancestral_sample, ancestral_step
from ddpm_jax.samplers.base import ModelFn, ModelSpec, SamplerOptions, to_uint8
from ddpm_jax.samplers.ddim import DDIM_SKIPS, DDIMOptions, ddim_sample, ddim_step, ddim_timesteps
from ddpm_jax.samplers.dpm_solver import DPMSolverOptions, dpm_solver_sample
from ddpm_jax.samplers.interpolation import interpolate, slerp
from ddpm_jax.samplers.langevin import (
  AnnealedLangevinOptions,
  PCOptions,
  annealed_langevin_sample,
  langevin_corrector_step,
  pc_sample,
)
from ddpm_jax.samplers.registry import (
  METHODS,
  default_groups,
  from_config,
  generate,
  nested,
  settings,
)

__all__ = [
  "DDIM_SKIPS",
  "METHODS",
  "AncestralOptions",
  "AnnealedLangevinOptions",
  "DDIMOptions",
  "DPMSolverOptions",
  "ModelFn",
  "ModelSpec",
  "PCOptions",
  "SamplerOptions",
  "ancestral_sample",
  "ancestral_step",
  "annealed_langevin_sample",
  "ddim_sample",
  "ddim_step",
  "ddim_timesteps",
  "default_groups",
  "dpm_solver_sample",
  "from_config",
  "generate",
  "interpolate",
  "langevin_corrector_step",
  "nested",
  "pc_sample",
  "settings",
  "slerp",
  "to_uint8",
]
