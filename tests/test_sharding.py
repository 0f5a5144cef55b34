"""Sharded training on 8 fake CPU devices, two real processes, mesh changes, SIGTERM."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import tiny
from jsae import checkpoint, sharding, train
from jsae.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
STEPS = 20


def _config(data, model, steps=STEPS, **kw):
  c = tiny.get_config()
  c.mesh.data, c.mesh.model = data, model
  c.train.num_tokens = steps * c.data.batch_size
  c.ckpt.every_steps = kw.pop("every", steps)
  c.train.log_every = 10
  return c


def _params_np(state):
  return {k: np.asarray(v) for k, v in vars(state.params).items() if isinstance(v, jax.Array)}


def _final_params(workdir, config):
  """Parameters of the latest checkpoint in `workdir`, restored onto one device."""
  manager = checkpoint.make_manager(workdir)
  opt = train.optim.make_optimizer(config.optim, total_steps=1)
  abstract = jax.eval_shape(
      lambda k: train.create_state(k, config=config, optimizer=opt), jax.random.key(0))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract)
  state, _ = checkpoint.restore(manager, abstract)
  manager.close()
  return _params_np(state)


def _assert_close(a, b, rtol=1e-5):
  for k in a:
    scale = np.abs(a[k]).max() + 1e-12
    np.testing.assert_allclose(b[k], a[k], rtol=0, atol=rtol * scale, err_msg=k)


@pytest.fixture(scope="module")
def single_device_params(tmp_path_factory):
  result = train.train(_config(1, 1), tmp_path_factory.mktemp("single"), progress=False)
  return _params_np(result.state)


@pytest.mark.parametrize("data,model", [(8, 1), (1, 8), (2, 4)])
def test_sharded_training_equals_single_device(tmp_path, single_device_params, data, model):
  assert jax.device_count() == 8
  result = train.train(_config(data, model), tmp_path, progress=False)
  W_enc = result.state.params.W_enc
  assert W_enc.sharding.spec == train.saes.get("jumprelu").param_spec_table["W_enc"]
  assert len(W_enc.sharding.device_set) == 8
  _assert_close(single_device_params, _params_np(result.state))


def test_state_specs_follow_parameters():
  c = _config(2, 4)
  opt = train.optim.make_optimizer(c.optim, total_steps=10)
  abstract = jax.eval_shape(lambda k: train.create_state(k, config=c, optimizer=opt),
                            jax.random.key(0))
  specs = sharding.state_specs(abstract, train.saes.get("jumprelu"))
  P = jax.sharding.PartitionSpec
  assert specs.params.W_dec == P("model", None) and specs.params.b_dec == P()
  nu = [s for s in jax.tree.leaves(specs.opt_state, is_leaf=lambda x: isinstance(x, P))]
  assert P(None, "model") in nu and P("model", None) in nu  # Adam's nu follows W_enc, W_dec
  assert specs.steps_since_fired == P("model") and specs.step == P()


def test_per_device_bytes_equals_the_shards_jax_places():
  c = _config(2, 4)
  opt = train.optim.make_optimizer(c.optim, total_steps=10)
  state = train.create_state(jax.random.key(0), config=c, optimizer=opt)
  specs = sharding.state_specs(state, train.saes.get("jumprelu"))
  mesh = sharding.make_mesh(c.mesh)
  placed = jax.device_put(state, sharding.named(mesh, specs))
  device = mesh.devices.flat[0]
  on_device = sum(s.data.nbytes for leaf in jax.tree.leaves(placed)
                  for s in leaf.addressable_shards if s.device == device)
  assert sharding.per_device_bytes(state, specs, dict(mesh.shape)) == on_device
  whole = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
  assert sharding.per_device_bytes(state, specs, {}) == whole

def test_indivisible_shapes_are_clear_errors(tmp_path):
  c = _config(1, 8)
  c.sae.d_sae = 252
  with pytest.raises(ConfigError, match="d_sae=252 is not divisible by the mesh's model axis"):
    train.train(c, tmp_path, progress=False)
  c = _config(8, 1)
  c.data.batch_size = 500
  c.train.num_tokens = 5000
  with pytest.raises(ConfigError, match="batch_size=500 is not divisible"):
    train.train(c, tmp_path, progress=False)
  with pytest.raises(ConfigError, match="does not use the 8 available devices"):
    sharding.mesh_shape(_config(3, -1).mesh, 8)


def test_restore_onto_a_different_mesh(tmp_path):
  """Saved on 2x4, resumed on 1x4: ends where an uninterrupted 2x4 run ends."""
  straight = train.train(_config(2, 4, steps=2 * STEPS), tmp_path / "straight", progress=False)
  train.train(_config(2, 4, steps=STEPS), tmp_path / "moved", progress=False)
  resumed = train.train(_config(1, 4, steps=2 * STEPS), tmp_path / "moved", progress=False)
  assert len(resumed.state.params.W_enc.sharding.device_set) == 4
  _assert_close(_params_np(straight.state), _params_np(resumed.state))


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", **extra)
  return env


@pytest.mark.multiprocess
def test_two_processes_train_like_one(tmp_path, single_device_params):
  """Two real processes x 4 CPU devices (jax.distributed, gloo) = one process x 8."""
  config_args = ["--config=configs/tiny.py", f"--workdir={tmp_path}/mp", "--config.mesh.data=2",
                 "--config.mesh.model=4", f"--config.train.num_tokens={STEPS * 512}",
                 f"--config.ckpt.every_steps={STEPS}"]
  run = subprocess.run(["bash", "launch/local.sh", *config_args], cwd=REPO, text=True,
                       capture_output=True, timeout=300,
                       env=_env(NUM_PROCESSES="2", DEVICES_PER_PROCESS="4",
                                LOG_DIR=str(tmp_path / "logs"), PYTHON=sys.executable))
  assert run.returncode == 0, run.stderr + "".join(
      p.read_text()[-2000:] for p in (tmp_path / "logs").glob("*.log"))
  _assert_close(single_device_params, _final_params(tmp_path / "mp", _config(2, 4)))


def test_sigterm_saves_and_resume_matches_uninterrupted(tmp_path):
  steps = 400
  args = [sys.executable, "-m", "jsae.cli", "train", "--config=configs/tiny.py",
          f"--workdir={tmp_path}/run", f"--config.train.num_tokens={steps * 512}",
          "--config.ckpt.every_steps=1000", "--config.train.log_every=10",
          "--config.mesh.data=1", "--config.mesh.model=1"]
  proc = subprocess.Popen(args, cwd=REPO, env=_env(), text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  metrics = tmp_path / "run/metrics.jsonl"
  deadline = time.time() + 120
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "stopped by SIGTERM" in out
  saved = sorted(int(p.name) for p in (tmp_path / "run/checkpoints").iterdir() if p.name.isdigit())
  assert len(saved) == 1 and 20 <= saved[0] < steps  # mid-run, not a scheduled checkpoint
  finished = subprocess.run(args, cwd=REPO, env=_env(), text=True, capture_output=True, timeout=300)
  assert finished.returncode == 0, finished.stderr
  config = _config(1, 1, steps=steps, every=1000)
  straight = train.train(config, tmp_path / "straight", progress=False)
  resumed = _final_params(tmp_path / "run", config)
  for k, v in _params_np(straight.state).items():
    np.testing.assert_array_equal(resumed[k], v, err_msg=k)
