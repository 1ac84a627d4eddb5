"""ddpm_jax: a JAX/Flax reproduction of Denoising Diffusion Probabilistic Models.

Ho, Jain and Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020
(arXiv:2006.11239). The core (``schedules``, ``diffusion``, ``sampling``) is pure
functions of (schedule, arrays, rng); the network lives in ``models``.
"""

__version__ = "0.2.0"
