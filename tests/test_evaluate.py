"""--mode=sample (ddpm_jax/sample.py) and --mode=eval (ddpm_jax/evaluate.py) on a tiny
trained workdir: what they write, that they never overwrite, and that bad input writes
nothing."""

import json
import os

import chex
import jax
import numpy as np
import pytest

from ddpm_jax import (
  checkpointing,
  config_checks,
  evaluate,
  generation,
  hosts,
  sample,
  sample_files,
  train,
)
from ddpm_jax.errors import ConfigError
from tests.conftest import tiny_config

BASE = {
  "training.num_train_steps": 20,
  "training.sample_every_steps": 0,
  "training.checkpoint_every_steps": 10,
  "training.keep_checkpoints": 1,
  "training.keep_every_steps": 10,
  "sampling.method": "ddim",
  "sampling.ddim.num_steps": 5,
  "sampling.num_samples": 12,
  "eval.num_examples": 20,
  "eval.fid_num_samples": 0,
}


def _config(**overrides):
  return tiny_config(**{**BASE, **overrides})


def _checked(mode, **overrides):
  """The config of a --mode run: checked first, as main.py does."""
  config = _config(**overrides)
  config_checks.check_config(config, mode)
  return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("evaluate"))
  train.train(_config(), path)
  return path


def _snapshot(path):
  return sorted(
    (os.path.relpath(os.path.join(d, f), path), os.path.getmtime(os.path.join(d, f)))
    for d, _, files in os.walk(path)
    for f in files
  )


@pytest.fixture(scope="module")
def sample_set(workdir):
  """The index path of --mode=sample's 12 samples of step 20."""
  return sample.run(_checked("sample"), workdir)


@pytest.mark.slow
def test_sample_mode_writes_a_shard_its_index_and_grid_and_never_overwrites(workdir, sample_set):
  path = sample_set
  folder = os.path.join(workdir, "samples", "step_20")
  assert path == os.path.join(folder, "samples.json")
  assert sorted(os.listdir(folder)) == ["grid.png", "samples.json", "samples_0-of-1.npz"]
  with open(path) as f:
    index = json.load(f)
  assert (index["num_samples"], index["image_shape"]) == (12, [8, 8, 3])
  assert index["shards"] == [{"file": "samples_0-of-1.npz", "num_samples": 12}]
  assert index["settings"] == generation.sampler_settings(_config())
  with np.load(os.path.join(folder, "samples_0-of-1.npz")) as shard:
    samples, indices = shard["samples"], shard["indices"]
  chex.assert_shape(samples, (12, 8, 8, 3))
  assert samples.dtype == np.uint8 and samples.std() > 0
  np.testing.assert_array_equal(indices, np.arange(12))
  np.testing.assert_array_equal(sample_files.read(path)[0], samples)
  before = _snapshot(workdir)
  with pytest.raises(ConfigError, match="already holds"):
    sample.run(_checked("sample"), workdir)
  assert _snapshot(workdir) == before


@pytest.mark.slow
def test_eval_mode_bpd_rate_distortion_and_fid(workdir):
  results = evaluate.run(_checked("eval", **{"eval.fid_num_samples": 16}), workdir)
  result = results["bpd"]
  out = os.path.join(workdir, "eval", "step_20")
  with open(os.path.join(out, "bpd.json")) as f:
    saved = json.load(f)
  assert saved == pytest.approx(result, nan_ok=True)
  assert saved["num_examples"] == 20 and saved["step"] == 20
  parts = saved["prior_bpd"] + saved["decoder_bpd"] + saved["diffusion_kl_bpd"]
  assert saved["total_bpd"] == pytest.approx(parts, rel=1e-5)
  assert 0 < saved["total_bpd_sem"] < saved["total_bpd"]
  rd = np.loadtxt(os.path.join(out, "rate_distortion.csv"), delimiter=",", skiprows=1)
  chex.assert_shape(rd, (100, 3))
  np.testing.assert_array_equal(rd[:, 0], np.arange(1, 101))
  # t = 1: everything but the decoder term L_0 has been sent; t = T: only the prior L_T.
  assert rd[0, 1] == pytest.approx(saved["total_bpd"] - saved["decoder_bpd"], rel=1e-4)
  assert rd[-1, 1] == pytest.approx(saved["prior_bpd"], rel=1e-4)
  assert np.all(np.diff(rd[:, 1]) <= 1e-6)  # Rate falls as fewer terms have been sent.
  assert os.path.getsize(os.path.join(out, "rate_distortion.png")) > 1000
  with open(os.path.join(out, "fid.json")) as f:
    fid = json.load(f)
  assert fid.pop("sampler") == results["fid"].pop("sampler")
  assert fid == pytest.approx(results["fid"], nan_ok=True)
  assert (fid["feature_network"], fid["reference_split"], fid["num_samples"], fid["step"]) == (
    "classifier",
    "train",
    16,
    20,
  )
  assert np.isfinite(fid["fid"]) and fid["fid"] > 0
  assert fid["samples"].startswith("generated")  # The 12 saved samples are too few.
  assert "'method': 'ddim', 'num_steps': 5" in fid["samples"]
  with pytest.raises(ConfigError, match="already holds"):
    evaluate.run(_checked("eval"), workdir)


def test_sample_of_a_missing_step_writes_nothing(workdir):
  before = _snapshot(workdir)
  with pytest.raises(ConfigError, match=r"No checkpoint at step 7.*available: \[10, 20\]"):
    sample.run(_checked("sample", **{"sampling.checkpoint_step": 7}), workdir)
  assert _snapshot(workdir) == before


def test_no_checkpoint(tmp_path):
  with pytest.raises(ConfigError, match="No checkpoint in"):
    sample.run(_checked("sample"), str(tmp_path))
  with pytest.raises(ConfigError, match="No checkpoint in"):
    evaluate.run(_checked("eval"), str(tmp_path))
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_fid_over_training_scores_every_kept_checkpoint_and_resumes(workdir):
  """keep_every_steps kept step 10 beside the newest (keep_checkpoints=1); the sweep writes
  fid.json per step and the CSV / PNG over all, and a rerun reads, not recomputes."""
  config = _checked("eval", **{"eval.fid_num_samples": 16, "eval.checkpoint_steps": "all"})
  result = evaluate.run(config, workdir)
  assert [r["step"] for r in result["fid_over_training"]] == [10, 20]
  assert result["best"]["fid"] == min(r["fid"] for r in result["fid_over_training"])
  csv = os.path.join(workdir, "eval", "fid_over_training.csv")
  rows = np.loadtxt(csv, delimiter=",", skiprows=1)
  np.testing.assert_allclose(
    rows[:, :2], [[r["step"], r["fid"]] for r in result["fid_over_training"]], rtol=1e-5
  )
  assert os.path.getsize(csv.replace(".csv", ".png")) > 1000
  scored = {
    s: os.path.getmtime(os.path.join(workdir, "eval", f"step_{s}", "fid.json")) for s in (10, 20)
  }
  again = evaluate.run(config, workdir)  # Resumed: nothing is recomputed.
  assert again["fid_over_training"] == result["fid_over_training"]
  assert {
    s: os.path.getmtime(os.path.join(workdir, "eval", f"step_{s}", "fid.json")) for s in (10, 20)
  } == scored
  with pytest.raises(
    ConfigError,
    match=r"no checkpoint at step\(s\) \[15\]; available: "
    r"\[10, 20\]",
  ):
    evaluate.run(
      _checked("eval", **{"eval.fid_num_samples": 16, "eval.checkpoint_steps": "10,15"}), workdir
    )


def test_fid_gathers_statistics_not_images(workdir, sample_set, monkeypatch):
  """The FID path, with the multi-host collectives switched on (one process): what crosses
  hosts does not grow with the number of samples and is never an image, whether the
  samples are read from the shards (10 or 12 of the 12) or generated (16). Reading
  the saved samples and generating them again give the same FID."""
  from jax.experimental import multihost_utils

  from ddpm_jax.evaluation import sample_quality

  config = _checked("eval", **{"eval.fid_num_samples": 12})
  params, _ = checkpointing.restore_ema_params(config, workdir, 20)
  cache = os.path.join(workdir, "eval", "cache")

  def score(num, chunks=None):
    if chunks is None:  # What --mode=eval scores: the saved set if it holds enough.
      chunks, source = evaluate._fid_samples(config, workdir, params, 20, num)
      assert (source == sample_set) == (num <= 12), source
    return sample_quality.score_samples(chunks, num, config, cache_dir=cache)

  fresh = score(12, generation.local_batches(config, params, 12, seed=0))  # Warms the caches.
  sent, real = [], multihost_utils.process_allgather

  def spy(tree, tiled=False):
    sent.extend(np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree))
    return real(tree, tiled=tiled)

  monkeypatch.setattr(hosts, "multi", lambda: True)
  monkeypatch.setattr(multihost_utils, "process_allgather", spy)
  traffic = {}
  for num in (10, 12, 16):
    result = score(num)
    assert result["num_samples"] == num and np.isfinite(result["fid"])
    assert not any(a.shape[-3:] == (8, 8, 3) for a in sent)
    traffic[num] = sum(a.nbytes for a in sent)
    sent.clear()
    if num == 12:
      # The same images, batched differently: the features of two programs and the
      # float64 rounding of the merges.
      assert result["fid"] == pytest.approx(fresh["fid"], rel=1e-7)
      assert result["inception_score"] == pytest.approx(fresh["inception_score"], rel=1e-12)
  assert len(set(traffic.values())) == 1 and traffic[10] > 0, traffic
