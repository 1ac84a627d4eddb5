"""Released weights in and out (ddpm_jax/pretrained*.py), offline.

Random weights are written in the official TF1 format (tf.compat.v1 Saver: EMA shadows,
other raw weights, Adam slots, global_step) and as diffusers UNet2DModel folders, with the
names of tests/_released_weights.py, which follows the official code's structure and not
ddpm_jax's tables. Checked: the names and shapes of the paper's CIFAR-10 and 256x256
layouts; that both formats load the same EMA weights; that ddpm_jax's U-Net then computes
diffusers' outputs (needs diffusers: `pip install -e '.[bench]'`, else skipped) and that an
export loads back and in diffusers unchanged; every refusal; the command line end to end
(import, fine-tuning with --mode=train, export; sampling and evaluating an imported workdir
on one and on two processes is tests/test_multiprocess.py's).
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import cifar10, lsun_church, test_tiny
from ddpm_jax import (
  checkpointing,
  factories,
  pretrained,
  pretrained_files,
  pretrained_names,
)
from ddpm_jax.errors import ConfigError
from tests import _fault_tools as ft
from tests import _released_weights as rw
from tests.conftest import tiny_config

_NO_DIFFUSERS = "the diffusers oracle needs diffusers and torch: pip install -e '.[bench]'"
LAYOUTS = {"tiny": rw.TINY, "small": rw.SMALL}
STEP = 790


def _config(layout: rw.Layout):
  return tiny_config(**layout.overrides())


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(jax.device_get(tree))


def _assert_same_tree(a, b) -> None:
  flat_a, flat_b = _flat(a), _flat(b)
  assert sorted(flat_a) == sorted(flat_b)
  for path, value in flat_a.items():
    np.testing.assert_array_equal(value, flat_b[path], err_msg=str(path))


@dataclasses.dataclass
class Released:
  layout: rw.Layout
  weights: dict  # official name -> EMA weight
  raw: dict  # official name -> raw weight
  checkpoint: str
  folder: str  # diffusers folder with the legacy attention names


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict[str, Released]:
  pytest.importorskip("tensorflow", reason="writing TF1 checkpoints needs TensorFlow")
  out = {}
  for seed, (name, layout) in enumerate(LAYOUTS.items()):
    root = tmp_path_factory.mktemp(name)
    weights = rw.random_weights(rw.official_variables(layout), seed)
    raw = rw.write_official(str(root / "model.ckpt-790"), weights, step=STEP)
    rw.write_diffusers(str(root / "diffusers"), weights, layout, legacy=True)
    out[name] = Released(
      layout, weights, raw, str(root / "model.ckpt-790"), str(root / "diffusers")
    )
  return out


def _by_official_name(params) -> dict[str, np.ndarray]:
  return {pretrained_names.official_name(p): v for p, v in _flat(params).items()}


# ------------------------------------------------------------------ names and shapes


@pytest.mark.parametrize(
  "layout,config,count", [(rw.CIFAR10, cifar10, 35_746_307), (rw.LSUN, lsun_church, 113_673_219)]
)
def test_official_names_and_shapes_of_the_paper_layouts(layout, config, count):
  """Every variable of the official U-Net is one weight of ddpm_jax's, of the same shape."""
  official = rw.official_variables(layout)
  ours = {
    pretrained_names.official_name(p): s
    for p, s in pretrained_names.model_shapes(config.get_config()).items()
  }
  assert ours == official
  assert sum(int(np.prod(s)) for s in official.values()) == count


def test_diffusers_names_and_shapes_of_the_cifar10_layout():
  """ddpm_jax's diffusers names and torch shapes are those of the convert script's naming
  and, where diffusers is installed, of UNet2DModel itself."""
  config = cifar10.get_config()
  shapes = pretrained_names.model_shapes(config)
  ours = {
    pretrained_names.diffusers_name(p, 4): pretrained_names.diffusers_shape(p, s)
    for p, s in shapes.items()
  }
  official = rw.official_variables(rw.CIFAR10)
  theirs = {
    rw.diffusers_key(n, rw.CIFAR10): rw.torch_layout(n, np.zeros(s)).shape
    for n, s in official.items()
  }
  assert ours == theirs
  torch = pytest.importorskip("torch", reason=_NO_DIFFUSERS)
  diffusers = pytest.importorskip("diffusers", reason=_NO_DIFFUSERS)
  with torch.device("meta"):
    model = diffusers.UNet2DModel(**pretrained_names.diffusers_config(config))
  assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == ours


# ------------------------------------------------------------------ loading


@pytest.mark.parametrize("name", LAYOUTS)
def test_an_official_checkpoint_gives_its_ema_shadows_and_step(released, name):
  rel = released[name]
  loaded = pretrained.load(rel.checkpoint, _config(rel.layout))
  assert loaded.source == "official" and loaded.step == STEP
  assert _by_official_name(loaded.params).keys() == rel.weights.keys()
  for n, value in _by_official_name(loaded.params).items():
    np.testing.assert_array_equal(value, rel.weights[n], err_msg=n)
  for n, value in _by_official_name(loaded.raw_params).items():
    np.testing.assert_array_equal(value, rel.raw[n], err_msg=n)


def test_diffusers_folders_give_the_same_weights(released, tmp_path):
  """Legacy and current attention names, safetensors and a torch .bin (read without torch;
  written here with non-contiguous tensors) all load the official checkpoint's EMA weights."""
  rel = released["small"]
  config = _config(rel.layout)
  expected = pretrained.load_params(rel.checkpoint, config)
  _assert_same_tree(pretrained.load_params(rel.folder, config), expected)
  rw.write_diffusers(str(tmp_path / "current"), rel.weights, rel.layout)
  _assert_same_tree(pretrained.load_params(str(tmp_path / "current"), config), expected)
  torch = pytest.importorskip("torch", reason="writing a .bin needs torch")
  tensors = rw.diffusers_tensors(rel.weights, rel.layout)
  state = {
    k: torch.from_numpy(np.ascontiguousarray(np.swapaxes(v, 0, -1))).transpose(0, -1)
    for k, v in tensors.items()
  }
  assert not all(t.is_contiguous() for t in state.values())
  os.makedirs(tmp_path / "bin")
  torch.save(state, tmp_path / "bin" / pretrained_files.BIN_FILE)
  (tmp_path / "bin" / "config.json").write_text(json.dumps(rw.diffusers_config(rel.layout)))
  _assert_same_tree(pretrained.load_params(str(tmp_path / "bin"), config), expected)


def _diffusers_outputs(folder: str, x: np.ndarray, t: np.ndarray) -> np.ndarray:
  torch = pytest.importorskip("torch", reason=_NO_DIFFUSERS)
  diffusers = pytest.importorskip("diffusers", reason=_NO_DIFFUSERS)
  model = diffusers.UNet2DModel.from_pretrained(folder).eval()
  with torch.no_grad():
    out = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t).long()).sample
  return out.permute(0, 2, 3, 1).numpy()


def _inputs(layout: rw.Layout) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(7)
  x = rng.normal(size=(3, layout.image_size, layout.image_size, 3)).astype(np.float32)
  return x, np.array([0, 417, 999], np.int32)


def _ddpm_jax_outputs(params, config, x, t) -> np.ndarray:
  model = factories.create_model(config)
  return np.asarray(model.apply({"params": params}, x, t, train=False))


@pytest.mark.parametrize("name", ["tiny", pytest.param("small", marks=pytest.mark.slow)])
def test_the_unet_computes_diffusers_outputs_on_the_official_weights(released, name):
  """Within 1e-4 of the output's scale (float32, other operation orders)."""
  rel = released[name]
  config = _config(rel.layout)
  x, t = _inputs(rel.layout)
  theirs = _diffusers_outputs(rel.folder, x, t)
  ours = _ddpm_jax_outputs(pretrained.load_params(rel.checkpoint, config), config, x, t)
  scale = float(np.max(np.abs(theirs)))
  assert scale > 0.5  # Random weights everywhere: no near-zero output head.
  assert float(np.max(np.abs(ours - theirs))) < 1e-4 * scale


# ------------------------------------------------------------------ export


def test_an_export_is_the_diffusers_folder_of_the_same_weights(released, tmp_path):
  """Export writes the tensors of the convert script's naming and a config.json under which
  the folder loads back unchanged."""
  rel = released["small"]
  config = _config(rel.layout)
  params = pretrained.load_params(rel.checkpoint, config)
  out = pretrained.export_diffusers(params, config, str(tmp_path / "export"))
  exported = pretrained_files.open_diffusers(out)
  expected = rw.diffusers_tensors(rel.weights, rel.layout)
  assert exported.shapes == {k: v.shape for k, v in expected.items()}
  for key, value in expected.items():
    np.testing.assert_array_equal(exported.read(key), value, err_msg=key)
  assert pretrained_names.diffusers_config_mismatch(exported.config, config) is None
  _assert_same_tree(pretrained.load_params(out, config), params)
  with pytest.raises(ConfigError, match="already holds"):
    pretrained.export_diffusers(params, config, out)


def test_diffusers_loads_an_export_and_computes_the_same_outputs(released, tmp_path):
  rel = released["small"]
  config = _config(rel.layout)
  params = pretrained.load_params(rel.checkpoint, config)
  out = pretrained.export_diffusers(params, config, str(tmp_path / "export"))
  x, t = _inputs(rel.layout)
  theirs = _diffusers_outputs(out, x, t)
  ours = _ddpm_jax_outputs(params, config, x, t)
  assert float(np.max(np.abs(ours - theirs))) < 1e-4 * float(np.max(np.abs(theirs)))


def test_export_refuses_a_layout_diffusers_lacks(tmp_path):
  config = _config(rw.TINY)
  config.model.resamp_with_conv = False
  with pytest.raises(ConfigError, match="resamp_with_conv=False"):
    pretrained.export_diffusers({}, config, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


# ------------------------------------------------------------------ refusals


def _official_file(
  variables: dict, *, ema: bool = True, drop_shadow: str = ""
) -> pretrained_files.TensorFile:
  """The names and shapes of an official checkpoint of ``variables`` (never read)."""
  shapes = {"global_step": (), "beta1_power": (), "beta2_power": ()}
  for name, shape in variables.items():
    shapes.update({name: shape, name + "/Adam": shape, name + "/Adam_1": shape})
    if ema and name != drop_shadow:
      shapes[name + rw.EMA] = shape
  return pretrained_files.TensorFile(
    "ckpt", "official", shapes, lambda n: np.zeros(shapes[n], np.float32), step=1
  )


def _refusal(file: pretrained_files.TensorFile, config, **kwargs) -> str:
  with pytest.raises(ConfigError) as info:
    pretrained.load_file(file, config, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_a_missing_tensor_is_named():
  variables = rw.official_variables(rw.TINY)
  del variables["model/up_1/attn_1/k/W"]
  message = _refusal(_official_file(variables), _config(rw.TINY))
  assert "does not fit the config's U-Net (model.ch=32, ch_mult=(1, 1)" in message
  assert "tensor model/up_1/attn_1/k/W is missing." in message
  assert message.endswith("No config in configs/ fits it.")


def test_a_missing_shadow_is_named():
  variables = rw.official_variables(rw.TINY)
  message = _refusal(
    _official_file(variables, drop_shadow="model/mid/block_2/conv2/b"), _config(rw.TINY)
  )
  assert message == ("ckpt: tensor model/mid/block_2/conv2/b/ExponentialMovingAverage is missing.")


def test_an_extra_tensor_is_named():
  variables = rw.official_variables(rw.TINY)
  variables["model/mid/attn_2/q/W"] = (64, 64)
  message = _refusal(_official_file(variables), _config(rw.TINY))
  assert "it has a tensor model/mid/attn_2/q/W that the config's U-Net" in message


def test_a_shape_mismatch_is_named():
  variables = rw.official_variables(rw.TINY)
  variables["model/conv_out/W"] = (3, 3, 32, 6)
  message = _refusal(_official_file(variables), _config(rw.TINY))
  assert message.startswith(
    "ckpt: model/conv_out/W has shape [3, 3, 32, 6] where the config's U-Net"
  )
  assert "has [3, 3, 32, 3]." in message


def test_the_config_that_fits_is_named():
  """An official CIFAR-10 checkpoint given the tiny config; a diffusers folder of
  configs/test_tiny.py's layout given another config."""
  message = _refusal(_official_file(rw.official_variables(rw.CIFAR10)), _config(rw.TINY))
  assert message.endswith("configs/cifar10.py fits it.")
  tiny = test_tiny.get_config()
  tiny_layout = rw.Layout(
    tiny.model.ch,
    tuple(tiny.model.ch_mult),
    tiny.model.num_res_blocks,
    tuple(tiny.model.attn_resolutions),
    tiny.data.image_size,
  )
  shapes = {
    rw.diffusers_key(n, tiny_layout): rw.torch_layout(n, np.zeros(s)).shape
    for n, s in rw.official_variables(tiny_layout).items()
  }
  folder = pretrained_files.TensorFile(
    "folder", "diffusers", shapes, lambda n: None, config=rw.diffusers_config(tiny_layout)
  )
  assert _refusal(folder, _config(rw.SMALL)).endswith("configs/test_tiny.py fits it.")


def test_official_weights_need_the_official_32_groups():
  message = _refusal(_official_file(rw.official_variables(rw.TINY)), tiny_config())
  assert message.startswith("model.num_groups=8, but the official U-Net normalises with 32")


def test_no_ema_shadows_is_refused_unless_the_raw_weights_are_asked_for(tmp_path):
  pytest.importorskip("tensorflow", reason="writing TF1 checkpoints needs TensorFlow")
  weights = rw.random_weights(rw.official_variables(rw.TINY), 3)
  prefix = str(tmp_path / "model.ckpt-5")
  rw.write_official(prefix, weights, step=5, ema=False)
  with pytest.raises(
    ConfigError, match=r"holds no ExponentialMovingAverage shadows .* pass --weights=raw"
  ):
    pretrained.load(prefix, _config(rw.TINY))
  loaded = pretrained.load(prefix + ".index", _config(rw.TINY), weights="raw")
  assert loaded.raw_params is None and loaded.step == 5
  for name, value in _by_official_name(loaded.params).items():
    np.testing.assert_array_equal(value, weights[name], err_msg=name)


@pytest.mark.parametrize(
  "change,named",
  [
    ({"freq_shift": 0}, "freq_shift=0 (ddpm_jax computes with freq_shift=1)"),
    (
      {"attention_head_dim": "absent"},
      "attention_head_dim=8 (ddpm_jax computes with attention_head_dim=None)",
    ),
    ({"norm_eps": 1e-5}, "norm_eps=1e-05"),
    ({"sample_size": 32}, "sample_size=32"),
    ({"up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"]}, "up_block_types="),
  ],
)
def test_a_diffusers_config_that_computes_another_function_is_refused(tmp_path, change, named):
  weights = rw.random_weights(rw.official_variables(rw.SMALL), 0)
  config_json = rw.diffusers_config(rw.SMALL)
  for key, value in change.items():
    if value == "absent":
      del config_json[key]
    else:
      config_json[key] = value
  rw.write_diffusers(str(tmp_path), weights, rw.SMALL, config=config_json)
  with pytest.raises(ConfigError) as info:
    pretrained.load_params(str(tmp_path), _config(rw.SMALL))
  assert named in str(info.value) and "\n" not in str(info.value)


def test_neither_format_is_refused(tmp_path):
  with pytest.raises(ConfigError, match="is neither a TF1 checkpoint"):
    pretrained.load_params(str(tmp_path), _config(rw.TINY))


# ------------------------------------------------------------------ the command line


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "ddpm_jax.pretrained", *args],
    cwd=ft.REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
    env=dict(os.environ, XLA_FLAGS=""),
  )


TINY_ARGS = ["--config=configs/test_tiny.py", *rw.TINY.flags()]


@pytest.fixture(scope="module")
def imported(released, tmp_path_factory):
  """A workdir imported by the command line from the tiny official checkpoint."""
  workdir = tmp_path_factory.mktemp("cli") / "wd"
  result = _cli(f"--input={released['tiny'].checkpoint}", *TINY_ARGS, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  srv = ft.MainServer(
    str(tmp_path_factory.mktemp("logs")),
    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
  )
  yield srv
  srv.close()


def _main(server, workdir, *flags: str) -> ft.Result:
  return server.run(
    [
      "--config",
      "configs/test_tiny.py",
      *rw.TINY.flags(),
      "--config.training.sample_every_steps=0",
      f"--workdir={workdir}",
      *flags,
    ],
    timeout=300,
  )


@pytest.mark.slow
def test_fine_tuning_resumes_at_the_step_with_a_fresh_optimizer(
  released, imported, server, tmp_path
):
  """--mode=train on the imported workdir: it resumes at the file's step from the raw
  weights, with a fresh Adam (zero moments, count 0), so the learning rate warms up again:
  lr * 0 / warmup_steps at the first step, logged as such. (Sampling and evaluating an
  imported workdir: tests/test_multiprocess.py, on one process and on two.)"""
  workdir = tmp_path / "wd"
  shutil.copytree(imported, workdir)
  state = checkpointing.Checkpointer(str(workdir), read_only=True)
  try:
    raw, step = state.restore_params(which="params")
  finally:
    state.close()
  assert step == STEP
  for name, value in _by_official_name(raw).items():
    np.testing.assert_array_equal(value, released["tiny"].raw[name], err_msg=name)
  result = _main(
    server,
    workdir,
    "--mode=train",
    f"--config.training.num_train_steps={STEP + 1}",
    "--config.training.warmup_steps=10",
    "--config.training.log_every_steps=1",
  )
  assert result.rc == 0, result.stderr[-3000:]
  assert f"Resumed from the checkpoint at step {STEP} in" in result.stderr
  lines = [line for line in result.stderr.splitlines() if f"step {STEP + 1}/{STEP + 1} " in line]
  assert len(lines) == 1 and " lr 0 " in lines[0], lines
  assert os.path.isdir(workdir / "checkpoints" / str(STEP + 1))


def test_export_writes_the_workdirs_ema_weights(released, imported, tmp_path):
  out = tmp_path / "unet"
  result = _cli("--export=diffusers", f"--workdir={imported}", f"--output={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  params = pretrained.load_params(str(out), _config(rw.TINY))
  for name, value in _by_official_name(params).items():
    np.testing.assert_array_equal(value, released["tiny"].weights[name], err_msg=name)


@pytest.mark.parametrize(
  "args,message",
  [
    (["--workdir={wd}", "--input={ckpt}", *TINY_ARGS], "already holds checkpoints"),
    (["--workdir={tmp}/new", "--input={ckpt}"], "importing needs --config"),
  ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(
  released, imported, tmp_path, args, message
):
  before = ft.snapshot(str(imported))
  result = _cli(
    *[a.format(wd=imported, ckpt=released["tiny"].checkpoint, tmp=tmp_path) for a in args]
  )
  assert result.returncode == 2
  assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
  assert message in result.stderr
  assert ft.snapshot(str(imported)) == before
  assert not os.path.exists(tmp_path / "new")


@pytest.mark.slow
def test_the_cifar10_layout_end_to_end(tmp_path):
  """The CIFAR-10 layout (35.7M parameters) in both formats with the same random weights:
  the same params; ddpm_jax's outputs are diffusers' within 1e-4 of their scale, before and
  after an export. Minutes on a CPU: `python -m pytest -n 0 -m slow -s tests/test_pretrained.py`
  (prints the measured differences)."""
  pytest.importorskip("tensorflow", reason="writing TF1 checkpoints needs TensorFlow")
  layout, config = rw.CIFAR10, cifar10.get_config()
  weights = rw.random_weights(rw.official_variables(layout), 11)
  rw.write_official(str(tmp_path / "model.ckpt-790000"), weights, step=790_000)
  rw.write_diffusers(str(tmp_path / "folder"), weights, layout, legacy=True)
  loaded = pretrained.load(str(tmp_path / "model.ckpt-790000"), config)
  assert loaded.step == 790_000
  _assert_same_tree(pretrained.load_params(str(tmp_path / "folder"), config), loaded.params)
  export = pretrained.export_diffusers(loaded.params, config, str(tmp_path / "export"))
  _assert_same_tree(pretrained.load_params(export, config), loaded.params)
  x, t = _inputs(layout)
  ours = _ddpm_jax_outputs(loaded.params, config, x, t)
  theirs = {name: _diffusers_outputs(str(tmp_path / name), x, t) for name in ("folder", "export")}
  scale = float(np.max(np.abs(theirs["folder"])))
  diffs = {name: float(np.max(np.abs(ours - out))) for name, out in theirs.items()}
  print(
    json.dumps(
      {
        "layout": "cifar10",
        "output_max_abs": scale,
        "max_abs_diff": diffs,
        "relative": {k: v / scale for k, v in diffs.items()},
      }
    )
  )
  assert scale > 0.5 and max(diffs.values()) < 1e-4 * scale
