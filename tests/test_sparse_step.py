"""The sparse JumpReLU train step against the dense one, its ops against dense
matmuls, and the rule that picks it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, tiny
from jsae import config as config_lib
from jsae import data, optim, saes, train
from jsae.ops import sparse


def _sparse_rows(rng, b, n, cap, active):
  """(f [b, n] with `active` non-zeros per row, their idx [b, cap], valid [b, cap])."""
  idx = np.stack([rng.choice(n, cap, replace=False) for _ in range(b)]).astype(np.int32)
  valid = np.arange(cap)[None, :] < active
  vals = np.where(valid, rng.random((b, cap)), 0).astype(np.float32)
  f = np.zeros((b, n), np.float32)
  np.put_along_axis(f, idx, vals, 1)
  return jnp.asarray(f), jnp.asarray(idx), jnp.asarray(valid), jnp.asarray(vals)


def test_sparse_decode_and_its_gradients_equal_the_dense_matmul():
  rng = np.random.default_rng(0)
  f, idx, _, vals = _sparse_rows(rng, 12, 40, 6, 4)
  w = jnp.asarray(rng.standard_normal((40, 5)).astype(np.float32))
  g = jnp.asarray(rng.standard_normal((12, 5)).astype(np.float32))
  np.testing.assert_allclose(sparse.sparse_decode(vals, idx, w, 4), f @ w, rtol=1e-5, atol=1e-6)
  d_vals, d_w = jax.grad(lambda v, w: jnp.sum(sparse.sparse_decode(v, idx, w, 4) * g),
                         argnums=(0, 1))(vals, w)
  d_f, d_w_dense = jax.grad(lambda f, w: jnp.sum((f @ w) * g), argnums=(0, 1))(f, w)
  np.testing.assert_allclose(d_vals, jnp.take_along_axis(d_f, idx, 1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(d_w, d_w_dense, rtol=1e-5, atol=1e-6)


def test_gathered_encode_and_its_gradients_equal_the_dense_matmul_at_idx():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((12, 5)).astype(np.float32))
  b = jnp.asarray(rng.standard_normal(5).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((5, 40)).astype(np.float32))
  weights, idx, valid, _ = _sparse_rows(rng, 12, 40, 6, 4)  # the loss reads idx only
  weights_c = jnp.take_along_axis(weights, idx, 1)

  def sparse_loss(b, w):
    pre_c = sparse.gathered_encode(x, b, w, idx, jnp.take_along_axis((x - b) @ w, idx, 1), 3)
    return jnp.sum(jnp.where(valid, pre_c, 0.0) * weights_c)

  got = jax.grad(sparse_loss, argnums=(0, 1))(b, w)
  want = jax.grad(lambda b, w: jnp.sum(((x - b) @ w) * weights), argnums=(0, 1))(b, w)
  for a, c in zip(got, want):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)


def test_latent_sums_and_scatter_rows_equal_numpy():
  rng = np.random.default_rng(2)
  f, idx, _, vals = _sparse_rows(rng, 12, 40, 6, 4)
  np.testing.assert_allclose(sparse.scatter_rows(vals, idx, 40), f)
  np.testing.assert_allclose(sparse.latent_sums(vals, idx, 40), np.asarray(f).sum(0), rtol=1e-6)


def test_candidates_pad_and_report_overflow():
  mask = jnp.asarray([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]], bool)
  idx, valid, overflow = sparse.candidates(mask, 3)
  assert [sorted(np.asarray(i)[np.asarray(v)].tolist()) for i, v in zip(idx, valid)] == [
      [0, 2], [], [0, 1, 2]]
  assert bool(overflow)  # the last row has 4 > 3
  assert not bool(sparse.candidates(mask[:2], 3)[2])


@pytest.mark.parametrize("d_sae,expected_l0,capacity", [
    (16384, 50, 256),  # 4 x 50 -> 256 <= 16384 / 32
    (16384, 100, 512),  # 400 -> 512 = 16384 / 32
    (16384, None, 0),  # L0 unknown in advance: dense
    (16384, 200, 0),  # 1024 > 512: measured slower than dense
    (4096, 3, 32),  # never below 32
    (512, 3, 0),  # 32 > 512 / 32
])
def test_capacity_rule(d_sae, expected_l0, capacity):
  assert sparse.capacity_rule(d_sae, expected_l0) == capacity


def _config(capacity, **loss):
  c = default.get_config("family=jumprelu")
  c.sae.d_in, c.sae.d_sae, c.data.batch_size = 16, 256, 64
  c.sae.sparse_capacity = capacity
  c.sae.bandwidth = 0.05
  c.loss.sparsity_warmup_steps = 0
  c.optim.warmup_steps = 0
  # Adam divides by sqrt(v) + eps: at eps 1e-8 a gradient that is rounding noise
  # (a few 1e-9, e.g. a latent's b_enc sum that cancels) takes a full step whose
  # sign depends on the summation order. 1e-4 keeps such noise noise.
  c.optim.eps = 1e-4
  for k, v in loss.items():
    c.loss[k] = v
  return c


def _train(config, x, steps=10):
  settings = train.StepSettings.from_config(config, 1.0)
  optimizer = optim.make_optimizer(config.optim, total_steps=steps)
  state = train.create_state(jax.random.key(0), config, optimizer)
  state = state.replace(params=state.params.replace(
      threshold=jnp.full_like(state.params.threshold, config.sae.init_threshold)))
  step = jax.jit(lambda s, b: train.train_step(s, b, train.hyperparams(config),
                                               settings=settings, optimizer=optimizer))
  overflowed = []
  for i in range(steps):
    pre = saes.get("jumprelu").pre_activations(state.params, x[i])
    low = state.params.theta() - config.sae.bandwidth / 2
    overflowed.append(int(jnp.max(jnp.sum(pre > low, -1))) > max(config.sae.sparse_capacity, 0))
    state, metrics = step(state, x[i])
  return state, metrics, overflowed


@pytest.mark.parametrize("init_threshold,capacity,overflow", [
    (2.6, 32, "never"),  # L0 ~ 1 (at most 15 candidates a row): always sparse
    (1.5, 64, "never"),  # L0 ~ 16 (at most 55)
    (1.5, 24, "always"),  # every batch has rows of 37+ candidates: the dense fallback
    (1.8, 32, "some"),  # 26-41 a row: both paths in one run
])
def test_sparse_step_equals_the_dense_step(init_threshold, capacity, overflow):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((10, 64, 16)).astype(np.float32))
  dense = _config(0, sparsity_coeff=0.01)
  dense.sae.init_threshold = init_threshold
  sparse_config = _config(capacity, sparsity_coeff=0.01)
  sparse_config.sae.init_threshold = init_threshold
  config_lib.validate(sparse_config)
  assert saes.get("jumprelu").settings(sparse_config).sparse_capacity == capacity
  want, want_metrics, _ = _train(dense, x)
  got, got_metrics, overflowed = _train(sparse_config, x)
  expected = {"never": [False] * 10, "always": [True] * 10}.get(overflow)
  if expected is not None:
    assert overflowed == expected
  else:
    assert any(overflowed) and not all(overflowed)
  assert 0 < float(got_metrics["l0"]) < capacity
  # Within 1e-5 relative, tensor by tensor (the sums run in another order).
  for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
    a, b = np.asarray(getattr(got.params, name)), np.asarray(getattr(want.params, name))
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), name
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b)), name
  assert float(got_metrics["loss"]) == pytest.approx(float(want_metrics["loss"]), rel=1e-5)


def test_the_sparse_step_refuses_settings_that_make_it_inexact():
  c = _config(64, pre_act_coeff=1e-3)
  with pytest.raises(config_lib.ConfigError, match="sparse_capacity.*pre_act_coeff"):
    config_lib.validate(c)
  c = _config(-1, pre_act_coeff=1e-3)  # auto simply stays dense
  config_lib.validate(c)
  assert saes.get("jumprelu").settings(c).sparse_capacity == 0
  c = _config(-1, sparsity="quadratic", target_l0=50.0)
  c.sae.d_sae = 16384  # auto from the target L0: 4 x 50 -> 256 latents per row
  assert saes.get("jumprelu").settings(c).sparse_capacity == 256
  assert saes.get("jumprelu").settings(_config(-1)).sparse_capacity == 0  # L0 unknown


# ----------------------------------------------------------------------------- TopK, BatchTopK


def _topk_config(family, capacity, k, dead_window_steps=1000):
  c = default.get_config(f"family={family}")
  c.sae.d_in, c.sae.d_sae, c.data.batch_size = 16, 256, 64
  c.sae.k, c.sae.sparse_capacity = k, capacity
  c.loss.dead_window_steps = dead_window_steps
  c.optim.warmup_steps = 0
  c.optim.eps = 1e-4  # as in `_config`
  return c


def _train_family(config, x, steps=10):
  settings = train.StepSettings.from_config(config, 1.0)
  optimizer = optim.make_optimizer(config.optim, total_steps=steps)
  state = train.create_state(jax.random.key(0), config, optimizer)
  step = jax.jit(lambda s, b: train.train_step(s, b, train.hyperparams(config),
                                               settings=settings, optimizer=optimizer))
  for i in range(steps):
    state, metrics = step(state, x[i])
  return state, metrics


def _assert_same_params(got, want, names):
  for name in names:
    a, b = np.asarray(getattr(got.params, name)), np.asarray(getattr(want.params, name))
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), name
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b)), name


@pytest.mark.parametrize("family,k,capacity,dead_window_steps,path", [
    ("topk", 4, 4, 1000, "sparse"),     # no latent dead within 10 steps: AuxK off
    ("topk", 16, 32, 1000, "sparse"),   # any capacity >= k: TopK's rows hold exactly k
    ("topk", 2, 2, 1, "both"),          # step 0 sparse; then latents silent 1 step are dead: AuxK, dense
    ("batchtopk", 4, 32, 1000, "sparse"),
    ("batchtopk", 8, 9, 1000, "dense"),  # rows keep up to ~20 > 9: the dense fallback
])
def test_sparse_topk_step_equals_the_dense_step(family, k, capacity, dead_window_steps, path):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((10, 64, 16)).astype(np.float32))
  dense = _topk_config(family, 0, k, dead_window_steps)
  sparse_config = _topk_config(family, capacity, k, dead_window_steps)
  config_lib.validate(sparse_config)
  fam = saes.get(family)
  assert fam.settings(sparse_config).sparse_capacity == (k if family == "topk" else capacity)
  assert fam.settings(dense).sparse_capacity == 0
  want, want_metrics = _train_family(dense, x)
  got, got_metrics = _train_family(sparse_config, x)
  # Which path ran, from the inputs: dead latents (AuxK) or a row over the capacity.
  if family == "batchtopk":
    pre = fam.pre_activations(want.params, x[-1])
    mask, _ = fam.select(want.params, pre, k, None)
    overflow = int(jnp.max(jnp.sum(mask, -1))) > capacity
    assert overflow == (path == "dense")
  dead_at_end = float(want_metrics["dead_frac"]) > 0
  assert dead_at_end == (path == "both")
  _assert_same_params(got, want, ("W_enc", "b_enc", "W_dec", "b_dec"))
  assert float(got_metrics["loss"]) == pytest.approx(float(want_metrics["loss"]), rel=1e-5)
  assert float(got_metrics["l0"]) == pytest.approx(float(want_metrics["l0"]))
  if family == "batchtopk":  # the running threshold follows the same kept values
    np.testing.assert_allclose(got.family_state.threshold, want.family_state.threshold,
                               rtol=1e-6)


def test_topk_sparse_capacity_rule_and_validation():
  fam = saes.get("topk")
  c = _topk_config("topk", -1, 32)
  c.sae.d_sae = 16384
  assert fam.settings(c).sparse_capacity == 32  # 32 <= 16384 / 32: sparse, capacity k
  c.sae.k = 1024
  assert fam.settings(c).sparse_capacity == 0  # too many latents a row: dense
  c = _topk_config("topk", 4, 8)
  with pytest.raises(config_lib.ConfigError, match="sparse_capacity.*8..d_sae"):
    config_lib.validate(c)
  b = _topk_config("batchtopk", -1, 32)
  b.sae.d_sae = 16384
  assert saes.get("batchtopk").settings(b).sparse_capacity == 128  # 4 x k
  m = default.get_config("family=matryoshka")
  assert "sparse_capacity" not in m.sae  # nested prefix decodes: no sparse step


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_automatic_capacity_is_dense_where_the_sparse_step_was_not_measured(backend,
                                                                             monkeypatch):
  """`sae.sparse_capacity=-1` means the dense step off XLA:CPU (docs/performance.md has no
  accelerator measurement of the sparse rows); an explicit capacity is kept."""
  assert sparse.capacity_rule(16384, 32, headroom=1, backend="cpu") == 32
  assert sparse.capacity_rule(16384, 32, headroom=1, backend=backend) == 0
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  topk, batchtopk = _topk_config("topk", -1, 32), _topk_config("batchtopk", -1, 32)
  topk.sae.d_sae = batchtopk.sae.d_sae = 16384
  assert saes.get("topk").settings(topk).sparse_capacity == 0
  assert saes.get("batchtopk").settings(batchtopk).sparse_capacity == 0
  jumprelu = _config(-1)
  jumprelu.sae.d_sae = 16384
  jumprelu.loss.sparsity, jumprelu.loss.target_l0 = "quadratic", 10.0
  assert sparse.capacity_rule(16384, 10.0, backend="cpu") == 64  # sparse there
  assert saes.get("jumprelu").settings(jumprelu).sparse_capacity == 0
  batchtopk.sae.sparse_capacity = 256
  assert saes.get("batchtopk").settings(batchtopk).sparse_capacity == 256


@pytest.mark.parametrize("block", [1, 4, 8])
def test_candidates_find_every_true_entry_in_two_passes(block):
  """The two-pass search (non-empty blocks, then entries) against numpy, rows of 0 to
  `capacity` True entries, some clustered in one block."""
  rng = np.random.default_rng(0)
  b, n, cap = 40, 512, 16
  mask = np.zeros((b, n), bool)
  for r in range(b):
    count = r % (cap + 1)
    if r % 3 == 0:  # clustered: consecutive latents
      start = rng.integers(0, n - count)
      mask[r, start:start + count] = True
    else:
      mask[r, rng.choice(n, count, replace=False)] = True
  idx, valid, overflow = sparse.candidates(jnp.asarray(mask), cap, block=block)
  idx, valid = np.asarray(idx), np.asarray(valid)
  assert not bool(overflow)
  for r in range(b):
    assert sorted(idx[r][valid[r]].tolist()) == np.flatnonzero(mask[r]).tolist()
    assert len(set(idx[r].tolist())) == cap  # padding: distinct latents...
    assert not mask[r, idx[r][~valid[r]]].any()  # ...that are not candidates
  mask[5, :cap + 1] = True
  assert bool(sparse.candidates(jnp.asarray(mask), cap, block=block)[2])


@pytest.mark.parametrize("current,need,d_sae,capacity", [
    (0, 20, 16384, 32),  # dense -> the fit: 1.25 x 20 rounded up to 32
    (0, 113, 16384, 160),  # 141 -> 160
    (160, 120, 16384, 160),  # fits the headroom: unchanged
    (160, 129, 16384, 192),  # outgrows it: grows at once
    (160, 90, 16384, 160),  # fit 128 > 3/4 x 160: no shrink (hysteresis)
    (160, 70, 16384, 96),  # fit 96 <= 120: shrinks
    (256, 500, 16384, 0),  # fit 640 > 16384 / 32: dense
    (0, 30, 512, 0),  # 32 > 512 / 32 = 16: dense
])
def test_adapt_capacity(current, need, d_sae, capacity):
  assert sparse.adapt_capacity(current, need, d_sae) == capacity


def _adaptive_config(**overrides):
  c = tiny.get_config()
  c.mesh.data = c.mesh.model = 1
  c.sae.d_sae, c.data.batch_size, c.sae.init_threshold = 4096, 256, 0.45  # L0 ~ 2, up to ~50 in a row
  c.sae.bandwidth = 0.01  # a narrow window: few candidates beside the active latents
  c.optim.eps = 1e-4  # rounding noise stays noise (see `_config`)
  c.train.num_tokens, c.train.log_every, c.ckpt.every_steps = 60 * 256, 10, 30
  for k, v in overrides.items():
    group, field = k.split("__")
    c[group][field] = v
  return c


def test_trainer_adapts_the_capacity_equals_the_dense_run_and_resumes_exactly(tmp_path):
  """`sparse_capacity=-1` starts dense (L0 unknown for sparsity='step'), switches to the
  sparse step at the first logging step, matches a dense run and resumes bit for bit
  (the capacity in use is restored from the checkpoint, not re-derived)."""
  adaptive = train.train(_adaptive_config(), tmp_path / "adaptive", progress=False)
  log = [json.loads(l) for l in (tmp_path / "adaptive/metrics.jsonl").read_text().splitlines()]
  capacities = [r["step_capacity"] for r in log]
  assert capacities[0] == 0 and all(c > 0 for c in capacities[1:]), capacities
  assert all(r["max_candidates"] <= 256 for r in log[1:]), [r["max_candidates"] for r in log]

  dense = train.train(_adaptive_config(sae__sparse_capacity=0), tmp_path / "dense",
                      progress=False)
  for a, b in zip(jax.tree.leaves(dense.state.params), jax.tree.leaves(adaptive.state.params)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(a), 1e-6)

  class Crashing:  # a preemption in the middle of the second checkpoint interval
    def __init__(self, inner):
      self.inner, self.d_in, self.norm_scale = inner, inner.d_in, inner.norm_scale
      self.batch_size = inner.batch_size

    def batch(self, step):
      if step == 37:
        raise KeyboardInterrupt("simulated preemption")
      return self.inner.batch(step)

    def close(self):
      self.inner.close()

  config = _adaptive_config()
  with pytest.raises(KeyboardInterrupt):
    train.train(config, tmp_path / "resumed", progress=False,
                source=Crashing(data.make_source(config)))
  resumed = train.train(config, tmp_path / "resumed", progress=False)
  for a, b in zip(jax.tree.leaves(adaptive.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
