"""ddpm_jax: a JAX/Flax reproduction of Denoising Diffusion Probabilistic Models.

Ho, Jain and Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020
(arXiv:2006.11239). The core (``schedules``, ``diffusion``, ``samplers``) is pure
functions of (schedule, arrays, rng); the network lives in ``models``.
"""

__version__ = "0.3.0"
