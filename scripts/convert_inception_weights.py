r"""Converts pytorch-fid's FID Inception weights (.pth) to the .npz read by ddpm_jax.

The FID / IS numbers of the paper (Ho et al. 2020, App. B) use TF's Inception 2015-12-05
graph. pytorch-fid ships that graph's weights as a PyTorch state_dict:

  wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  python scripts/convert_inception_weights.py \
      --input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.npz

and `ddpm_jax.evaluation.inception.load_inception_params('inception_fid.npz')` then loads
it. Only this script needs torch (CPU build is enough), and only in `main`.

Mapping (the Flax modules carry the PyTorch module names; M is a BasicConv2d such as
'Mixed_6b.branch7x7_2', written 'Mixed_6b/branch7x7_2' on the Flax side):
  M.conv.weight            [O, I, kh, kw] -> params/M/conv/kernel   [kh, kw, I, O]
  M.bn.weight              [O]            -> params/M/bn/scale
  M.bn.bias                [O]            -> params/M/bn/bias
  M.bn.running_mean        [O]            -> batch_stats/M/bn/mean
  M.bn.running_var         [O]            -> batch_stats/M/bn/var
  M.bn.num_batches_tracked                   (training counter, dropped)
  fc.weight                [1008, 2048]   -> params/fc/kernel       [2048, 1008]
  fc.bias                  [1008]         -> params/fc/bias
Every tensor the Flax model needs must be present with the right shape and no other
tensor may be (ValueError otherwise), so a wrong file cannot convert silently.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from collections.abc import Mapping

import numpy as np

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:  # Run as `python scripts/convert_inception_weights.py`.
  sys.path.insert(0, _REPO_ROOT)

from ddpm_jax.evaluation import inception  # noqa: E402

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


def _tensor_table(flax_shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, str, tuple]]:
  """[(pytorch name, flax path, transpose)] for every variable of the Flax model."""
  blocks = sorted(key[len("params/"):-len("/conv/kernel")] for key in flax_shapes
                  if key.startswith("params/") and key.endswith("/conv/kernel"))
  table = []
  for block in blocks:
    torch_prefix = block.replace("/", ".")
    for torch_suffix, collection, flax_suffix, perm in _CONV_BLOCK_TENSORS:
      table.append((f"{torch_prefix}.{torch_suffix}", f"{collection}/{block}/{flax_suffix}",
                    perm))
  for torch_name, collection, flax_suffix, perm in _FC_TENSORS:
    table.append((torch_name, f"{collection}/{flax_suffix}", perm))
  covered = {flax_path for _, flax_path, _ in table}
  if covered != set(flax_shapes):
    raise ValueError(f"unmapped Flax variables: {sorted(set(flax_shapes) - covered)[:5]}")
  return table


def convert_state_dict(state_dict: Mapping[str, np.ndarray],
                       flax_shapes: Mapping[str, tuple[int, ...]] | None = None
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
    raise ValueError(f"state_dict is not pytorch-fid's FID Inception: missing {missing[:5]} "
                     f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
  flat = {}
  for torch_name, flax_path, perm in table:
    array = np.asarray(state_dict[torch_name], dtype=np.float32)
    if perm is not None:
      array = np.transpose(array, perm)
    if array.shape != tuple(flax_shapes[flax_path]):
      raise ValueError(f"{torch_name} maps to shape {array.shape}, but {flax_path} needs "
                       f"{tuple(flax_shapes[flax_path])}")
    flat[flax_path] = np.ascontiguousarray(array)
  return flat


def to_state_dict(flat: Mapping[str, np.ndarray],
                  flax_shapes: Mapping[str, tuple[int, ...]] | None = None
                  ) -> dict[str, np.ndarray]:
  """The inverse of `convert_state_dict`: flat Flax variables -> PyTorch-named arrays."""
  flax_shapes = inception.variable_shapes() if flax_shapes is None else flax_shapes
  state_dict = {}
  for torch_name, flax_path, perm in _tensor_table(flax_shapes):
    array = np.asarray(flat[flax_path])
    state_dict[torch_name] = np.transpose(array, np.argsort(perm)) if perm else array
  return state_dict


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
    raise ValueError(f"{path!r}: sha256 {digest.hexdigest()[:12]}... does not start with "
                     f"{match.group(1)} (corrupt download?)")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True, help=f"path of {inception.WEIGHTS_FILENAME}")
  parser.add_argument("--output", required=True, help="path of the .npz to write")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing --output file (refused otherwise)")
  args = parser.parse_args(argv)
  if not os.path.isfile(args.input):
    parser.error(f"--input={args.input!r} is not a file; download {inception.WEIGHTS_URL}")
  if os.path.exists(args.output) and not args.overwrite:
    parser.error(f"--output={args.output!r} already exists; pass --overwrite to replace it")
  try:
    _check_hash(args.input)
  except ValueError as e:
    parser.error(str(e))
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    parser.error("the conversion needs PyTorch (CPU build is enough): pip install torch")

  state_dict = torch.load(args.input, map_location="cpu", weights_only=True)
  flat = convert_state_dict({k: v.detach().cpu().numpy() for k, v in state_dict.items()})
  directory = os.path.dirname(args.output)
  if directory:
    os.makedirs(directory, exist_ok=True)
  tmp_path = f"{args.output}.tmp{os.getpid()}.npz"
  np.savez(tmp_path, **flat)
  inception.load_inception_params(tmp_path)  # Validates what was written.
  os.replace(tmp_path, args.output)
  print(f"wrote {len(flat)} arrays to {args.output}")


if __name__ == "__main__":
  main()
