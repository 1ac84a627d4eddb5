"""The names of the U-Net's weights in ddpm_jax, in the authors' release and in diffusers.

Every weight of ddpm_jax's U-Net (models/unet.py) is a flax path such as
``('down_1_attn_0', 'q', 'kernel')``. The same tensor is called

* ``model/down_1/attn_0/q/W`` in the official TF1 checkpoints of Ho et al. (2020), whose
  variables follow diffusion_tf/models/unet.py under the scope ``model``: dense and 1x1
  ("nin") kernels ``W`` laid out [in, out], 3x3 conv kernels HWIO, biases ``b``, group-norm
  ``gamma`` / ``beta``; the middle blocks are ``mid/block_1``, ``mid/attn_1``,
  ``mid/block_2``. Both layouts are flax's own, so no tensor is transposed.
* ``down_blocks.1.attentions.0.to_q.weight`` in a diffusers ``UNet2DModel`` of the paper's
  layout, PyTorch's layout: linear weights [out, in], conv weights OIHW, the 1x1 shortcut a
  conv [out, in, 1, 1], norms ``weight`` / ``bias``; diffusers numbers up blocks from the
  bottom (up_blocks.k is ddpm_jax's level L-1-k).

This module holds those rules and the UNet2DModel config of a ddpm_jax config; reading and
writing files is pretrained_files.py's, checking and loading pretrained.py's.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from ddpm_jax import factories

Path = tuple[str, ...]
Shape = tuple[int, ...]

OFFICIAL_SCOPE = "model"
_NORMS = ("norm_0", "norm_1", "norm", "norm_out")
_MODULE = re.compile(r"^(down|up)_(\d+)_(?:(block|attn)_(\d+)|(downsample|upsample))$")

# ddpm_jax's layer names inside a res block / attention block -> the official and diffusers ones.
_OFFICIAL_LAYER = {"norm_0": "norm1", "conv_0": "conv1", "norm_1": "norm2", "conv_1": "conv2"}
_DIFFUSERS_LAYER = {
  "norm_0": "norm1",
  "conv_0": "conv1",
  "temb_proj": "time_emb_proj",
  "norm_1": "norm2",
  "conv_1": "conv2",
  "nin_shortcut": "conv_shortcut",
  "norm": "group_norm",
  "q": "to_q",
  "k": "to_k",
  "v": "to_v",
  "proj_out": "to_out.0",
}
_OFFICIAL_TOP = {
  "temb_dense_0": "temb/dense0",
  "temb_dense_1": "temb/dense1",
  "mid_block_0": "mid/block_1",
  "mid_attn": "mid/attn_1",
  "mid_block_1": "mid/block_2",
}
_DIFFUSERS_TOP = {
  "temb_dense_0": "time_embedding.linear_1",
  "temb_dense_1": "time_embedding.linear_2",
  "norm_out": "conv_norm_out",
  "mid_block_0": "mid_block.resnets.0",
  "mid_attn": "mid_block.attentions.0",
  "mid_block_1": "mid_block.resnets.1",
}
# The attention names of folders saved by older diffusers (its AttentionBlock).
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def model_shapes(config: ml_collections.ConfigDict) -> dict[Path, Shape]:
  """Every weight of factories.create_model(config) -> its shape, in flax's (sorted) order;
  from jax.eval_shape (nothing is computed), once per layout."""
  model = factories.create_model(config)
  return dict(
    _shapes(
      model.clone(dtype="float32", remat=False),
      int(config.data.image_size),
      int(config.data.num_channels),
    )
  )


@functools.lru_cache(maxsize=16)
def _shapes(model: Any, size: int, channels: int) -> tuple[tuple[Path, Shape], ...]:
  shapes = jax.eval_shape(
    lambda key: model.init(
      key, jnp.zeros((1, size, size, channels)), jnp.zeros((1,), jnp.int32), train=False
    ),
    jax.random.key(0),
  )["params"]
  return tuple(
    (path, tuple(leaf.shape)) for path, leaf in traverse_util.flatten_dict(shapes).items()
  )


def _split(path: Path) -> tuple[str, str, str]:
  """(module, layer, leaf) of a weight's path; top-level layers have layer ''."""
  if len(path) == 3:
    return path[0], path[1], path[2]
  return path[0], "", path[1]


def _leaf_kind(layer_or_module: str, leaf: str) -> str:
  """'norm_scale', 'norm_bias', 'kernel' or 'bias'."""
  if layer_or_module in _NORMS:
    return "norm_" + leaf
  return leaf


def official_name(path: Path) -> str:
  """The variable of an official TF1 checkpoint that holds the weight ``path``, e.g.
  ('mid_block_0', 'norm_0', 'scale') -> 'model/mid/block_1/norm1/gamma'."""
  module, layer, leaf = _split(path)
  match = _MODULE.match(module)
  if match:
    direction, level, kind, index, resample = match.groups()
    scope = f"{direction}_{level}/" + (f"{kind}_{index}" if kind else resample)
  else:
    scope = _OFFICIAL_TOP.get(module, module)
  kind = _leaf_kind(layer or module, leaf)
  tail = {"norm_scale": "gamma", "norm_bias": "beta", "kernel": "W", "bias": "b"}[kind]
  parts = [OFFICIAL_SCOPE, scope] + ([_OFFICIAL_LAYER.get(layer, layer)] if layer else [])
  return "/".join(parts + [tail])


def diffusers_name(path: Path, levels: int) -> str:
  """The UNet2DModel state-dict key of the weight ``path`` of a U-Net with ``levels``
  resolutions, e.g. ('up_2_block_1', 'conv_1', 'kernel') -> 'up_blocks.0.resnets.1.conv2.
  weight' for 3 levels."""
  module, layer, leaf = _split(path)
  match = _MODULE.match(module)
  if match:
    direction, level, kind, index, resample = match.groups()
    block = int(level) if direction == "down" else levels - 1 - int(level)
    if resample:
      prefix = f"{direction}_blocks.{block}.{resample[: -len('sample')]}samplers.0"
    else:
      group = "resnets" if kind == "block" else "attentions"
      prefix = f"{direction}_blocks.{block}.{group}.{index}"
  else:
    prefix = _DIFFUSERS_TOP.get(module, module)
  layer_name = _DIFFUSERS_LAYER.get(layer, layer)
  return ".".join(
    [prefix] + ([layer_name] if layer else []) + ["bias" if leaf == "bias" else "weight"]
  )


def legacy_diffusers_key(key: str) -> str:
  """A state-dict key of diffusers' old attention block in today's names
  ('mid_block.attentions.0.query.weight' -> '...to_q.weight'); other keys unchanged."""
  match = re.match(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$", key)
  if not match:
    return key
  return f"{match.group(1)}.{_LEGACY_ATTENTION[match.group(2)]}.{match.group(3)}"


def diffusers_shape(path: Path, shape: Shape) -> Shape:
  """The torch shape of a weight: HWIO -> OIHW, [in, out] -> [out, in] (the 1x1 shortcut
  -> [out, in, 1, 1]); scales and biases keep theirs."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:
    return (shape[1], shape[0]) + ((1, 1) if _split(path)[1] == "nin_shortcut" else ())
  return tuple(shape)


def to_diffusers(path: Path, value: np.ndarray) -> np.ndarray:
  """A ddpm_jax weight in the layout of its UNet2DModel tensor (a contiguous float32 copy)."""
  value = np.asarray(value, np.float32)
  moved = {4: lambda v: v.transpose(3, 2, 0, 1), 2: lambda v: v.T}.get(value.ndim, lambda v: v)(
    value
  )
  return np.ascontiguousarray(moved.reshape(diffusers_shape(path, value.shape)))


def from_diffusers(path: Path, value: np.ndarray) -> np.ndarray:
  """The inverse of `to_diffusers`: a UNet2DModel tensor in ddpm_jax's layout."""
  value = np.asarray(value, np.float32)
  if value.ndim == 4 and _split(path)[1] == "nin_shortcut":
    return np.ascontiguousarray(value[:, :, 0, 0].T)
  if value.ndim == 4:
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  if value.ndim == 2:
    return np.ascontiguousarray(value.T)
  return value


# ------------------------------------------------------------ the UNet2DModel config

# The UNet2DModel arguments that change the function it computes, with diffusers' defaults
# (what a config.json without the key means).
DIFFUSERS_DEFAULTS: dict[str, Any] = {
  "sample_size": None,
  "in_channels": 3,
  "out_channels": 3,
  "center_input_sample": False,
  "time_embedding_type": "positional",
  "time_embedding_dim": None,
  "freq_shift": 0,
  "flip_sin_to_cos": True,
  "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
  "mid_block_type": "UNetMidBlock2D",
  "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
  "block_out_channels": (224, 448, 672, 896),
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "downsample_padding": 1,
  "downsample_type": "conv",
  "upsample_type": "conv",
  "act_fn": "silu",
  "attention_head_dim": 8,
  "norm_num_groups": 32,
  "attn_norm_num_groups": None,
  "norm_eps": 1e-5,
  "resnet_time_scale_shift": "default",
  "add_attention": True,
  "class_embed_type": None,
  "num_class_embeds": None,
}


def attention_levels(config: ml_collections.ConfigDict) -> list[bool]:
  """Whether each resolution level of config.model has self-attention."""
  size, attn = int(config.data.image_size), {int(r) for r in config.model.attn_resolutions}
  return [size // 2**i in attn for i in range(len(config.model.ch_mult))]


def diffusers_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """UNet2DModel's arguments for the U-Net of ``config``: the same function on the same
  weights. Timestep sinusoids [sin, cos] with frequencies exp(-log(1e4) i / (ch/2 - 1))
  (flip_sin_to_cos=False, freq_shift=1), one attention head (attention_head_dim=None),
  GroupNorm eps 1e-6, strided-conv down-sampling with TF-'SAME' padding
  (downsample_padding=0 pads right and bottom). ValueError where diffusers has no such
  layer (average-pool down-sampling)."""
  model = config.model
  if not bool(model.resamp_with_conv):
    raise ValueError(
      "model.resamp_with_conv=False (average-pool down-sampling, no up-sampling "
      "conv) has no UNet2DModel equivalent."
    )
  attn = attention_levels(config)
  return {
    "sample_size": int(config.data.image_size),
    "in_channels": int(config.data.num_channels),
    "out_channels": int(factories.create_model(config).out_ch),
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
    "block_out_channels": tuple(int(model.ch) * int(m) for m in model.ch_mult),
    "layers_per_block": int(model.num_res_blocks),
    "mid_block_scale_factor": 1,
    "downsample_padding": 0,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "attention_head_dim": None,
    "norm_num_groups": int(model.num_groups),
    "attn_norm_num_groups": None,
    "norm_eps": 1e-6,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "dropout": float(model.dropout),
  }


def diffusers_config_mismatch(
  folder_config: dict[str, Any], config: ml_collections.ConfigDict
) -> str | None:
  """The first UNet2DModel argument of ``folder_config`` (a config.json, diffusers'
  defaults for absent keys) under which the network computes another function than
  ddpm_jax's U-Net of ``config``, as 'key=theirs (ddpm_jax computes with key=ours)'; None
  if there is none."""
  ours = diffusers_config(config)
  levels = zip(ours["block_out_channels"], attention_levels(config), strict=True)
  widths = {width for width, attention in levels if attention}
  widths.add(ours["block_out_channels"][-1])  # The middle block always has attention.
  for key, default in DIFFUSERS_DEFAULTS.items():
    theirs, mine = folder_config.get(key, default), ours[key]
    if isinstance(theirs, list):
      theirs = tuple(theirs)
    if key == "sample_size" and theirs in (None, (mine, mine)):
      continue  # None: the network itself does not depend on it.
    if key == "attention_head_dim" and theirs is not None and {theirs} == widths:
      continue  # One head per attention layer, the same as None.
    if key == "time_embedding_dim" and theirs == 4 * ours["block_out_channels"][0]:
      continue
    if key == "attn_norm_num_groups" and theirs == ours["norm_num_groups"]:
      continue
    if theirs != mine:
      return f"{key}={theirs!r} (ddpm_jax computes with {key}={mine!r})"
  return None
