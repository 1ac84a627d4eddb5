"""Shared base config: the paper's CIFAR-10 recipe (Ho et al. 2020, App. B).

Every other config starts from `get_config()` here and overrides what differs. Every
field is overridable on the command line, e.g. `--config.training.batch_size=64`.
"""

import ml_collections

from ddpm_jax import samplers


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Data: what is read and how it is shaped.
  config.data = data = ml_collections.ConfigDict()
  data.dataset = "cifar10"  # tfds name, or "fashion_mnist_files" / "synthetic".
  data.data_dir = ""  # tfds data_dir, or the folder of local files ("" = default).
  data.train_split = "train"
  data.eval_split = "test"
  data.image_size = 32
  data.num_channels = 3
  data.random_flip = True
  data.shuffle_buffer = 50_000  # tfds path only.

  # Model: the U-Net of the official code (paper App. B).
  config.model = model = ml_collections.ConfigDict()
  model.ch = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.dropout = 0.1
  model.resamp_with_conv = True
  model.num_groups = 32
  model.dtype = "float32"  # Compute dtype: "float32" or "bfloat16".
  model.remat = False  # jax.checkpoint each res block.
  model.attn_impl = "jax"  # "jax" (jax.nn.dot_product_attention) or "explicit" (einsums).

  # Diffusion process and objective (paper §2-3).
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.beta_schedule = "linear"
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.num_timesteps = 1000
  diffusion.model_mean_type = "eps"
  diffusion.model_var_type = "fixedlarge"
  diffusion.loss_type = "mse"

  # Optimisation and bookkeeping.
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # GLOBAL batch, split over all devices of all hosts.
  training.num_train_steps = 800_000
  training.learning_rate = 2e-4
  training.warmup_steps = 5000
  training.grad_clip = 1.0
  # Which gradient is clipped at grad_clip (docs/training.md). "per_replica": the global
  # batch is split into clip_replicas replicas; each replica's gradient is clipped, then
  # they are averaged, as the official TPU v3-8 run (CrossShardOptimizer: each of 8 replicas
  # clips the gradient of loss / 8 at grad_clip / 8 before the cross-replica sum), on any
  # device count that divides or is a multiple of clip_replicas. "global": the mean is
  # clipped once (one device's semantics). "per_device": per_replica with one per device.
  training.clip_mode = "per_replica"
  training.clip_replicas = 8  # 0: one replica per device.
  # per_replica with several replicas per device: "vmap" computes them at once (the
  # activation memory of the device batch, as "global"), "scan" one after another (that
  # of one replica; on XLA:CPU 5x slower than vmap, docs/training.md).
  training.replica_loop = "vmap"
  training.adam_b1 = 0.9
  training.adam_b2 = 0.999
  training.adam_eps = 1e-8
  training.ema_decay = 0.9999
  # Warm the decay up as min(ema_decay, (1 + step) / (10 + step)) (tf.train.
  # ExponentialMovingAverage with num_updates, diffusers' EMAModel; improved-diffusion keeps
  # a constant rate);
  # off for the paper's long runs (the official code's constant decay), on for short ones.
  training.ema_warmup = False
  training.seed = 0
  training.log_every_steps = 100
  training.checkpoint_every_steps = 10_000
  training.keep_checkpoints = 3
  # Also keep every checkpoint whose step is a multiple of this, for good (0: none): the
  # checkpoints a minimum-FID sweep scores (--mode=eval with eval.checkpoint_steps).
  training.keep_every_steps = 0
  training.sample_every_steps = 50_000
  training.num_grid_samples = 64
  # Train steps per pmapped call (a lax.scan over k stacked batches): one dispatch and host
  # round trip per k steps. Log/checkpoint/sample intervals must be multiples of it.
  training.steps_per_call = 1
  # A step whose loss or gradients are inf/NaN never changes the state (nor reaches a
  # checkpoint). "raise": stop with an error naming the step at the next log or checkpoint
  # step; "skip": go on without that update, counting it (TrainState.nonfinite_steps).
  training.nonfinite = "raise"
  # Per-device peak TFLOP/s for the MFU scalar (0: the known peak of the device, if any).
  training.peak_tflops = 0.0
  # A jax.profiler trace of steps profile_start_step+1 .. +profile_num_steps into
  # workdir/profile (TensorBoard's profile plugin); profile_num_steps=0 turns it off.
  training.profile_start_step = 100
  training.profile_num_steps = 0

  # Sampling (--mode=sample, the grids written during training and the FID samples).
  config.sampling = sampling = ml_collections.ConfigDict()
  # "ancestral" (Algorithm 2), "ddim", "pc" (predictor-corrector, Song et al. 2021),
  # "annealed_langevin" (Song & Ermon 2019 on the DDPM noise levels) or "dpm_solver"
  # (multistep DPM-Solver++, Lu et al. 2022); docs/sampling.md.
  sampling.method = "ancestral"
  # One group per method, named like it, e.g. --config.sampling.ddim.num_steps=50: its
  # fields and defaults are those of the method's options class in ddpm_jax/samplers/
  # (listed in docs/sampling.md); "pc" takes its predictor's settings from that group.
  sampling.update(samplers.default_groups())
  # DDIM as its reference code: eps used as predicted, x_0 not clipped (the published
  # FIDs); the library default clips x_0 to [-1, 1].
  sampling.ddim.clip_denoised = False
  sampling.num_samples = 50_000
  sampling.batch_size = 256  # GLOBAL batch per sampler call.
  sampling.checkpoint_step = -1  # -1: the latest checkpoint.
  sampling.seed = 0
  sampling.tag = ""  # Written to samples/step_<k>_<tag>/ when set (e.g. "ancestral").

  # Evaluation (--mode=eval).
  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.num_examples = 10_000  # Test images for bits/dim (-1: the whole split).
  evaluation.batch_size = 128  # GLOBAL batch for bits/dim.
  evaluation.feature_network = "inception"  # "inception" or "classifier".
  evaluation.inception_weights = ""  # Path of converted Inception weights (.npz).
  # How uint8 images reach the Inception input: "tf" (the 2015-12-05 graph's own legacy
  # ResizeBilinear to 299x299, then (x - 128) / 128: the paper's TTUR / OpenAI numbers) or
  # "pytorch_fid" (half-pixel bilinear resize, x / 127.5 - 1).
  evaluation.inception_preprocess = "tf"
  evaluation.fid_num_samples = 50_000
  evaluation.fid_reference_split = "train"
  # The FID reference is the first this many images of fid_reference_split in stored order
  # (-1: all of it; CIFAR-10: the 50,000 training images of Table 1).
  evaluation.fid_reference_num_examples = -1
  # FID over training (the paper reports the minimum over checkpoints): "" off, "all", or
  # comma-separated steps, e.g. "100000,200000". Needs fid_num_samples > 0.
  evaluation.checkpoint_steps = ""
  # The "classifier" feature network: a small CNN trained once on data.train_split.
  evaluation.classifier_steps = 2000
  evaluation.classifier_batch_size = 128
  evaluation.classifier_learning_rate = 2e-3
  evaluation.classifier_width = 16
  evaluation.classifier_feature_dim = 128
  evaluation.classifier_seed = 0
  evaluation.seed = 0

  config.multihost = False  # Call jax.distributed.initialize() (Cloud TPU pods).
  # Pods: a host whose heartbeats stop this long counts as dead, and the others stop with
  # exit status 75 (docs/reliability.md). JAX's own default is 100.
  config.heartbeat_timeout_seconds = 60
  return config
