"""PyTorch (diffusers UNet2DModel) reference of ddpm_jax's model, train step and DDIM sampler.

Reads the same ``--config`` file and ``--config.<group>.<field>`` overrides as main.py and
bench/bench_train.py, and maps ``config.model`` onto diffusers' UNet2DModel so that both
sides build the same network (for configs/cifar10.py: the google/ddpm-cifar10-32 layout,
35,746,307 parameters, the count of ddpm_jax's U-Net). The train step is the paper's
Algorithm 1 with config.training's recipe: t ~ U{0..T-1}, eps ~ N(0, I), MSE between eps
and the network's output (L_simple), Adam with linear learning-rate warm-up, clipping at
global norm (as optax.clip_by_global_norm), and an EMA of the weights. float32 throughout.

Modes:

  # Parameter count of the layout (no training):
  python -m reference_torch.torch_reference --mode=params --config=configs/cifar10.py

  # Median time of --steps train steps after --warmup steps, on a synthetic batch; one JSON line:
  python -m reference_torch.torch_reference --mode=bench --config=configs/cifar10.py \
      --config.training.batch_size=8 --steps=5 --warmup=1

  # Train on exactly the batches of ddpm_jax's input pipeline for (training.seed, step), then
  # sample config.sampling.num_samples images with DDIM from the EMA weights; writes
  # <workdir>/samples.npz (uint8 [N, H, W, C]) and prints one JSON line:
  python -m reference_torch.torch_reference --mode=train_sample --workdir=/tmp/torch_fm \
      --config=configs/fashion_mnist.py --config.data.random_flip=False \
      --config.training.num_train_steps=30 --config.sampling.method=ddim \
      --config.sampling.ddim.num_steps=100 --config.sampling.num_samples=64

  # The same, but from ddpm_jax's initial parameters and with ddpm_jax's t, noise and x_T
  # (reference_torch/jax_to_torch.py): only the implementations differ.
  python -m reference_torch.torch_reference --mode=train_sample --draws=ddpm_jax ...

  # One set of ddpm_jax parameters in both networks: max differences of the outputs, the
  # L_simple gradient and --ddim_batch DDIM samples from one x_T; one JSON line:
  python -m reference_torch.torch_reference --mode=equivalence --jax_workdir=/tmp/fashion_mnist \
      --config=configs/fashion_mnist.py --config.sampling.method=ddim

With the default --draws=own only the data of train_sample comes from ddpm_jax
(``ddpm_jax_train_batches``); everything else is PyTorch. Nothing is asserted about time.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from absl import app, flags, logging
from ml_collections import config_flags

from bench import common
from reference_torch.torch_sampling import alphas_cumprod, ddim_own, generate

MODES = ("params", "bench", "train_sample", "equivalence")
DRAWS = ("own", "ddpm_jax")
SAMPLERS = ("own", "diffusers")
INITS = ("ddpm", "torch")
ADAM_IMPLS = ("default", "foreach", "fused")

config_flags.DEFINE_config_file("config", None, "ddpm_jax config file.", lock_config=True)
flags.DEFINE_enum("mode", "bench", MODES, "What to run.")
flags.DEFINE_string("workdir", "", "train_sample: folder for samples.npz (created).")
flags.DEFINE_integer("steps", 5, "bench: timed train steps (the median is reported).")
flags.DEFINE_integer("warmup", 1, "bench: untimed train steps first.")
flags.DEFINE_integer("threads", 2, "torch.set_num_threads.")
flags.DEFINE_enum(
  "sampler",
  "own",
  SAMPLERS,
  "own: this file's DDIM (the grid and formulas of ddpm_jax.samplers.ddim); "
  "diffusers: DDIMScheduler with the same grid, for reference.",
)
flags.DEFINE_enum(
  "init",
  "ddpm",
  INITS,
  "ddpm: ddpm_jax's initialisation (variance_scaling fan_avg uniform, zero "
  "biases, ~0 on the last conv of each res block, attention output and "
  "conv_out); torch: PyTorch/diffusers defaults.",
)
flags.DEFINE_enum(
  "draws",
  "own",
  DRAWS,
  "train_sample: own: torch's init (--init), t, noise and x_T from torch "
  "generators; ddpm_jax: main.py's initial parameters, t, noise, flips and "
  "x_T for the same seeds (reference_torch/jax_to_torch.py), so only the "
  "implementations differ.",
)
flags.DEFINE_string(
  "jax_workdir",
  "",
  "equivalence: ddpm_jax workdir whose EMA parameters "
  "(sampling.checkpoint_step) both networks load; empty: the initial ones.",
)
flags.DEFINE_integer("ddim_batch", 16, "equivalence: DDIM samples compared.")
flags.DEFINE_enum("adam_impl", "default", ADAM_IMPLS, "torch.optim.Adam implementation.")
flags.DEFINE_integer(
  "log_every", 50, "train_sample: progress line on stderr every this many steps."
)
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------- the layout


def unet_kwargs(config: Any) -> dict[str, Any]:
  """UNet2DModel arguments equivalent to config.model / config.data (ddpm_jax's U-Net):
  ddpm_jax.pretrained_names.diffusers_config, the config ddpm_jax exports with. This
  trainer does not train a learned variance (2C outputs)."""
  from ddpm_jax import pretrained_names

  if config.diffusion.model_var_type in ("learned", "learned_range"):
    raise ValueError("a learned variance (2C outputs) is not mapped; use fixedlarge/fixedsmall.")
  return pretrained_names.diffusers_config(config)


def ddpm_init_(model: torch.nn.Module) -> None:
  """ddpm_jax's initialisation: Xavier-uniform kernels (= variance_scaling(1, fan_avg,
  uniform)), zero biases, and scale 1e-10 on the layers ddpm_jax zero-initialises."""

  def near_zero(name):
    return name == "conv_out" or name.endswith((".conv2", ".to_out.0"))

  for name, module in model.named_modules():
    if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
      torch.nn.init.xavier_uniform_(module.weight, gain=1e-5 if near_zero(name) else 1.0)
      if module.bias is not None:
        torch.nn.init.zeros_(module.bias)


def build_model(config: Any, init: str) -> torch.nn.Module:
  from diffusers import UNet2DModel

  model = UNet2DModel(**unet_kwargs(config))
  if init == "ddpm":
    ddpm_init_(model)
  return model


def num_params(model: torch.nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- the recipe


@dataclasses.dataclass
class Recipe:
  """config.training's optimisation recipe, plus the EMA schedule (a torch-side option)."""

  learning_rate: float
  warmup_steps: int
  grad_clip: float
  betas: tuple[float, float]
  adam_eps: float
  ema_decay: float
  ema_schedule: str

  @classmethod
  def from_config(cls, training: Any) -> Recipe:
    """training.ema_warmup picks the EMA schedule, as in ddpm_jax."""
    return cls(
      float(training.learning_rate),
      int(training.warmup_steps),
      float(training.grad_clip),
      (float(training.adam_b1), float(training.adam_b2)),
      float(training.adam_eps),
      float(training.ema_decay),
      "warmup" if training.ema_warmup else "constant",
    )

  def lr(self, step: int) -> float:
    """lr * min(step / warmup, 1): step 0 has lr 0, as ddpm_jax's schedule."""
    if self.warmup_steps == 0:
      return self.learning_rate
    return self.learning_rate * min(step / self.warmup_steps, 1.0)

  def ema(self, step: int) -> float:
    if self.ema_schedule == "warmup":
      return min(self.ema_decay, (1.0 + step) / (10.0 + step))
    return self.ema_decay


class Trainer:
  """The train step: L_simple, clipping at global norm, Adam, EMA (a copy of the model).

  t, the noise and the optional random flips come from one torch.Generator seeded with
  training.seed (the same distribution as ddpm_jax's draws, not the same numbers), or,
  given ``draws`` (step -> (t, noise, flips), jax_to_torch.StepDraws), are ddpm_jax's.
  """

  def __init__(
    self,
    model: torch.nn.Module,
    recipe: Recipe,
    abar: torch.Tensor,
    adam_impl: str,
    seed: int,
    random_flip: bool,
    draws: Callable[[int], tuple[torch.Tensor, ...]] | None = None,
  ) -> None:
    self.model, self.recipe, self.random_flip = model.train(), recipe, random_flip
    self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    self.sqrt_abar = abar.sqrt().float()
    self.sqrt_1m_abar = (1.0 - abar).sqrt().float()
    self.params = [p for p in model.parameters() if p.requires_grad]
    impl = {} if adam_impl == "default" else {adam_impl: True}
    self.optimizer = torch.optim.Adam(
      self.params, lr=recipe.lr(0), betas=recipe.betas, eps=recipe.adam_eps, **impl
    )
    self.generator = torch.Generator().manual_seed(seed)
    self.draws = draws
    self.step_count = 0

  def loss(self, x0: torch.Tensor) -> torch.Tensor:
    if self.draws is not None:
      t, noise, flips = self.draws(self.step_count)
    else:  # Flips first (only if on), then t, then the noise.
      flips = torch.rand(x0.shape[0], generator=self.generator) < 0.5 if self.random_flip else None
      t = torch.randint(0, self.sqrt_abar.shape[0], (x0.shape[0],), generator=self.generator)
      noise = torch.randn(x0.shape, generator=self.generator)
    if self.random_flip:  # p = 1/2 per example.
      x0 = torch.where(flips.view(-1, 1, 1, 1), x0.flip(-1), x0)
    x_t = self.sqrt_abar[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1m_abar[t].view(-1, 1, 1, 1) * noise
    return F.mse_loss(self.model(x_t, t).sample, noise)

  def clip_(self) -> torch.Tensor:
    """g <- g * min(1, clip / ||g||): optax.clip_by_global_norm. Returns ||g|| before."""
    grads = [p.grad for p in self.params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = torch.clamp(self.recipe.grad_clip / norm, max=1.0)
    for g in grads:
      g.mul_(scale)
    return norm

  @torch.no_grad()
  def update_ema_(self) -> None:
    weight = 1.0 - self.recipe.ema(self.step_count)
    for ema, param in zip(self.ema_model.parameters(), self.model.parameters(), strict=True):
      ema.lerp_(param, weight)

  def step(self, x0: torch.Tensor) -> tuple[float, float]:
    """One train step on x0 [B, C, H, W] in [-1, 1]; returns (loss, grad norm)."""
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.loss(x0)
    loss.backward()
    norm = self.clip_()
    for group in self.optimizer.param_groups:
      group["lr"] = self.recipe.lr(self.step_count)
    self.optimizer.step()
    self.update_ema_()
    self.step_count += 1
    return float(loss.detach()), float(norm)


# ----------------------------------------------------------------------------- ddpm_jax adapter


def ddpm_jax_train_batches(config: Any) -> Iterator[np.ndarray]:
  """Adapter (ddpm_jax.input_pipeline): the uint8 [B, H, W, C] batches of steps 0, 1, ...
  that main.py trains on for (training.seed, step), device axis flattened (unflipped: main.py
  flips them on the device when data.random_flip is set)."""
  from ddpm_jax import input_pipeline

  batches = input_pipeline.create_train_iterator(
    config.data,
    global_batch_size=int(config.training.batch_size),
    seed=int(config.training.seed),
    start_step=0,
  )
  for batch in batches:
    yield batch.reshape((-1,) + batch.shape[2:])


def to_model_input(images: np.ndarray) -> torch.Tensor:
  """uint8 [B, H, W, C] -> float32 [B, C, H, W], x / 127.5 - 1."""
  return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------- modes


def environment() -> dict[str, Any]:
  """The torch side's versions and threads, the host (bench.common.machine) and memory."""
  import diffusers

  return {
    "torch": torch.__version__,
    "diffusers": diffusers.__version__,
    "torch_threads": torch.get_num_threads(),
    "torch_interop_threads": torch.get_num_interop_threads(),
    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    **common.machine(),
    **common.memory_report(),
  }


def run_params(config: Any) -> None:
  model = build_model(config, FLAGS.init)
  common.emit(
    {
      "bench": "torch_params",
      "num_params": num_params(model),
      "unet2d_kwargs": unet_kwargs(config),
      **environment(),
    }
  )


def run_bench(config: Any) -> None:
  """Median train-step time on one synthetic batch (uint8 noise scaled to [-1, 1])."""
  model = build_model(config, FLAGS.init)
  trainer = Trainer(
    model,
    Recipe.from_config(config.training),
    alphas_cumprod(config.diffusion),
    FLAGS.adam_impl,
    int(config.training.seed),
    bool(config.data.random_flip),
  )
  size, channels = int(config.data.image_size), int(config.data.num_channels)
  batch = int(config.training.batch_size)
  images = np.random.default_rng(0).integers(0, 256, (batch, size, size, channels), np.uint8)
  x0 = to_model_input(images)
  for _ in range(FLAGS.warmup):
    trainer.step(x0)
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    trainer.step(x0)
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  common.emit(
    {
      "bench": "torch_train_step",
      "global_batch": batch,
      "num_params": num_params(model),
      "step_s": step_s,
      "steps_per_s": 1.0 / step_s,
      "images_per_s": batch / step_s,
      "step_s_min": min(times),
      "step_s_max": max(times),
      "timed_calls": FLAGS.steps,
      "warmup_calls": FLAGS.warmup,
      "dropout": float(config.model.dropout),
      "num_groups": int(config.model.num_groups),
      "adam_impl": FLAGS.adam_impl,
      "step_includes": "forward, MSE, backward, global-norm clip, Adam, EMA",
      **environment(),
    }
  )


def run_train_sample(config: Any) -> None:
  if not FLAGS.workdir:
    raise app.UsageError("--mode=train_sample needs --workdir.")
  started = time.perf_counter()
  draws = x_init = None
  if FLAGS.draws == "ddpm_jax":
    import jax

    from reference_torch import jax_to_torch

    model = build_model(config, "torch")
    jax_to_torch.load_into_torch(model, jax_to_torch.initial_params(config), config)
    draws = jax_to_torch.StepDraws(config)

    def x_init(i):
      return jax_to_torch.sample_init(config, i, jax.device_count())
  else:
    model = build_model(config, FLAGS.init)
  trainer = Trainer(
    model,
    Recipe.from_config(config.training),
    alphas_cumprod(config.diffusion),
    FLAGS.adam_impl,
    int(config.training.seed),
    bool(config.data.random_flip),
    draws,
  )
  num_steps = int(config.training.num_train_steps)
  batches = ddpm_jax_train_batches(config)
  losses = []
  train_start = time.perf_counter()
  for step in range(num_steps):
    loss, norm = trainer.step(to_model_input(next(batches)))
    losses.append(loss)
    if (step + 1) % FLAGS.log_every == 0 or step + 1 == num_steps:
      rate = (step + 1) / (time.perf_counter() - train_start)
      logging.info(
        "step %d/%d loss %.4f grad_norm %.3f (%.2f steps/s)", step + 1, num_steps, loss, norm, rate
      )
  train_s = time.perf_counter() - train_start
  sample_start = time.perf_counter()
  samples = generate(trainer.ema_model, config, FLAGS.sampler, x_init)
  sample_s = time.perf_counter() - sample_start
  os.makedirs(FLAGS.workdir, exist_ok=True)
  path = os.path.join(FLAGS.workdir, "samples.npz")
  np.savez(path, samples=samples)
  tail = losses[-min(50, len(losses)) :]
  common.emit(
    {
      "side": "torch",
      "steps": num_steps,
      "samples_path": path,
      "num_samples": int(samples.shape[0]),
      "num_params": num_params(model),
      "final_loss_mean_last_50": float(np.mean(tail)),
      "train_s": train_s,
      "sample_s": sample_s,
      "process_s": time.perf_counter() - started,
      "ema_schedule": Recipe.from_config(config.training).ema_schedule,
      "sampler": FLAGS.sampler,
      "adam_impl": FLAGS.adam_impl,
      "draws": FLAGS.draws,
      "init": "ddpm_jax's parameters" if FLAGS.draws == "ddpm_jax" else FLAGS.init,
      **environment(),
    }
  )


def run_equivalence(config: Any) -> None:
  """One set of ddpm_jax parameters in both networks: outputs, loss, gradient and DDIM
  samples compared (jax_to_torch.equivalence); one JSON line."""
  from reference_torch import jax_to_torch

  if FLAGS.jax_workdir:
    from ddpm_jax import checkpointing

    params, step = checkpointing.restore_ema_params(
      config, FLAGS.jax_workdir, int(config.sampling.checkpoint_step)
    )
    source = f"EMA parameters of {FLAGS.jax_workdir} at step {step}"
  else:
    params, source = jax_to_torch.initial_params(config), "initial parameters"
  smp, abar = config.sampling, alphas_cumprod(config.diffusion)
  model = build_model(config, "torch")

  def ddim(x):
    return ddim_own(model, x, abar, int(smp.ddim.num_steps), 0.0, False, torch.Generator())

  result = jax_to_torch.equivalence(
    config, model, params, next(ddpm_jax_train_batches(config)), FLAGS.ddim_batch, ddim
  )
  common.emit(
    {
      "bench": "torch_equivalence",
      "params": source,
      "num_params": num_params(model),
      "ddim_steps": int(smp.ddim.num_steps),
      **result,
      **environment(),
    }
  )


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.steps < 1 or FLAGS.warmup < 0:
    raise app.UsageError(f"--steps={FLAGS.steps} must be >= 1 and --warmup={FLAGS.warmup} >= 0.")
  torch.set_num_threads(FLAGS.threads)
  torch.manual_seed(int(FLAGS.config.training.seed))  # The default init draws from it.
  {
    "params": run_params,
    "bench": run_bench,
    "train_sample": run_train_sample,
    "equivalence": run_equivalence,
  }[FLAGS.mode](FLAGS.config)


if __name__ == "__main__":
  app.run(main)
