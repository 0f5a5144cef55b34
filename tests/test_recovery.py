"""Recoverable failures: divergence then resume with a fix, damaged checkpoints,
Ctrl-C, and runs that fail without NaN."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from test_train import _tiny
from jsae import checkpoint, data, loop, optim, resume, runs, train
from jsae import config as config_lib


class _Wrapped:
  """An ActivationSource that delegates to another and changes `batch`."""

  def __init__(self, inner, batch):
    self.inner, self._batch = inner, batch

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def batch(self, step):
    return self._batch(self.inner, step)

  def close(self):
    self.inner.close()


def _poisoned(config, from_step):
  return _Wrapped(data.make_source(config), lambda inner, step: np.asarray(
      inner.batch(step)) * (np.nan if step >= from_step else 1.0))


def _metric_steps(workdir):
  return [json.loads(l)["step"] for l in (Path(workdir) / "metrics.jsonl").read_text().split("\n")
          if l.strip()]


def test_divergence_then_resume_with_allowed_lr_change(tmp_path):
  config = _tiny(train__num_tokens=100 * 512, ckpt__every_steps=40, train__log_every=10)
  with pytest.raises(train.TrainingDivergedError) as e:
    train.train(config, tmp_path, progress=False, source=_poisoned(config, 55))
  message = str(e.value)
  assert "between step 50 and step 60" in message  # batch 55 is step 56, seen at the log of 60
  assert "last good checkpoint is step 40" in message and "--allow_changes=optim.lr" in message

  lower = _tiny(train__num_tokens=100 * 512, ckpt__every_steps=40, train__log_every=10,
                optim__lr=config.optim.lr / 4)
  with pytest.raises(config_lib.ConfigError, match=r"optim.lr: checkpoint .*--allow_changes=optim.lr"):
    train.train(lower, tmp_path, progress=False)
  result = train.train(lower, tmp_path, progress=False, allow_changes=("optim.lr",))
  assert result.steps == 100 and np.isfinite(result.metrics["loss"])
  assert _metric_steps(tmp_path) == list(range(10, 101, 10))  # 50-60 redone, once each
  history = resume.read_history(tmp_path)
  assert [h["event"] for h in history] == ["diverged", "resumed_with_changes"]
  assert history[0]["step"] == 60 and history[0]["last_good_checkpoint"] == 40
  assert history[1]["step"] == 40
  assert history[1]["changes"]["optim.lr"] == {"checkpoint": config.optim.lr,
                                               "now": config.optim.lr / 4}
  # The next resume compares against the new value: no --allow_changes needed.
  longer = _tiny(train__num_tokens=120 * 512, ckpt__every_steps=40, train__log_every=10,
                 optim__lr=config.optim.lr / 4)
  assert train.train(longer, tmp_path, progress=False).steps == 120


def test_adding_gradient_clipping_on_resume_keeps_adam_state(tmp_path):
  config = _tiny(train__num_tokens=40 * 512, ckpt__every_steps=40)
  first = train.train(config, tmp_path, progress=False)
  clipped = _tiny(train__num_tokens=41 * 512, ckpt__every_steps=40, optim__clip_grad_norm=1.0)
  result = train.train(clipped, tmp_path, progress=False,
                       allow_changes=("optim.clip_grad_norm",))
  assert result.steps == 41
  # One more step from the restored Adam moments: nu grows from the saved value, it
  # does not restart from zero (a fresh nu would be (1-b2) g^2, far below the saved one).
  saved_nu = [s for s in first.state.opt_state if hasattr(s, "nu")][0].nu.W_dec
  new_nu = [s for s in result.state.opt_state if hasattr(s, "nu")][0].nu.W_dec
  b2 = config.optim.b2
  assert np.all(np.asarray(new_nu) >= b2 * np.asarray(saved_nu) * (1 - 1e-6))


def test_transplant_chain_state_maps_stateful_parts_in_order():
  params = {"w": np.ones(3, np.float32)}
  plain = optax.chain(optax.scale_by_adam(), optax.scale(-1.0))
  clipped = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.scale(-1.0))
  saved = plain.init(params)
  saved = (saved[0]._replace(mu={"w": np.full(3, 7.0, np.float32)}),) + saved[1:]
  moved = optim.transplant_chain_state(saved, clipped.init(params))
  assert jax.tree.structure(moved) == jax.tree.structure(clipped.init(params))
  np.testing.assert_array_equal(moved[1].mu["w"], 7.0)
  with pytest.raises(ValueError, match="new --workdir"):
    optim.transplant_chain_state(saved, optax.chain(optax.sgd(0.1)).init(params))


@pytest.mark.parametrize("field,match", [("sae.d_sae", "defines the run itself"),
                                         ("optim.no_such_field", "not a config field")])
def test_allow_changes_refuses_identity_and_unknown_fields(field, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    resume.parse_allow_changes(field, _tiny())


def _damage(workdir, step):
  """Truncates every data file of checkpoint `step`'s state (a crash mid-copy)."""
  files = list((Path(workdir) / "checkpoints" / str(step) / "state").rglob("d/*"))
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(8)


def test_truncated_newest_checkpoint_falls_back_and_resumes_exactly(tmp_path, capsys):
  straight = train.train(_tiny(train__num_tokens=60 * 512, ckpt__every_steps=20), tmp_path / "a",
                         progress=False)
  run = tmp_path / "b"
  train.train(_tiny(train__num_tokens=40 * 512, ckpt__every_steps=20), run, progress=False)
  _damage(run, 40)

  # Readers fall back to the newest intact step, saying so; an explicit step is refused.
  messages = []
  assert runs.read_run(run, say=messages.append).step == 20
  assert "checkpoint step 40" in messages[0] and "damaged" in messages[0]
  with pytest.raises(runs.RunError, match=r"step 40 .* damaged.*--step \(available: \[20\]\)"):
    runs.read_run(run, step=40)

  resumed = train.train(_tiny(train__num_tokens=60 * 512, ckpt__every_steps=20), run,
                        progress=False)
  out = capsys.readouterr().out
  assert "damaged" in out and "resuming from step 20" in out
  assert (run / "damaged_checkpoints" / "40").is_dir()  # kept, not deleted
  assert sorted(int(s) for s in os.listdir(run / "checkpoints")) == [40, 60]
  for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_damaged_checkpoint_read_prints_no_orbax_tracebacks(tmp_path):
  """Orbax's failed reader coroutines echo the error as tracebacks, some when collected,
  after jsae's one-line message: reading a damaged run from Python shows only that line."""
  train.train(_tiny(train__num_tokens=40 * 512, ckpt__every_steps=20), tmp_path, progress=False)
  _damage(tmp_path, 40)
  code = f"import jsae; print(jsae.runs.read_sae({str(tmp_path)!r}).provenance['step'])"
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0 and done.stdout.strip() == "20", done.stderr
  assert "checkpoint step 40" in done.stderr and "damaged" in done.stderr
  assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr


def test_every_checkpoint_damaged_is_an_error_naming_the_step(tmp_path):
  train.train(_tiny(train__num_tokens=20 * 512, ckpt__every_steps=20), tmp_path, progress=False)
  _damage(tmp_path, 20)
  with pytest.raises(checkpoint.CheckpointDamagedError, match="step 20"):
    runs.read_run(tmp_path, say=lambda m: None)


def _interrupting(config, at_step, times=1):
  def batch(inner, step):
    if step == at_step:
      for _ in range(times):
        os.kill(os.getpid(), signal.SIGINT)
    return inner.batch(step)
  return _Wrapped(data.make_source(config), batch)


def test_ctrl_c_saves_a_checkpoint_and_resumes_exactly(tmp_path):
  config = _tiny(train__num_tokens=60 * 512, ckpt__every_steps=50)
  straight = train.train(config, tmp_path / "a", progress=False)
  stopped = train.train(config, tmp_path / "b", progress=False,
                        source=_interrupting(config, at_step=12))
  assert stopped.preempted and stopped.stop_reason == "Ctrl-C" and stopped.steps == 13
  assert checkpoint.make_manager(tmp_path / "b").all_steps() == [13]
  resumed = train.train(config, tmp_path / "b", progress=False)
  for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_second_ctrl_c_exits_at_once(tmp_path):
  config = _tiny(train__num_tokens=60 * 512, ckpt__every_steps=50)
  with pytest.raises(KeyboardInterrupt):
    train.train(config, tmp_path, progress=False, source=_interrupting(config, 12, times=2))
  assert checkpoint.make_manager(tmp_path).all_steps() == []


def test_exploding_run_without_nan_warns(tmp_path):
  config = _tiny(train__num_tokens=300 * 512, optim__lr=10.0, optim__warmup_steps=0,
                 ckpt__every_steps=300)
  result = train.train(config, tmp_path, progress=False)
  assert all(np.isfinite(v) for v in result.metrics.values())
  assert result.warnings and "FVU" in result.warnings[-1]
  healthy = train.train(_tiny(train__num_tokens=300 * 512), tmp_path / "ok", progress=False)
  assert healthy.warnings == []


def test_health_warning_thresholds():
  c = _tiny()
  late = max(c.optim.warmup_steps, c.loss.dead_window_steps) + 1
  assert loop.health_warning({"fvu": 5.0, "dead_frac": 0.0}, late, c)
  assert "dead" in loop.health_warning({"fvu": 0.5, "dead_frac": 1.0}, late, c)
  assert loop.health_warning({"fvu": 0.5, "dead_frac": 0.5}, late, c) is None
  assert loop.health_warning({"fvu": 5.0, "dead_frac": 1.0}, 1, c) is None  # still warming up
