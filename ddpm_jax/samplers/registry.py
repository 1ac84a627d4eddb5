"""The samplers as one family: every method's options class, `generate` (which runs the
method an options object belongs to), and the map between config.sampling and options.

config.sampling holds ``method`` and one group per method named like it, whose fields are
the method's options fields with their defaults (`default_groups`); a field holding another
method's options (the predictor of "pc") is that method's name, and its settings come from
that method's group. Adding a sampler means adding its options class to ``METHODS``.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion
from ddpm_jax.samplers import base
from ddpm_jax.samplers.ancestral import AncestralOptions
from ddpm_jax.samplers.base import ModelFn, ModelSpec, SamplerOptions
from ddpm_jax.samplers.ddim import DDIMOptions
from ddpm_jax.samplers.dpm_solver import DPMSolverOptions
from ddpm_jax.samplers.langevin import AnnealedLangevinOptions, PCOptions

METHODS: dict[str, type] = {
  o.method: o
  for o in (AncestralOptions, DDIMOptions, PCOptions, AnnealedLangevinOptions, DPMSolverOptions)
}


def generate(
  schedule: diffusion.DiffusionSchedule,
  model_fn: ModelFn,
  rng: jax.Array,
  shape: tuple[int, ...],
  options: SamplerOptions,
  *,
  spec: ModelSpec,
) -> jnp.ndarray:
  """Samples x_0 of ``shape`` with the method ``options`` belongs to (checked first)."""
  if type(options) not in METHODS.values():
    raise ValueError(
      f"options of type {type(options).__name__} are no sampler's; allowed: "
      f"{', '.join(o.__name__ for o in METHODS.values())}."
    )
  options.check(schedule.num_timesteps, spec)
  return options.sample(schedule, model_fn, rng, base.check_shape(shape), spec)


def _is_options(value: Any) -> bool:
  return type(value) in METHODS.values()


def default_groups() -> dict[str, dict[str, Any]]:
  """{method: {field: default}} for config.sampling: one group per method."""
  return {
    name: {
      f.name: (lambda v: v.method if _is_options(v) else v)(getattr(cls(), f.name))
      for f in dataclasses.fields(cls)
    }
    for name, cls in METHODS.items()
  }


def from_config(sampling: Mapping[str, Any], method: str | None = None) -> SamplerOptions:
  """The options of config.sampling's method (or of ``method``), from its group."""
  method = sampling["method"] if method is None else method
  base.check_choice("method", method, tuple(METHODS))
  cls, group = METHODS[method], sampling[method]
  kwargs = {}
  for field in dataclasses.fields(cls):
    value = group[field.name]
    allowed = _nested_methods(cls, field)
    if allowed:
      base.check_choice(field.name, value, allowed)
      value = from_config(sampling, value)
    kwargs[field.name] = value
  return cls(**kwargs)


def _nested_methods(cls: type, field: dataclasses.Field) -> tuple[str, ...]:
  """The methods whose options a field of ``cls`` may hold (its type's union members)."""
  hint = typing.get_type_hints(cls)[field.name]
  return tuple(m.method for m in typing.get_args(hint) or (hint,) if m in METHODS.values())


def nested(options: SamplerOptions) -> list[tuple[str, SamplerOptions]]:
  """(config group, options) of ``options`` and every options object held in its fields,
  the innermost first: the order in which a config's sampler is checked."""
  inner = [
    pair
    for field in dataclasses.fields(options)
    if _is_options(value := getattr(options, field.name))
    for pair in nested(value)
  ]
  return inner + [(options.method, options)]


def settings(options: SamplerOptions) -> dict[str, Any]:
  """A flat record of ``options`` for sample files and fid.json: ``method`` and every field;
  a nested method's fields under its field name ("predictor.num_steps")."""
  record: dict[str, Any] = {"method": options.method}
  for field in dataclasses.fields(options):
    value = getattr(options, field.name)
    if _is_options(value):
      record.update({f"{field.name}.{k}": v for k, v in settings(value).items()})
    else:
      record[field.name] = value
  return record
