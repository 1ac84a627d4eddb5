"""Released-weight files made from random weights, for tests/test_pretrained.py and the
multi-process suite: the official TF1 checkpoint format and diffusers UNet2DModel folders.

Everything here is written from the official code's structure (diffusion_tf/models/unet.py
walks ch_mult, num_res_blocks and attn_resolutions; nn.py's dense / nin / conv2d variables
and tf.contrib group_norm's gamma / beta) and from diffusers' state-dict naming, without
ddpm_jax.pretrained's own name tables, so a wrong mapping there fails the tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

EMA = "/ExponentialMovingAverage"


@dataclasses.dataclass(frozen=True)
class Layout:
  """The hyper-parameters of diffusion_tf/models/unet.py's model()."""

  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  image_size: int
  in_ch: int = 3
  out_ch: int = 3

  def overrides(self) -> dict[str, Any]:
    """The same layout as tests.conftest.tiny_config overrides (32 groups, as tf.contrib)."""
    return {
      "model.ch": self.ch,
      "model.ch_mult": self.ch_mult,
      "model.num_res_blocks": self.num_res_blocks,
      "model.attn_resolutions": self.attn_resolutions,
      "model.num_groups": 32,
      "data.image_size": self.image_size,
      "data.num_channels": self.in_ch,
    }

  def flags(self) -> list[str]:
    """The same overrides as main.py flags."""
    return [f"--config.{k}={v}" for k, v in self.overrides().items()]


CIFAR10 = Layout(128, (1, 2, 2, 2), 2, (16,), 32)
LSUN = Layout(128, (1, 1, 2, 2, 4, 4), 2, (16,), 256)
TINY = Layout(32, (1, 1), 1, (4,), 8)
SMALL = Layout(32, (1, 2, 2), 2, (8,), 16)


def official_variables(layout: Layout) -> dict[str, tuple[int, ...]]:
  """Name -> shape of every trainable variable of the official U-Net under scope 'model',
  in the order the official code creates them."""
  out: dict[str, tuple[int, ...]] = {}

  def dense(name: str, c_in: int, c_out: int) -> None:  # nn.dense and nn.nin: W [in, out].
    out[f"{name}/W"], out[f"{name}/b"] = (c_in, c_out), (c_out,)

  def conv(name: str, c_in: int, c_out: int) -> None:  # nn.conv2d: W [3, 3, in, out].
    out[f"{name}/W"], out[f"{name}/b"] = (3, 3, c_in, c_out), (c_out,)

  def norm(name: str, c: int) -> None:  # tf.contrib.layers.group_norm.
    out[f"{name}/beta"], out[f"{name}/gamma"] = (c,), (c,)

  def resnet(name: str, c_in: int, c_out: int) -> int:
    norm(f"{name}/norm1", c_in)
    conv(f"{name}/conv1", c_in, c_out)
    dense(f"{name}/temb_proj", 4 * layout.ch, c_out)
    norm(f"{name}/norm2", c_out)
    conv(f"{name}/conv2", c_out, c_out)
    if c_in != c_out:
      dense(f"{name}/nin_shortcut", c_in, c_out)
    return c_out

  def attn(name: str, c: int) -> None:
    norm(f"{name}/norm", c)
    for layer in ("q", "k", "v", "proj_out"):
      dense(f"{name}/{layer}", c, c)

  ch, scope = layout.ch, "model"
  dense(f"{scope}/temb/dense0", ch, 4 * ch)
  dense(f"{scope}/temb/dense1", 4 * ch, 4 * ch)
  conv(f"{scope}/conv_in", layout.in_ch, ch)
  hs, resolution = [ch], layout.image_size
  for i, mult in enumerate(layout.ch_mult):
    for j in range(layout.num_res_blocks):
      c = resnet(f"{scope}/down_{i}/block_{j}", hs[-1], ch * mult)
      if resolution in layout.attn_resolutions:
        attn(f"{scope}/down_{i}/attn_{j}", c)
      hs.append(c)
    if i != len(layout.ch_mult) - 1:
      conv(f"{scope}/down_{i}/downsample/conv", hs[-1], hs[-1])
      hs.append(hs[-1])
      resolution //= 2
  c = resnet(f"{scope}/mid/block_1", hs[-1], hs[-1])
  attn(f"{scope}/mid/attn_1", c)
  c = resnet(f"{scope}/mid/block_2", c, c)
  for i in reversed(range(len(layout.ch_mult))):
    for j in range(layout.num_res_blocks + 1):
      c = resnet(f"{scope}/up_{i}/block_{j}", c + hs.pop(), ch * layout.ch_mult[i])
      if resolution in layout.attn_resolutions:
        attn(f"{scope}/up_{i}/attn_{j}", c)
    if i != 0:
      conv(f"{scope}/up_{i}/upsample/conv", c, c)
      resolution *= 2
  assert not hs
  norm(f"{scope}/norm_out", c)
  conv(f"{scope}/conv_out", c, layout.out_ch)
  return out


def random_weights(variables: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
  """Weights that keep activations of order one: kernels N(0, 1/fan_in), biases and norm
  offsets N(0, 0.1^2), norm scales 1 + N(0, 0.1^2); the official zero-init layers too."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in variables.items():
    leaf = name.rsplit("/", 1)[1]
    if leaf == "W":
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    elif leaf == "gamma":
      value = 1.0 + 0.1 * rng.normal(size=shape)
    else:
      value = 0.1 * rng.normal(size=shape)
    out[name] = value.astype(np.float32)
  return out


def write_official(
  prefix: str, weights: dict[str, np.ndarray], *, step: int, ema: bool = True, decoy_seed: int = 1
) -> dict[str, np.ndarray]:
  """A TF1 checkpoint as the official TPU training wrote it: ``weights`` as the EMA shadows
  ``<name>/ExponentialMovingAverage`` (with ``ema``; without, as the raw weights), other
  raw weights beside them, Adam slots, beta1/2_power and global_step. Returns the raw
  weights written."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(decoy_seed)
  values: dict[str, np.ndarray] = {}
  raw = {
    n: (w + 0.5 * rng.normal(size=w.shape)).astype(np.float32) if ema else w
    for n, w in weights.items()
  }
  for name, w in weights.items():
    values[name] = raw[name]
    if ema:
      values[name + EMA] = w
    values[name + "/Adam"] = rng.normal(size=w.shape).astype(np.float32)
    values[name + "/Adam_1"] = rng.random(size=w.shape).astype(np.float32)
  values["beta1_power"], values["beta2_power"] = np.float32(0.9), np.float32(0.999)
  values["global_step"] = np.int64(step)
  graph = tf.Graph()
  with graph.as_default():  # Placeholders: the values are fed once, not stored in the graph.
    feeds = {
      n: tf.compat.v1.placeholder(tf.as_dtype(np.asarray(v).dtype), np.shape(v))
      for n, v in values.items()
    }
    variables = {
      n: tf.compat.v1.Variable(p, name=f"v{i}") for i, (n, p) in enumerate(feeds.items())
    }
    saver = tf.compat.v1.train.Saver(var_list=variables)
    with tf.compat.v1.Session(graph=graph) as sess:
      sess.run(
        tf.compat.v1.global_variables_initializer(), {feeds[n]: v for n, v in values.items()}
      )
      saver.save(sess, prefix, write_meta_graph=False, write_state=False)
  return raw


def diffusers_key(name: str, layout: Layout, *, legacy: bool = False) -> str:
  """The UNet2DModel state-dict key of an official variable name (diffusers'
  scripts/convert_ddpm_original_checkpoint_to_diffusers.py naming); ``legacy``: the
  attention names of diffusers before 0.15 (query, key, value, proj_attn)."""
  parts = name.split("/")[1:]
  leaf = {"W": "weight", "gamma": "weight", "b": "bias", "beta": "bias"}[parts[-1]]
  layer = {
    "norm1": "norm1",
    "conv1": "conv1",
    "temb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
    "norm": "group_norm",
    "q": "query" if legacy else "to_q",
    "k": "key" if legacy else "to_k",
    "v": "value" if legacy else "to_v",
    "proj_out": "proj_attn" if legacy else "to_out.0",
    "conv": "conv",
  }
  head = parts[0]
  if head == "temb":
    return f"time_embedding.linear_{int(parts[1][-1]) + 1}.{leaf}"
  if head in ("conv_in", "conv_out"):
    return f"{head}.{leaf}"
  if head == "norm_out":
    return f"conv_norm_out.{leaf}"
  if head == "mid":
    block = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}[parts[1]]
    return f"mid_block.{block}.{layer[parts[2]]}.{leaf}"
  direction, level = head.split("_")
  index = int(level) if direction == "down" else len(layout.ch_mult) - 1 - int(level)
  if parts[1] in ("downsample", "upsample"):
    return f"{direction}_blocks.{index}.{parts[1][:-6]}samplers.0.conv.{leaf}"
  kind, j = parts[1].split("_")
  group = "resnets" if kind == "block" else "attentions"
  return f"{direction}_blocks.{index}.{group}.{j}.{layer[parts[2]]}.{leaf}"


def torch_layout(name: str, value: np.ndarray) -> np.ndarray:
  """An official weight in PyTorch's layout: conv HWIO -> OIHW, dense [in, out] ->
  [out, in]; the 1x1 shortcut becomes a conv [out, in, 1, 1]."""
  if value.ndim == 4:
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
  if value.ndim == 2:
    value = np.ascontiguousarray(value.T)
    return value[:, :, None, None] if "/nin_shortcut/" in name else value
  return value


def diffusers_config(layout: Layout) -> dict[str, Any]:
  """config.json of the paper's layout as UNet2DModel arguments."""
  attn = [layout.image_size // 2**i in layout.attn_resolutions for i in range(len(layout.ch_mult))]
  return {
    "_class_name": "UNet2DModel",
    "sample_size": layout.image_size,
    "in_channels": layout.in_ch,
    "out_channels": layout.out_ch,
    "block_out_channels": [layout.ch * m for m in layout.ch_mult],
    "layers_per_block": layout.num_res_blocks,
    "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
    "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
    "attention_head_dim": None,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "downsample_padding": 0,
    "center_input_sample": False,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
  }


def diffusers_tensors(
  weights: dict[str, np.ndarray], layout: Layout, *, legacy: bool = False
) -> dict[str, np.ndarray]:
  return {diffusers_key(n, layout, legacy=legacy): torch_layout(n, w) for n, w in weights.items()}


def write_diffusers(
  folder: str,
  weights: dict[str, np.ndarray],
  layout: Layout,
  *,
  legacy: bool = False,
  config: dict[str, Any] | None = None,
) -> None:
  """A UNet2DModel folder (config.json, diffusion_pytorch_model.safetensors) of the official
  ``weights``, written with safetensors alone (no diffusers)."""
  import safetensors.numpy  # pylint: disable=import-outside-toplevel

  os.makedirs(folder, exist_ok=True)
  safetensors.numpy.save_file(
    diffusers_tensors(weights, layout, legacy=legacy),
    os.path.join(folder, "diffusion_pytorch_model.safetensors"),
    metadata={"format": "pt"},
  )
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config or diffusers_config(layout), f)
