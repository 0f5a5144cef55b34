"""Target-L0 training: the lambda controller's update by hand, exact resume with its state,
a vmapped sweep over target_l0 equal to its single runs, every controlled family ending
within 10% of three targets on planted features, and clear errors for bad settings."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny, tiny_gated, tiny_jumprelu, tiny_relu
from crashing_source import CrashingSource
from jsae import config as config_lib
from jsae import data, report, runs, saes, sweep, train
from jsae.saes import shared
from jsae.saes.jumprelu import JumpReLUSettings

TINY = {"jumprelu": lambda: tiny.get_config("family=jumprelu"), "relu": tiny_relu.get_config,
        "gated": tiny_gated.get_config}


def _controlled(family: str, target: float = 12.0, **changes):
  c = TINY[family]()
  c.loss.l0_control, c.loss.target_l0 = True, target
  for key, value in changes.items():
    group, name = key.split("__")
    c[group][name] = value
  return c


def test_the_update_and_the_coefficient_by_hand():
  s = JumpReLUSettings(l0_control=True, l0_control_rate=0.01, sparsity_warmup_steps=10)
  h = dict(sparsity_coeff=jnp.float32(0.02), target_l0=jnp.float32(9.0))
  state = shared.L0Control(log_scale=jnp.float32(0.25))
  # L0 20 against 9: log(21 / 10) = 0.742 below the clip, times the gain.
  got = shared.control_update(state, jnp.float32(20.0), h, s, jnp.int32(50))
  assert float(got.log_scale) == pytest.approx(0.25 + 0.01 * math.log(21 / 10), rel=1e-6)
  # L0 0 against 9: log(1 / 10) = -2.3 is clipped to -1: lambda falls by at most the gain.
  got = shared.control_update(state, jnp.float32(0.0), h, s, jnp.int32(50))
  assert float(got.log_scale) == pytest.approx(0.24, rel=1e-6)
  # Frozen during the warm-up; held within the bound.
  assert float(shared.control_update(state, jnp.float32(20.0), h, s, jnp.int32(9)).log_scale) \
      == pytest.approx(0.25)
  top = shared.L0Control(log_scale=jnp.float32(shared.CONTROL_BOUND))
  assert float(shared.control_update(top, jnp.float32(500.0), h, s, jnp.int32(50)).log_scale) \
      == pytest.approx(shared.CONTROL_BOUND)
  # lambda = sparsity_coeff x e^log_scale, warmed up: half-way through the warm-up, half.
  assert float(shared.controlled_coeff(h, state, s, jnp.int32(5))) == pytest.approx(
      0.02 * math.exp(0.25) * 0.5, rel=1e-6)
  off = JumpReLUSettings(sparsity_warmup_steps=10)
  assert float(shared.controlled_coeff(h, saes.base.NoState(), off, jnp.int32(20))) \
      == pytest.approx(0.02)
  assert isinstance(shared.control_update(saes.base.NoState(), 3.0, h, off, 20),
                    saes.base.NoState)


def test_resume_mid_run_equals_an_unbroken_run_controller_included(tmp_path):
  n = 40
  c = _controlled("jumprelu", 4.0, train__num_tokens=2 * n * 512, ckpt__every_steps=n,
                  train__log_every=20, loss__sparsity_warmup_steps=10)
  straight = train.train(c, tmp_path / "straight", progress=False)
  assert abs(float(straight.state.family_state.log_scale)) > 0.05  # the controller moved
  with pytest.raises(KeyboardInterrupt):
    train.train(c, tmp_path / "resumed", progress=False,
                source=CrashingSource(data.make_source(c), n + 5))
  resumed = train.train(c, tmp_path / "resumed", progress=False)
  for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The exported SAE and the report say which L0 lambda was steered to.
  assert runs.read_sae(tmp_path / "resumed").provenance["l0_target"] == 4.0
  assert report._knob(c.to_dict()) == "target L0 4"  # pylint: disable=protected-access
  # The log holds the lambda of the last step, before its update (at most one gain away).
  line = json.loads((tmp_path / "resumed/metrics.jsonl").read_text().splitlines()[-1])
  assert line["sparsity_coeff"] == pytest.approx(
      0.02 * math.exp(float(resumed.state.family_state.log_scale)),
      rel=math.expm1(c.loss.l0_control_rate) + 1e-4)


def _sweep_config(family: str, targets, steps: int, **changes):
  base = _controlled(family, **changes)
  base.train.num_tokens = steps * base.data.batch_size
  c = sweep.sweep_config(base, {family: sweep.group(base, {"target_l0": targets})})
  c.mesh.data = c.mesh.model = 1
  c.sweep.report = False
  c.ckpt.every_steps = steps
  return c


def test_a_vmapped_sweep_over_target_l0_equals_its_single_runs(tmp_path):
  steps = 30
  c = _sweep_config("relu", (4.0, 120.0), steps, loss__sparsity_warmup_steps=5,
                    train__log_every=10)
  result = sweep.sweep(c, tmp_path / "sweep", progress=False)
  (g,) = result.groups
  scales = []
  for m in g.members:
    single = train.train(m.config, tmp_path / m.name, progress=False)
    member = sweep.member_state(result.states[g.name], m, g.family)
    for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(single.state)):
      b = np.asarray(b, np.float64)  # batched matmuls round a little differently
      np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-6 * max(np.abs(b).max(), 1))
    scales.append(float(member.family_state.log_scale))
  assert scales[0] > scales[1]  # the lower target's lambda has risen more


@pytest.mark.parametrize("family", sorted(TINY))
def test_every_controlled_family_ends_within_ten_percent_of_three_targets(tmp_path, family):
  """configs/tiny*.py's planted features (L0 6), 2,000 steps, lambda starting where those
  configs set it: the targets 4, 12 and 30 in one vmapped sweep."""
  targets = (4.0, 12.0, 30.0)
  result = sweep.sweep(_sweep_config(family, targets, 2000), tmp_path, progress=False)
  for m, target in zip(result.groups[0].members, targets):
    line = json.loads((tmp_path / "members" / m.name / "metrics.jsonl")
                      .read_text().splitlines()[-1])
    assert line["l0"] == pytest.approx(target, rel=0.1), (m.name, line["l0"])


@pytest.mark.parametrize("family,change,message", [
    ("relu", dict(target_l0=0.0), r"target_l0: 0.0 cannot be reached.*\(0, d_sae=256\]"),
    ("jumprelu", dict(target_l0=300.0), r"target_l0: 300.0 cannot be reached"),
    ("gated", dict(l0_control_rate=0.0), r"l0_control_rate: must be > 0"),
    ("jumprelu", dict(sparsity="quadratic"), r"l0_control: sparsity='quadratic' already aims"),
])
def test_settings_the_controller_cannot_use_are_refused(family, change, message):
  c = TINY[family]() if family != "jumprelu" else tiny_jumprelu.get_config()
  c.loss.l0_control = True
  for key, value in change.items():
    c.loss[key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_a_family_without_a_coefficient_has_no_controller():
  c = tiny.get_config("family=topk")
  c.loss.l0_control = True
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.loss.l0_control is not a field of family 'topk'.*"
                           r"jumprelu/gated/relu families"):
    config_lib.validate(c)


def test_the_comparison_configs_sweep_target_l0s_at_the_topk_kinds_k():
  from configs import gemma2_9b, sweep_gemma3  # pylint: disable=import-outside-toplevel
  for config, k_family in ((gemma2_9b.get_config("site=resid_post,layer=20,targets=1"), "topk"),
                           (sweep_gemma3.get_config("targets=1"), "batchtopk")):
    plan = {g.name: g for g in sweep.plan(config)}
    ks = {float(m.config.sae.k) for m in plan[k_family].members}
    for name in ("jumprelu", "gated"):
      members = plan[name].members
      assert all(m.config.loss.l0_control for m in members)
      assert {m.config.loss.target_l0 for m in members} == ks
      config_lib.validate(members[0].config)
