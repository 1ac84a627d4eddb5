"""Tests of the DDPM U-Net (ddpm_jax/models/unet.py).

Expectations are derived independently: parameter counts are the paper code's published
numbers, block outputs are recomputed with plain float64 NumPy from the same parameters,
shapes of the CIFAR-10 tree are worked out by hand from the skip-connection bookkeeping.

Random inits use the 'rbg' PRNG: with the default (partitionable threefry) key the XLA:CPU
compile of a full ``model.init`` is ~3x slower, and these tests only need *some* init.
"""

import math

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default as default_config
from ddpm_jax.models import unet as unet_lib

TINY = dict(
  ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=8, dropout=0.1
)
SIZE = 8
# bfloat16 compute vs float32 on the same (perturbed, O(1)-output) parameters: relative L2
# error of the output. bfloat16 has an 8-bit mantissa (rel. rounding 2**-9 ~ 0.2%) and the
# error accumulates over ~20 layers; we measure ~1% on TINY and allow 3%.
BF16_REL_TOL = 0.03


def _key(seed: int) -> jax.Array:
  return jax.random.key(seed, impl="rbg")


def _init(model: unet_lib.UNet, size: int, channels: int = 3) -> dict:
  x = jnp.zeros((1, size, size, channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  return jax.jit(lambda k: model.init(k, x, t, train=False))(_key(0))["params"]


def _perturb(params: dict, scale: float = 0.1, seed: int = 7) -> dict:
  """Adds N(0, scale^2) noise everywhere so that zero-initialised layers become active."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
    [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
  )


def _loss_and_grad_fn(model):
  """jit(params, x, t, target, dropout_key) -> ((mse, output), grads), train mode."""

  def loss(params, x, t, target, key):
    out = model.apply({"params": params}, x, t, train=True, rngs={"dropout": key})
    return jnp.mean((out - target) ** 2), out

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def tiny():
  """The TINY model, its params (init and perturbed), a batch and the compiled functions
  (eval forward, train-mode loss and gradient) that most tests share to save compiles."""
  model = unet_lib.UNet(**TINY)
  params = _init(model, SIZE)
  x = jax.random.normal(jax.random.key(1), (4, SIZE, SIZE, 3))
  t = jnp.array([0, 3, 700, 999], jnp.int32)
  return dict(
    model=model,
    params=params,
    pparams=_perturb(params),
    x=x,
    t=t,
    evaluate=_apply_fn(model),
    loss_and_grad=_loss_and_grad_fn(model),
  )


def _apply_fn(model, train=False):
  """jit(params, x, t, dropout_key) -> output."""

  def f(params, x, t, key):
    rngs = {"dropout": key} if train else {}
    return model.apply({"params": params}, x, t, train=train, rngs=rngs)

  return jax.jit(f)


# --- NumPy float64 references ------------------------------------------------------------


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _np_group_norm(x, p, groups, eps=1e-6):
  b, h, w, c = x.shape
  xg = x.reshape(b, h, w, groups, c // groups)
  mean = xg.mean(axis=(1, 2, 4), keepdims=True)
  var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * p["scale"] + p["bias"]


def _np_swish(x):
  return x / (1.0 + np.exp(-x))


def _np_conv3x3(x, p, stride=1, pads=((1, 1), (1, 1))):
  xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  ho = (xp.shape[1] - 3) // stride + 1
  wo = (xp.shape[2] - 3) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, p["kernel"].shape[-1]))
  for a in range(3):
    for b in range(3):
      patch = xp[:, a : a + stride * (ho - 1) + 1 : stride, b : b + stride * (wo - 1) + 1 : stride]
      out += patch @ p["kernel"][a, b]
  return out + p["bias"]


def _np_dense(x, p):
  return x @ p["kernel"] + p["bias"]


# --- Parameter counts and tree -----------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_shapes():
  model = unet_lib.create_model(default_config.get_config().model, image_size=32, num_channels=3)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  return jax.eval_shape(lambda k, x, t: model.init(k, x, t, train=False), jax.random.key(0), x, t)[
    "params"
  ]


@pytest.mark.parametrize(
  "image_size,ch_mult,out_ch,expected",
  [
    (32, (1, 2, 2, 2), 3, 35_746_307),
    (32, (1, 2, 2, 2), 6, 35_749_766),
    (256, (1, 1, 2, 2, 4, 4), 3, 113_673_219),
  ],
)
def test_param_counts_match_paper_code(image_size, ch_mult, out_ch, expected):
  config = default_config.get_config().model
  config.ch_mult = ch_mult
  model = unet_lib.create_model(config, image_size=image_size, num_channels=3, out_ch=out_ch)
  assert unet_lib.count_params(model, image_size=image_size, num_channels=3) == expected


def test_cifar_param_tree(cifar_shapes):
  shapes = jax.tree.map(lambda s: s.shape, cifar_shapes)
  attn = {
    "down_1_attn_0",
    "down_1_attn_1",
    "mid_attn",
    "up_1_attn_0",
    "up_1_attn_1",
    "up_1_attn_2",
  }  # Level 1 is 16x16.
  down = {f"down_{i}_block_{j}" for i in range(4) for j in range(2)}
  up = {f"up_{i}_block_{j}" for i in range(4) for j in range(3)}
  resample = {f"down_{i}_downsample" for i in range(3)} | {f"up_{i}_upsample" for i in (1, 2, 3)}
  assert set(shapes) == (
    attn
    | down
    | up
    | resample
    | {"mid_block_0", "mid_block_1"}
    | {"temb_dense_0", "temb_dense_1", "conv_in", "norm_out", "conv_out"}
  )
  for name in attn:
    assert set(shapes[name]) == {"norm", "q", "k", "v", "proj_out"}
  # A 1x1 shortcut exactly where channels change: 128 -> 256 entering level 1, and every
  # up block (its input is [h, skip] concatenated).
  with_shortcut = {
    n for n in down | up | {"mid_block_0", "mid_block_1"} if "nin_shortcut" in shapes[n]
  }
  assert with_shortcut == {"down_1_block_0"} | up
  # Input widths of the up path from the skip stack [conv_in 128, (128, 128, ds 128),
  # (256, 256, ds 256), (256, 256, ds 256), (256, 256)] popped in reverse.
  up_in = {3: (512, 512, 512), 2: (512, 512, 512), 1: (512, 512, 384), 0: (384, 256, 256)}
  for i, widths in up_in.items():
    out = 128 * (1, 2, 2, 2)[i]
    for j, width in enumerate(widths):
      assert shapes[f"up_{i}_block_{j}"]["nin_shortcut"]["kernel"] == (width, out)
      assert shapes[f"up_{i}_block_{j}"]["conv_0"]["kernel"] == (3, 3, width, out)
  assert shapes["down_1_block_0"]["nin_shortcut"]["kernel"] == (128, 256)
  assert shapes["temb_dense_0"]["kernel"] == (128, 512)
  assert shapes["temb_dense_1"]["kernel"] == (512, 512)
  assert shapes["down_0_block_0"]["temb_proj"]["kernel"] == (512, 128)
  assert shapes["conv_in"]["kernel"] == (3, 3, 3, 128)
  assert shapes["conv_out"]["kernel"] == (3, 3, 128, 3)
  assert shapes["down_2_downsample"]["conv"]["kernel"] == (3, 3, 256, 256)
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(cifar_shapes))


# --- Init, shapes, dtypes ----------------------------------------------------------------


@pytest.mark.slow
def test_init_distribution_and_zero_init(tiny):
  p = tiny["params"]
  # variance_scaling(1, fan_avg, uniform): Var = 1 / fan_avg, |w| <= sqrt(3 / fan_avg).
  k = np.asarray(p["down_1_block_0"]["conv_0"]["kernel"])  # (3, 3, 16, 32)
  fan_avg = (9 * 16 + 9 * 32) / 2
  assert abs(k.var() * fan_avg - 1.0) < 0.1
  assert np.abs(k).max() <= math.sqrt(3 / fan_avg)
  for path, leaf in jax.tree_util.tree_leaves_with_path(p):
    name = jax.tree_util.keystr(path)
    if name.endswith("['bias']") and "norm" not in name:
      assert not np.any(np.asarray(leaf)), name
    if "conv_1" in name or "proj_out" in name or "conv_out" in name:
      assert np.abs(np.asarray(leaf)).max() < 1e-4, name  # "Zero" init: scale 1e-10.


def test_output_near_zero_at_init(tiny):
  out = tiny["evaluate"](tiny["params"], tiny["x"], tiny["t"], None)
  chex.assert_shape(out, (4, SIZE, SIZE, 3))
  chex.assert_type(out, jnp.float32)
  assert float(jnp.abs(out).max()) < 1e-3


@pytest.mark.parametrize(
  "kwargs,size,channels",
  [
    (dict(TINY, dtype="bfloat16", remat=True, attn_impl="explicit"), 8, 3),
    (
      dict(
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(8,),
        dropout=0.0,
        resamp_with_conv=False,
        out_ch=6,
        num_groups=16,
      ),
      16,
      3,
    ),
    (dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(14,), out_ch=1), 28, 1),
    (dict(), 32, 3),  # The CIFAR-10 model.
  ],
)
def test_output_shape_and_dtype(kwargs, size, channels):
  """Shapes and dtypes through jax.eval_shape (traced, not compiled: the numerics of the
  same code paths are checked on TINY by the other tests)."""
  model = unet_lib.UNet(**kwargs)
  x = jax.ShapeDtypeStruct((3, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((3,), jnp.int32)
  params = jax.eval_shape(
    lambda k, x, t: model.init(k, x, t, train=False), jax.random.key(0), x, t
  )["params"]
  if not model.resamp_with_conv:  # Average pool / plain nearest: no resampling params.
    assert not any("sample" in name for name in params), sorted(params)
  out = jax.eval_shape(
    lambda p, x, t, k: model.apply({"params": p}, x, t, train=True, rngs={"dropout": k}),
    params,
    x,
    t,
    jax.random.key(0),
  )
  assert out.shape == (3, size, size, model.out_ch)
  assert out.dtype == jnp.float32


@pytest.mark.parametrize("use_jit", [True, False])
def test_timestep_embedding_closed_form(use_jit):
  t = np.array([0, 1, 17, 999])
  dim, half = 10, 5
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))  # 1, 0.1, ..., 1e-4
  np.testing.assert_allclose(freqs[[0, -1]], [1.0, 1e-4])
  expected = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
  fn = unet_lib.timestep_embedding
  emb = (jax.jit(fn, static_argnums=1) if use_jit else fn)(jnp.asarray(t), dim)
  chex.assert_type(emb, jnp.float32)
  np.testing.assert_allclose(emb, expected, atol=2e-4)
  np.testing.assert_array_equal(emb[0], [0] * 5 + [1] * 5)


# --- Blocks against NumPy references -----------------------------------------------------


@pytest.mark.parametrize("impl", unet_lib.ATTN_IMPLS)
def test_attention_matches_formula(tiny, impl):
  p = _np(tiny["pparams"]["mid_attn"])
  x = np.random.default_rng(0).normal(size=(2, 4, 4, 32))
  out = unet_lib.AttnBlock(8, jnp.float32, impl).apply(
    {"params": tiny["pparams"]["mid_attn"]}, jnp.asarray(x, jnp.float32)
  )
  h = _np_group_norm(x, p["norm"], 8).reshape(2, 16, 32)
  q, k, v = (_np_dense(h, p[n]) for n in "qkv")
  logits = np.einsum("bic,bjc->bij", q, k) / np.sqrt(32)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  expected = x + _np_dense(np.einsum("bij,bjc->bic", w, v), p["proj_out"]).reshape(x.shape)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_res_block_matches_formula(tiny):
  pj = tiny["pparams"]["down_1_block_0"]  # 16 -> 32 channels: has the 1x1 shortcut.
  p = _np(pj)
  rng = np.random.default_rng(1)
  x, temb = rng.normal(size=(2, 4, 4, 16)), rng.normal(size=(2, 64))
  out = unet_lib.ResBlock(32, 8, 0.1, jnp.float32).apply(
    {"params": pj}, jnp.asarray(x, jnp.float32), jnp.asarray(temb, jnp.float32), False
  )
  h = _np_conv3x3(_np_swish(_np_group_norm(x, p["norm_0"], 8)), p["conv_0"])
  h = h + _np_dense(_np_swish(temb), p["temb_proj"])[:, None, None, :]
  h = _np_conv3x3(_np_swish(_np_group_norm(h, p["norm_1"], 8)), p["conv_1"])
  np.testing.assert_allclose(out, _np_dense(x, p["nin_shortcut"]) + h, rtol=1e-4, atol=1e-4)


def test_downsample_pads_like_tf_same(tiny):
  assert unet_lib.tf_same_padding(8, 3, 2) == (0, 1)
  assert unet_lib.tf_same_padding(7, 3, 2) == (1, 1)
  pj = tiny["pparams"]["down_0_downsample"]
  x = np.random.default_rng(2).normal(size=(2, 8, 8, 16))
  xj = jnp.asarray(x, jnp.float32)
  out = unet_lib.Downsample(True, jnp.float32).apply({"params": pj}, xj)
  expected = _np_conv3x3(x, _np(pj)["conv"], stride=2, pads=((0, 1), (0, 1)))
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
  pooled = unet_lib.Downsample(False, jnp.float32).apply({}, xj)
  np.testing.assert_allclose(pooled, x.reshape(2, 4, 2, 4, 2, 16).mean(axis=(2, 4)), atol=1e-6)


def test_upsample_nearest_then_conv(tiny):
  pj = tiny["pparams"]["up_1_upsample"]
  x = np.random.default_rng(3).normal(size=(2, 4, 4, 32))
  xj = jnp.asarray(x, jnp.float32)
  nearest = x.repeat(2, axis=1).repeat(2, axis=2)
  x32 = np.asarray(xj).repeat(2, axis=1).repeat(2, axis=2)
  np.testing.assert_array_equal(unet_lib.Upsample(False, jnp.float32).apply({}, xj), x32)
  out = unet_lib.Upsample(True, jnp.float32).apply({"params": pj}, xj)
  np.testing.assert_allclose(out, _np_conv3x3(nearest, _np(pj)["conv"]), rtol=1e-4, atol=1e-4)


# --- Training behaviour: t-dependence, dropout, bf16, remat -------------------------------


@pytest.mark.slow
def test_few_adam_steps_make_output_depend_on_t(tiny):
  x = jnp.broadcast_to(tiny["x"][:1], tiny["x"].shape)  # One image at four timesteps.
  t = jnp.array([0, 300, 600, 999], jnp.int32)
  target = jnp.cos(t / 300.0)[:, None, None, None] * jnp.ones_like(x)  # Depends on t only.
  opt = optax.adam(1e-3)

  @jax.jit
  def update(grads, opt_state, params):
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def spread(out):
    return float(jnp.abs(out[0] - out[3]).mean())  # t=0 vs t=999.

  params, opt_state = tiny["params"], opt.init(tiny["params"])
  assert spread(tiny["evaluate"](params, x, t, None)) < 1e-4
  losses = []
  for i in range(15):
    (loss, _), grads = tiny["loss_and_grad"](params, x, t, target, jax.random.key(i))
    params, opt_state = update(grads, opt_state, params)
    losses.append(float(loss))
  assert min(losses[-3:]) < 0.5 * losses[0], losses
  assert spread(tiny["evaluate"](params, x, t, None)) > 0.5  # Target spread: 1 - cos(3.33).


def test_dropout_only_in_train_mode_and_from_dropout_rng(tiny):
  args = (tiny["pparams"], tiny["x"], tiny["t"])
  eval_out = tiny["evaluate"](*args, None)
  np.testing.assert_array_equal(eval_out, tiny["evaluate"](*args, None))

  def train(key):
    return tiny["loss_and_grad"](*args, jnp.zeros_like(eval_out), key)[0][1]

  a, b = train(jax.random.key(0)), train(jax.random.key(1))
  np.testing.assert_array_equal(a, train(jax.random.key(0)))
  assert float(jnp.abs(a - b).mean()) > 1e-3
  assert float(jnp.abs(a - eval_out).mean()) > 1e-3
  with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
    tiny["model"].apply({"params": tiny["pparams"]}, tiny["x"], tiny["t"], train=True)


def test_bfloat16_compute_close_to_float32(tiny):
  args = (tiny["pparams"], tiny["x"], tiny["t"], None)
  out32 = tiny["evaluate"](*args)
  out16 = _apply_fn(unet_lib.UNet(**TINY, dtype=jnp.bfloat16))(*args)
  chex.assert_type(out16, jnp.float32)
  assert float(jnp.abs(out32).mean()) > 0.1  # Perturbed params: a non-trivial output.
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert 0 < rel < BF16_REL_TOL


@pytest.mark.slow
def test_remat_gives_same_outputs_and_grads(tiny):
  args = (tiny["pparams"], tiny["x"], tiny["t"], jnp.zeros_like(tiny["x"]), jax.random.key(4))
  (loss_a, out_a), grads_a = tiny["loss_and_grad"](*args)
  (loss_b, out_b), grads_b = _loss_and_grad_fn(unet_lib.UNet(**TINY, remat=True))(*args)
  # Same dropout masks and the same maths; XLA fuses the two programs differently, so they
  # agree up to float32 rounding (~1e-7 relative), not bit for bit.
  chex.assert_trees_all_close(out_a, out_b, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(loss_a, loss_b, rtol=1e-5)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_a))
  chex.assert_trees_all_close(grads_a, grads_b, rtol=1e-5, atol=1e-6 * scale)


# --- Bad input ---------------------------------------------------------------------------


def _trace(model, x_shape, t_shape=(2,), t_dtype=jnp.int32):
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  t = jax.ShapeDtypeStruct(t_shape, t_dtype)
  jax.eval_shape(lambda k, x, t: model.init(k, x, t, train=False), jax.random.key(0), x, t)


@pytest.mark.parametrize(
  "x_shape,t_shape,t_dtype,match",
  [
    ((2, 10, 10, 3), (2,), jnp.int32, r"Image size 10.*= 4"),  # ch_mult (1, 2, 2).
    ((2, 8, 16, 3), (2,), jnp.int32, r"square.*\(2, 8, 16, 3\)"),
    ((2, 16, 16, 3), (2,), jnp.int32, r"Attention resolutions \[4\].*\(16, 8\)"),
    ((2, 8, 8, 3), (2, 1), jnp.int32, r"shape \[B\].*\(2, 1\)"),
    ((2, 8, 8, 3), (3,), jnp.int32, r"shape \[B\].*\(3,\)"),
    ((2, 8, 8, 3), (2,), jnp.bool_, "integer.*or float.*bool"),
  ],
)
def test_bad_call_inputs(x_shape, t_shape, t_dtype, match):
  with pytest.raises(ValueError, match=match):
    _trace(
      unet_lib.UNet(**{**TINY, "ch_mult": (1, 2, 2)})
      if x_shape[1] == 10
      else unet_lib.UNet(**TINY),
      x_shape,
      t_shape,
      t_dtype,
    )


@pytest.mark.parametrize(
  "overrides,match",
  [
    (dict(ch=12), r"ch=12.*\[12, 24\].*num_groups=8"),
    (dict(num_groups=32), r"ch=16.*num_groups=32"),
    (dict(dtype="float16"), "'float16'"),
    (dict(dtype=jnp.int32), "int32"),
    (dict(attn_impl="flash"), "'flash'"),
    (dict(dropout=1.0), "dropout=1.0"),
    (dict(num_res_blocks=0), "num_res_blocks=0"),
  ],
)
def test_bad_hyperparameters(overrides, match):
  with pytest.raises(ValueError, match=match):
    unet_lib.UNet(**{**TINY, **overrides})


@pytest.mark.parametrize(
  "field,value,image_size,match",
  [
    (None, None, 28, r"Image size 28.*8"),  # 2**(4-1) = 8.
    ("attn_resolutions", (16, 7), 32, r"\[7\].*\(32, 16, 8, 4\)"),
    ("dtype", "fp16", 32, "'fp16'"),
  ],
)
def test_create_model_validates(field, value, image_size, match):
  config = default_config.get_config().model
  if field is not None:
    setattr(config, field, value)
  with pytest.raises(ValueError, match=match):
    unet_lib.create_model(config, image_size=image_size, num_channels=3)


def test_create_model_reads_config_and_accepts_dtype_names():
  config = default_config.get_config().model
  config.dtype = "bfloat16"
  model = unet_lib.create_model(config, image_size=32, num_channels=3, out_ch=6)
  assert (model.ch, tuple(model.ch_mult), model.num_res_blocks, model.out_ch) == (
    128,
    (1, 2, 2, 2),
    2,
    6,
  )
  assert unet_lib.resolve_dtype(model.dtype) == jnp.bfloat16
  assert unet_lib.create_model(config, image_size=32, num_channels=1).out_ch == 1
