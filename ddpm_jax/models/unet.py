"""The noise-prediction U-Net of DDPM (Ho, Jain, Abbeel 2020, §4 and Appendix B), in Flax linen.

The network follows the paper's description (a PixelCNN++-style Wide-ResNet U-Net with
group normalisation, sinusoidal timestep embedding added in every residual block and
single-head self-attention at the 16x16 resolution) with exactly the layout of the official
release, so that parameter counts agree: 35,746,307 for CIFAR-10 (35,749,766 with a learned
variance, ``out_ch=6``) and 113,673,219 for the 256x256 model.

Mixed precision: parameters are always float32; convolutions, dense layers and attention
matmuls run in ``dtype`` (float32 or bfloat16); group-norm statistics, the swish that
follows them, the attention softmax, the timestep sinusoids and the output head run in
float32, and the output is float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTN_IMPLS = ("jax", "explicit")


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
  """variance_scaling(scale, fan_avg, uniform); scale 0 means 1e-10 ("zero" init), as the
  official code."""
  return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


def resolve_dtype(dtype: Any) -> jnp.dtype:
  """Maps "float32"/"bfloat16" (or those jnp dtypes) to a jnp dtype; ValueError otherwise."""
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"Unknown compute dtype {dtype!r}; allowed: {sorted(_DTYPES)}.")
    return jnp.dtype(_DTYPES[dtype])
  try:
    resolved = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"Unknown compute dtype {dtype!r}; allowed: {sorted(_DTYPES)}.") from e
  if resolved not in [jnp.dtype(d) for d in _DTYPES.values()]:
    raise ValueError(f"Unsupported compute dtype {resolved}; allowed: {sorted(_DTYPES)}.")
  return resolved


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal embedding [sin(t w_i), cos(t w_i)], w_i = exp(-log(10000) i / (dim/2 - 1)).

  The Transformer position encoding the paper uses for t (§4, "Diffusion time t is
  specified by adding the Transformer sinusoidal position embedding"), laid out as the
  official code: all sines first, then all cosines. Computed in float32 (large t * w in
  bfloat16 would lose the phase). Returns float32 [B, dim]; an odd dim gets a zero column.
  """
  if dim < 4:
    raise ValueError(f"Timestep embedding width {dim} too small; need dim >= 4.")
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _norm(x: jax.Array, num_groups: int, name: str) -> jax.Array:
  """GroupNorm (eps 1e-6) computed in float32 whatever the compute dtype; returns float32."""
  return nn.GroupNorm(
    num_groups=num_groups,
    epsilon=1e-6,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    use_fast_variance=False,
    name=name,
  )(x.astype(jnp.float32))


def _conv3x3(
  features: int,
  dtype: Any,
  name: str,
  *,
  init_scale: float = 1.0,
  stride: int = 1,
  padding: Any = ((1, 1), (1, 1)),
) -> nn.Conv:
  return nn.Conv(
    features,
    (3, 3),
    strides=(stride, stride),
    padding=padding,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=default_init(init_scale),
    bias_init=nn.initializers.zeros,
    name=name,
  )


def _dense(features: int, dtype: Any, name: str, *, init_scale: float = 1.0) -> nn.Dense:
  """Dense on the channel axis, i.e. also the 1x1 convolution ("NIN") of the official code."""
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=default_init(init_scale),
    bias_init=nn.initializers.zeros,
    name=name,
  )


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """(before, after) padding of TensorFlow's 'SAME' (before = total // 2): (0, 1) for an even
  size, kernel 3, stride 2."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class ResBlock(nn.Module):
  """Residual block: GN-swish-conv3x3, + Dense(swish(temb)), GN-swish-dropout-conv3x3 (zero
  init)."""

  out_ch: int
  num_groups: int
  dropout: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    h = nn.swish(_norm(x, self.num_groups, "norm_0")).astype(self.dtype)
    h = _conv3x3(self.out_ch, self.dtype, "conv_0")(h)
    h = h + _dense(self.out_ch, self.dtype, "temb_proj")(nn.swish(temb))[:, None, None, :]
    h = nn.swish(_norm(h, self.num_groups, "norm_1")).astype(self.dtype)
    h = nn.Dropout(rate=self.dropout, deterministic=not train)(h)
    h = _conv3x3(self.out_ch, self.dtype, "conv_1", init_scale=0.0)(h)
    if x.shape[-1] != self.out_ch:
      x = _dense(self.out_ch, self.dtype, "nin_shortcut")(x)
    return x.astype(self.dtype) + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions: x + proj_out(softmax(q k^T / sqrt(C)) v).

  ``impl="jax"`` uses ``jax.nn.dot_product_attention`` (one head of width C; its softmax is
  float32); ``impl="explicit"`` spells the formula out with einsums and a float32 softmax.
  """

  num_groups: int
  dtype: Any
  impl: str = "jax"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    h = _norm(x, self.num_groups, "norm").astype(self.dtype)
    q = _dense(c, self.dtype, "q")(h).reshape(b, height * width, c)
    k = _dense(c, self.dtype, "k")(h).reshape(b, height * width, c)
    v = _dense(c, self.dtype, "v")(h).reshape(b, height * width, c)
    scale = 1.0 / math.sqrt(c)
    if self.impl == "explicit":
      logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32) * scale
      weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
      h = jnp.einsum("bij,bjc->bic", weights, v)
    else:
      h = jax.nn.dot_product_attention(
        q[:, :, None, :], k[:, :, None, :], v[:, :, None, :], scale=scale
      )[:, :, 0, :]
    h = _dense(c, self.dtype, "proj_out", init_scale=0.0)(h.reshape(b, height, width, c))
    return x.astype(self.dtype) + h


class Downsample(nn.Module):
  """Halves H and W: conv3x3 stride 2 with TF-'SAME' padding, or 2x2 average pooling."""

  with_conv: bool
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if not self.with_conv:
      return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    pads = (tf_same_padding(x.shape[1], 3, 2), tf_same_padding(x.shape[2], 3, 2))
    return _conv3x3(x.shape[-1], self.dtype, "conv", stride=2, padding=pads)(x)


class Upsample(nn.Module):
  """Doubles H and W by nearest-neighbour repetition, then (optionally) a 3x3 conv."""

  with_conv: bool
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, height, 2, width, 2, c))
    x = x.reshape(b, 2 * height, 2 * width, c)
    if self.with_conv:
      x = _conv3x3(c, self.dtype, "conv")(x)
    return x


def validate_image_size(
  image_size: int, ch_mult: Sequence[int], attn_resolutions: Sequence[int]
) -> tuple[int, ...]:
  """Checks the image size fits the U-Net; returns the resolution of every level."""
  factor = 2 ** (len(ch_mult) - 1)
  if image_size <= 0 or image_size % factor:
    raise ValueError(
      f"Image size {image_size} must be a positive multiple of 2**(len(ch_mult)-1)"
      f" = {factor} for ch_mult={tuple(ch_mult)}."
    )
  resolutions = tuple(image_size // 2**i for i in range(len(ch_mult)))
  missing = sorted(set(attn_resolutions) - set(resolutions))
  if missing:
    raise ValueError(
      f"Attention resolutions {missing} match no level; image size {image_size} "
      f"with ch_mult={tuple(ch_mult)} has resolutions {resolutions}."
    )
  return resolutions


class UNet(nn.Module):
  """DDPM U-Net: ``__call__(x [B,H,W,C] float, t [B], *, train) -> [B,H,W,out_ch] float32``.

  Attributes follow the official hyper-parameters (paper App. B): base width ``ch``, width
  multipliers ``ch_mult`` per resolution level, ``num_res_blocks`` per level on the way down
  (one more on the way up), self-attention at ``attn_resolutions``, ``dropout`` inside res
  blocks (active only with ``train=True``, drawing from the 'dropout' rng), strided-conv or
  average-pool down-sampling (``resamp_with_conv``), ``num_groups`` for GroupNorm,
  ``dtype`` the compute dtype, ``remat`` to rematerialise every res block in the backward
  pass, ``attn_impl`` "jax" (jax.nn.dot_product_attention, which may use a fused kernel on
  an accelerator) or "explicit" (the einsum formula; attention alone ran 2x faster on the
  CPU, docs/performance.md). attn_impl does not change the parameters. ``t`` holds the
  0-based timesteps, integer or floating (a continuous-time solver's non-integer t).
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  out_ch: int = 3
  num_groups: int = 32
  dtype: Any = jnp.float32
  remat: bool = False
  attn_impl: str = "jax"

  def __post_init__(self) -> None:
    resolve_dtype(self.dtype)
    if self.ch <= 0 or self.out_ch <= 0 or self.num_groups <= 0:
      raise ValueError(
        f"ch={self.ch}, out_ch={self.out_ch}, num_groups={self.num_groups} must all be positive."
      )
    if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
      raise ValueError(f"ch_mult={tuple(self.ch_mult)} must be a non-empty list of positive ints.")
    if self.num_res_blocks < 1:
      raise ValueError(f"num_res_blocks={self.num_res_blocks} must be >= 1.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout={self.dropout} must lie in [0, 1).")
    if self.ch % self.num_groups:  # Every width is ch * ch_mult[i] (or a sum of those).
      raise ValueError(
        f"ch={self.ch} (all widths are ch * ch_mult = "
        f"{[self.ch * m for m in self.ch_mult]}) is not divisible by "
        f"num_groups={self.num_groups}."
      )
    if self.attn_impl not in ATTN_IMPLS:
      raise ValueError(f"attn_impl={self.attn_impl!r}; allowed: {ATTN_IMPLS}.")
    super().__post_init__()

  def _check_inputs(self, x: jax.Array, t: jax.Array) -> None:
    if x.ndim != 4 or x.shape[1] != x.shape[2]:
      raise ValueError(f"x must be square NHWC [B, S, S, C]; got shape {tuple(x.shape)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"x must be floating point; got dtype {x.dtype}.")
    validate_image_size(x.shape[1], self.ch_mult, self.attn_resolutions)
    if t.shape != (x.shape[0],):
      raise ValueError(f"t must have shape [B] = {(x.shape[0],)}; got {tuple(t.shape)}.")
    if not (jnp.issubdtype(t.dtype, jnp.integer) or jnp.issubdtype(t.dtype, jnp.floating)):
      raise ValueError(
        f"t must be an integer (0-based timesteps) or float (continuous-time "
        f"solvers) array; got dtype {t.dtype}."
      )

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, *, train: bool) -> jax.Array:
    t = jnp.asarray(t)
    self._check_inputs(x, t)
    dtype = resolve_dtype(self.dtype)
    block_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock

    def res_block(h: jax.Array, out_ch: int, name: str) -> jax.Array:
      return block_cls(out_ch, self.num_groups, self.dropout, dtype, name=name)(h, temb, train)

    def attn(h: jax.Array, name: str) -> jax.Array:
      return AttnBlock(self.num_groups, dtype, self.attn_impl, name=name)(h)

    # Timestep embedding: sinusoids (float32), then Dense(4ch)-swish-Dense(4ch).
    temb = timestep_embedding(t, self.ch)
    temb = _dense(4 * self.ch, dtype, "temb_dense_0")(temb)
    temb = _dense(4 * self.ch, dtype, "temb_dense_1")(nn.swish(temb))

    # Down path; hs keeps every feature map the up path concatenates.
    levels = len(self.ch_mult)
    hs = [_conv3x3(self.ch, dtype, "conv_in")(x.astype(dtype))]
    for i in range(levels):
      for j in range(self.num_res_blocks):
        h = res_block(hs[-1], self.ch * self.ch_mult[i], f"down_{i}_block_{j}")
        if h.shape[1] in self.attn_resolutions:
          h = attn(h, f"down_{i}_attn_{j}")
        hs.append(h)
      if i != levels - 1:
        hs.append(Downsample(self.resamp_with_conv, dtype, name=f"down_{i}_downsample")(hs[-1]))

    # Middle: res block, attention, res block.
    h = res_block(hs[-1], hs[-1].shape[-1], "mid_block_0")
    h = attn(h, "mid_attn")
    h = res_block(h, h.shape[-1], "mid_block_1")

    # Up path: num_res_blocks + 1 blocks per level, each on [h, skip] concatenated.
    for i in reversed(range(levels)):
      for j in range(self.num_res_blocks + 1):
        h = res_block(
          jnp.concatenate([h, hs.pop()], axis=-1), self.ch * self.ch_mult[i], f"up_{i}_block_{j}"
        )
        if h.shape[1] in self.attn_resolutions:
          h = attn(h, f"up_{i}_attn_{j}")
      if i != 0:
        h = Upsample(self.resamp_with_conv, dtype, name=f"up_{i}_upsample")(h)

    # Output head in float32: GN-swish-conv3x3 (zero init).
    h = nn.swish(_norm(h, self.num_groups, "norm_out"))
    return _conv3x3(self.out_ch, jnp.float32, "conv_out", init_scale=0.0)(h)


def create_model(
  model_config: Any, *, image_size: int, num_channels: int, out_ch: int | None = None
) -> UNet:
  """Builds the UNet from the ``config.model`` group (configs/default.py) and validates it.

  ``out_ch`` defaults to ``num_channels`` (eps / x0 prediction); use ``2 * num_channels``
  for a learned variance. ``model_config.attn_impl`` is optional (default "jax").
  """
  if num_channels <= 0:
    raise ValueError(f"num_channels={num_channels} must be positive.")
  get = (
    model_config.get
    if hasattr(model_config, "get")
    else (lambda k, d=None: getattr(model_config, k, d))
  )
  model = UNet(
    ch=int(model_config.ch),
    ch_mult=tuple(int(m) for m in model_config.ch_mult),
    num_res_blocks=int(model_config.num_res_blocks),
    attn_resolutions=tuple(int(r) for r in model_config.attn_resolutions),
    dropout=float(model_config.dropout),
    resamp_with_conv=bool(model_config.resamp_with_conv),
    out_ch=int(num_channels if out_ch is None else out_ch),
    num_groups=int(model_config.num_groups),
    dtype=model_config.dtype,
    remat=bool(model_config.remat),
    attn_impl=get("attn_impl", "jax"),
  )
  validate_image_size(image_size, model.ch_mult, model.attn_resolutions)
  return model


def count_params(model: UNet, *, image_size: int, num_channels: int) -> int:
  """Number of parameters, from shapes only (jax.eval_shape: nothing is allocated)."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, num_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  shapes = jax.eval_shape(lambda k, x, t: model.init(k, x, t, train=False), jax.random.key(0), x, t)
  return sum(math.prod(p.shape) for p in jax.tree.leaves(shapes["params"]))
