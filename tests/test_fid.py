"""The FID command line (`python -m ddpm_jax.fid`, ddpm_jax/fid.py): its inputs (sample sets,
sharded sets, statistics files, TTUR's format), its one-line refusals and its Inception
Score record. Its FID against the reference implementation: tests/test_fid_reference.py."""

import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import fid as fid_cli
from ddpm_jax import sample_files
from ddpm_jax.evaluation import features as features_lib
from ddpm_jax.evaluation import inception, metrics
from tests.test_sample_files import SHAPE, _images, _write_set

_ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_cli_refuses_statistics_of_another_protocol(tmp_path, capsys):
  """Statistics of another input protocol (pytorch_fid) are refused with one error line."""
  stats_path = str(tmp_path / "stats.npz")
  metrics.save_stats(
    stats_path,
    np.zeros(2048),
    np.eye(2048),
    meta={"feature_extractor": inception.feature_name("pytorch_fid")},
  )
  samples = str(tmp_path / "samples.npz")
  np.savez(samples, samples=np.zeros((2, 8, 8, 3), np.uint8))
  weights = str(tmp_path / "w.npz")
  np.savez(
    weights,
    **{k: np.zeros(s, np.float32) for k, s in inception.variable_shapes(with_logits=False).items()},
  )
  assert fid_cli.main([samples, stats_path, f"--inception_weights={weights}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("error: feature extractors differ") and "pytorch_fid" in err


def _bad_inputs(tmp_path: pathlib.Path) -> dict[str, tuple[str, str]]:
  """name -> (A path, expected error text) for the command line's input checks."""
  files = {
    "no_keys": ({"images": np.zeros((4, 8, 8, 3), np.uint8)}, "allowed: 'samples'"),
    "float_samples": (
      {"samples": np.zeros((4, 8, 8, 3), np.float32)},
      "dtype float32; allowed: uint8",
    ),
    "bad_shape": ({"samples": np.zeros((4, 8, 8), np.uint8)}, "shape (4, 8, 8)"),
    "one_sample": ({"samples": np.zeros((1, 8, 8, 3), np.uint8)}, "N >= 2"),
    "small_stats": ({"mu": np.zeros(3), "sigma": np.eye(3)}, "mu (3,)"),
  }
  cases = {}
  for name, (arrays, message) in files.items():
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    cases[name] = (str(path), message)
  (tmp_path / "not_npz.npz").write_bytes(b"plain text")
  cases["not_npz"] = (str(tmp_path / "not_npz.npz"), "not a readable .npz")
  cases["missing"] = (str(tmp_path / "absent.npz"), "no such file")
  return cases


def test_cli_rejects_bad_inputs(tmp_path, capsys):
  good = tmp_path / "good.npz"
  np.savez(good, mu=np.zeros(2048), sigma=np.eye(2048))
  for name, (path, message) in _bad_inputs(tmp_path).items():
    assert fid_cli.main([path, str(good)]) == 2, name
    captured = capsys.readouterr()
    assert captured.out == "", name
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, lines)
  samples = tmp_path / "samples.npz"
  np.savez(samples, samples=np.zeros((2, 8, 8, 3), np.uint8))
  assert fid_cli.main([str(samples), str(good)]) == 2
  assert "--inception_weights is required" in capsys.readouterr().err


def test_cli_module_exits_2_without_traceback(tmp_path):
  """`python -m ddpm_jax.fid` on a bad file: exit status 2, one `error:` line on stderr."""
  bad = tmp_path / "bad.npz"
  np.savez(bad, samples=np.zeros((4, 8, 8, 3), np.int64))
  result = subprocess.run(
    [sys.executable, "-m", "ddpm_jax.fid", str(bad), str(bad), "--inception_weights=x"],
    cwd=_ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.strip().splitlines() == [
    f"error: {bad}: samples have dtype int64; allowed: uint8 (quantized images in [0, 255])"
  ]


def test_cli_reads_ttur_statistics(tmp_path):
  """TTUR's fid_stats_*.npz format (mu, sigma, no meta) is a statistics input."""
  path = tmp_path / "fid_stats_ttur.npz"
  np.savez(path, mu=np.full(2048, 0.5, np.float32), sigma=np.eye(2048, dtype=np.float32))
  source = fid_cli.read_source(str(path))
  assert source.samples is None and source.meta == {} and source.num_images is None
  assert source.mu.dtype == np.float64 and source.sigma.shape == (2048, 2048)


def test_inception_score_record():
  """IS of A's logits (OpenAI: 10 splits), else nulls with the reason it is unavailable."""
  samples = fid_cli.Source(
    "a.npz", samples=sample_files.SampleSet.from_array(np.zeros((20, 8, 8, 3), np.uint8))
  )
  sums = metrics.InceptionScoreSums(20, 10, 1008)
  sums.update(np.zeros((20, 1008), np.float32), np.arange(20))
  record = fid_cli._inception_score_record(samples, sums)
  assert record == {
    "inception_score": pytest.approx(1.0),
    "inception_score_std": 0.0,
    "inception_score_splits": 10,
    "inception_score_unavailable": None,
  }
  record = fid_cli._inception_score_record(samples, None)
  assert record["inception_score"] is None
  assert record["inception_score_unavailable"] == inception.NO_LOGITS_MESSAGE
  stats = fid_cli.Source("s.npz", mu=np.zeros(2048), sigma=np.eye(2048))
  assert (
    "statistics file" in fid_cli._inception_score_record(stats, None)["inception_score_unavailable"]
  )


def _toy_extractor() -> features_lib.FeatureExtractor:
  """Features: channel means and the first pixel; logits: 5 linear scores."""
  weights = np.random.default_rng(0).normal(size=(int(np.prod(SHAPE)), 5)).astype(np.float32)

  def apply_fn(variables, images):
    x = images.astype(jnp.float32).reshape(images.shape[0], -1) / 255.0
    features = jnp.concatenate([x.reshape(images.shape[0], -1, 3).mean(1), x[:, :3]], axis=1)
    return features, x @ variables

  return features_lib.FeatureExtractor("toy", apply_fn, weights, 6, logits_name="toy logits")


def test_fid_command_line_streams_a_set_shard_by_shard(tmp_path):
  """`python -m ddpm_jax.fid` reads an index (or its folder) and computes, batch by batch
  from the shards, the statistics and the Inception Score of all the images in order."""
  images = _images(23)
  path = _write_set(tmp_path, images, batch=8, processes=2)
  extractor = _toy_extractor()
  features, logits = extractor(images)
  for where in (path, str(tmp_path)):
    source = fid_cli.read_source(where)
    assert source.num_images == 23 and source.samples.shape == (23,) + SHAPE
    mu, sigma, scores = fid_cli.sample_statistics(extractor, source.samples, 4, "A")
    expected_mu, expected_sigma = metrics.compute_statistics(np.asarray(features))
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-6)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(
      scores.score(), metrics.inception_score(np.asarray(logits), 10), rtol=1e-6
    )
  (tmp_path / "bad.json").write_text('{"format": "something else"}')
  with pytest.raises(ValueError, match="not a sample-set index"):
    fid_cli.read_source(str(tmp_path / "bad.json"))
