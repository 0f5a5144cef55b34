"""config.recipe='auto': its derived values against hand computations on data with a known
distribution, what a run records, exact resume, a sweep equal to its single runs, values
set by hand winning over the recipe, and refusals of what it cannot do."""

import json

import jax
import numpy as np
import pytest

from configs import default, tiny
from crashing_source import CrashingSource
from jsae import config as config_lib
from jsae import data, recipe, sweep, train
from jsae.saes import jumprelu

AUTO_FIELDS = recipe.auto_fields("jumprelu")


def _auto(**changes):
  """configs/tiny.py's shape and data with recipe 'auto' (its hand-set values removed)."""
  c = tiny.get_config("family=jumprelu")
  for dotted, value in AUTO_FIELDS.items():
    group, name = dotted.split(".")
    c[group][name] = value
  c.recipe = "auto"
  c.mesh.data = c.mesh.model = 1
  for key, value in changes.items():
    group, name = key.split("__")
    c[group][name] = value
  return c


def test_threshold_and_bandwidth_of_a_uniform_sample_by_hand():
  # 100,000 pre-activations evenly spread over [0, 1]: the top 20% lie above 0.8. Around
  # 0.8 the window holds d below and min(d, 0.2) above: d + 0.2 = 0.5 at d = 0.3.
  pre = (np.arange(100_000) + 0.5) / 100_000
  assert jumprelu.AUTO_FIRING == 0.2 and jumprelu.AUTO_WINDOW == 0.5
  theta0 = jumprelu.auto_threshold(pre.reshape(100, 1000))
  assert theta0 == pytest.approx(0.8, abs=1e-4)
  assert jumprelu.auto_bandwidth(pre, theta0) == pytest.approx(0.6, abs=1e-4)


def test_the_window_holds_its_share_of_a_gaussian_sample():
  pre = np.random.default_rng(0).normal(0.0, 0.1, size=(512, 256))
  theta0 = jumprelu.auto_threshold(pre)
  eps = jumprelu.auto_bandwidth(pre, theta0)
  assert (pre > theta0).mean() == pytest.approx(jumprelu.AUTO_FIRING, abs=1e-3)
  assert (np.abs(pre - theta0) <= eps / 2).mean() == pytest.approx(jumprelu.AUTO_WINDOW,
                                                                   abs=1e-3)
  # All negative (a badly centred encoder): theta stays positive, as JumpReLU needs.
  assert jumprelu.auto_threshold(-np.abs(pre)) == 1e-6


def test_learning_rate_and_warm_ups_by_hand():
  # 2e-3 at 256 latents and batch 512; x sqrt(256/1024) x sqrt(2048/512) = x 1.
  assert recipe.learning_rate(1024, 2048) == pytest.approx(2e-3)
  assert recipe.learning_rate(16384, 4096) == pytest.approx(2e-3 / 8 * np.sqrt(8))
  c = _auto()
  values = recipe.derive(c, np.linspace(-1, 1, 1001), num_steps=4000)
  assert values["optim.warmup_steps"] == 50  # 1.25% of 4000
  assert values["loss.sparsity_warmup_steps"] == 200  # 5% of 4000


def test_a_run_records_the_derived_values_and_resumes_exactly(tmp_path):
  c = _auto(train__num_tokens=80 * 512, ckpt__every_steps=40, train__log_every=20)
  straight = train.train(c, tmp_path / "straight", progress=False)
  recorded = json.loads((tmp_path / "straight/config.json").read_text())
  source = data.make_source(c)
  pre = train.initial_pre_activations(c, source)
  assert pre.shape == (512, 256)  # one batch of 512 rows (under MAX_SAMPLE / d_sae)
  # Pre-activations by hand: rows / C times the fresh encoder (zero biases).
  x = np.asarray(source.batch(0)) / source.norm_scale
  W_enc = np.asarray(train.init_params(jax.random.key(c.seed), c).W_enc)
  np.testing.assert_allclose(pre, x @ W_enc, rtol=1e-4, atol=1e-5)
  want = recipe.derive(c, pre, num_steps=80)
  for dotted, value in want.items():
    group, name = dotted.split(".")
    assert recorded[group][name] == pytest.approx(value), dotted
  assert recorded["recipe"] == "auto"
  theta = np.asarray(straight.state.params.theta())
  assert not np.allclose(theta, want["sae.init_threshold"])  # the thresholds trained

  with pytest.raises(KeyboardInterrupt):
    train.train(c, tmp_path / "resumed", progress=False,
                source=CrashingSource(data.make_source(c), 45))
  resumed = train.train(c, tmp_path / "resumed", progress=False)
  for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_sweep_derives_what_its_single_runs_derive(tmp_path):
  steps = 30
  base = _auto(train__num_tokens=steps * 512)
  c = sweep.sweep_config(base, {"jumprelu": sweep.group(
      base, {"sparsity_coeff": (0.01, 0.05), "lr": (7e-5, 1e-3)}, mode="zip")})
  c.mesh.data = c.mesh.model = 1
  c.sweep.report = False
  c.ckpt.every_steps = steps
  result = sweep.sweep(c, tmp_path / "sweep", progress=False)
  (g,) = result.groups
  for m in g.members:
    single = train.train(sweep.plan(c)[0].members[m.index].config, tmp_path / m.name,
                         progress=False)
    recorded = json.loads((tmp_path / m.name / "config.json").read_text())
    member_json = json.loads((tmp_path / "sweep/members" / m.name / "config.json").read_text())
    for dotted in AUTO_FIELDS:
      group, name = dotted.split(".")
      assert member_json[group][name] == recorded[group][name], dotted
    # The swept lr: 7e-5 is Gemma Scope's, so the recipe derives it; 1e-3 is kept.
    assert member_json["optim"]["lr"] == (1e-3 if m.values["lr"] == 1e-3 else
                                          pytest.approx(recipe.learning_rate(256, 512)))
    member = sweep.member_state(result.states[g.name], m, g.family)
    for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(single.state)):
      b = np.asarray(b, np.float64)  # batched matmuls round a little differently
      np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-6 * max(np.abs(b).max(), 1))


@pytest.mark.parametrize("field, value", [("sae__bandwidth", 0.05), ("optim__lr", 1e-3),
                                          ("loss__sparsity_warmup_steps", 200)])
def test_a_derived_field_set_by_hand_wins_and_the_log_says_so(field, value, capsys):
  c = _auto(**{field: value})
  config_lib.validate(c)
  source = data.make_source(c)
  resolved = train.resolve_recipe(c, source, num_steps=400)
  dotted = field.replace("__", ".")
  assert recipe.get_field(resolved, dotted) == value
  auto = recipe.derive(_auto(), train.initial_pre_activations(c, source), num_steps=400)
  for other in set(AUTO_FIELDS) - {dotted}:  # the rest is still derived
    assert recipe.get_field(resolved, other) == pytest.approx(auto[other]), other
  assert f"set by hand, kept: {dotted}={value!r}" in capsys.readouterr().out


def test_auto_refuses_families_it_cannot_derive_and_unknown_recipes():
  c = default.get_config("family=topk")
  c.recipe = "auto"
  with pytest.raises(config_lib.ConfigError, match="config.recipe: 'auto'.*'topk'.*jumprelu"):
    config_lib.validate(c)
  c = default.get_config()
  c.recipe = "fast"
  with pytest.raises(config_lib.ConfigError, match="config.recipe: 'fast' is not one of"):
    config_lib.validate(c)


def test_gemma_scope_values_are_the_defaults():
  c = default.get_config()
  assert c.recipe == "gemma_scope"
  for dotted, value in AUTO_FIELDS.items():
    assert recipe.get_field(c, dotted) == value, dotted
