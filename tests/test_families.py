"""ReLU, TopK, BatchTopK, Matryoshka and Gated against closed forms (from the papers and
the peer libraries, SAELens and dictionary_learning), brute force and finite differences."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from jsae import config as config_lib
from jsae import losses, saes
from jsae.saes import topk as topk_lib
from jsae.saes.matryoshka import prefix_losses


def _linear(family, W_enc, W_dec, b_enc=None, b_dec=None, **static):
  W_enc, W_dec = jnp.asarray(W_enc, jnp.float32), jnp.asarray(W_dec, jnp.float32)
  d_in, d_sae = W_enc.shape
  return saes.get(family).params_type(
      W_enc=W_enc, W_dec=W_dec,
      b_enc=jnp.zeros(d_sae) if b_enc is None else jnp.asarray(b_enc, jnp.float32),
      b_dec=jnp.zeros(d_in) if b_dec is None else jnp.asarray(b_dec, jnp.float32),
      pre_encoder_bias=False, **static)


def _loss(family, params, x, *, state=None, dead=None, settings=None, **hparams):
  fam = saes.get(family)
  d_sae = params.W_dec.shape[0]
  state = fam.init_state(d_sae, settings) if state is None else state
  hp = {k: jnp.asarray(v) for k, v in hparams.items()}
  return fam.loss(params, state, jnp.asarray(x, jnp.float32), settings=settings, hparams=hp,
                  dead=jnp.zeros(d_sae, bool) if dead is None else jnp.asarray(dead),
                  step=jnp.int32(10**6))


# ----------------------------------------------------------------------------- 1. ReLU


def test_relu_closed_form_and_scale_invariance():
  settings = saes.relu.ReLUSettings()
  p = _linear("relu", np.eye(2), np.diag([2.0, 1.0]))
  x = np.array([[1.0, 0.5]])
  loss, out = _loss("relu", p, x, settings=settings, sparsity_coeff=0.1)
  np.testing.assert_allclose(out.f, [[1.0, 0.5]])
  np.testing.assert_allclose(out.x_hat, [[2.0, 0.5]])
  assert float(out.parts["reconstruction"]) == pytest.approx(1.0)
  assert float(out.parts["sparsity"]) == pytest.approx(2.5)
  assert float(loss) == pytest.approx(1.0 + 0.25)
  # Latent 0 scaled by c = 3 (row x3, encoder column and bias / 3): same losses.
  c = 3.0
  q = p.replace(W_dec=p.W_dec.at[0].multiply(c), W_enc=p.W_enc.at[:, 0].divide(c),
                b_enc=p.b_enc.at[0].divide(c))
  _, out_q = _loss("relu", q, x, settings=settings, sparsity_coeff=0.1)
  assert float(out_q.parts["reconstruction"]) == pytest.approx(1.0, rel=1e-6)
  assert float(out_q.parts["sparsity"]) == pytest.approx(2.5, rel=1e-6)
  # An unweighted L1 would not be invariant (the reason for the weighting).
  assert float(jnp.sum(out_q.f)) != pytest.approx(float(jnp.sum(out.f)))


# ----------------------------------------------------------------------------- 2. TopK


def test_topk_ties_and_fewer_positive_than_k():
  s = topk_lib.TopKSettings(aux_coeff=0.0)
  p = _linear("topk", np.eye(5), np.eye(5), k=2)
  _, out = _loss("topk", p, [[3.0, -1.0, 2.0, 2.0, 0.5]], settings=s, k=2)
  np.testing.assert_array_equal(out.f, [[3.0, 0, 2.0, 0, 0]])  # tie: the lower index wins
  p = _linear("topk", np.eye(4), np.eye(4), k=3)
  _, out = _loss("topk", p, [[1.0, -2.0, -3.0, 0.5]], settings=s, k=3)
  np.testing.assert_array_equal(out.f, [[1.0, 0, 0, 0.5]])  # L0 = 2 < k
  np.testing.assert_array_equal(saes.get("topk").infer(p, jnp.array([[1.0, -2, -3, 0.5]])),
                                out.f)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_traced_k_below_capacity_equals_top_k(k):
  """A sweep's traced k with a static capacity selects exactly lax.top_k(pi, k)."""
  pre = jax.random.normal(jax.random.key(k), (7, 12)).at[0, :4].set(1.0)  # ties
  mask = jax.jit(topk_lib.topk_mask, static_argnums=1)(pre, 3, jnp.int32(k))
  _, idx = jax.lax.top_k(pre, k)
  want = np.zeros(pre.shape, bool)
  np.put_along_axis(want, np.asarray(idx), True, axis=1)
  np.testing.assert_array_equal(mask, want)


def _auxk_setup(d_in):
  rows = np.zeros((4, d_in), np.float32)
  rows[[0, 2], 0] = 1.0
  rows[[1, 3], 1] = 1.0
  dead = np.array([False, False, True, True])
  e = np.zeros((1, d_in), np.float32)
  e[0, 0] = 1.0
  return jnp.asarray(rows), jnp.asarray(dead), jnp.asarray(e)


def test_auxk_closed_forms():
  W, dead, e = _auxk_setup(2)
  pre = jnp.array([[9.0, 9.0, 0.3, 0.7]])  # live latents are ignored
  got = losses.auxk(e, pre, dead, W, 1, form="saelens")
  assert float(got) == pytest.approx(1.49, abs=1e-6)  # e_hat = 0.7 e2
  W, dead, e = _auxk_setup(4)
  pre = jnp.array([[9.0, 9.0, -0.5, 0.7]])
  assert float(losses.auxk(e, pre, dead, W, 2, form="saelens")) == pytest.approx(2.74, abs=1e-6)
  # 'gao': ReLU'd values and normalised by the residual's variance about its batch mean.
  e2 = np.concatenate([e, 2 * e + 1.0])
  pre2 = jnp.concatenate([pre, jnp.array([[0.0, 0.0, 0.4, -0.2]])])
  z = np.array([[0, 0, 0, 0.7], [0, 0, 0.4, 0]])
  e_hat = z @ np.asarray(W)
  want = np.sum((e2 - e_hat) ** 2) / np.sum((e2 - e2.mean(0)) ** 2)
  assert float(losses.auxk(e2, pre2, dead, W, 2, form="gao")) == pytest.approx(want, rel=1e-6)
  assert float(losses.auxk(e2, pre2, jnp.zeros(4, bool), W, 2)) == 0.0  # nothing dead


def test_auxk_trains_only_dead_latents_and_is_skipped_without_them():
  s = topk_lib.TopKSettings(aux_coeff=1.0, k_aux=2)
  p = saes.get("topk").init(jax.random.key(0), d_in=8, d_sae=16, k=2)
  x = jax.random.normal(jax.random.key(1), (32, 8))
  dead = jnp.zeros(16, bool).at[5].set(True)
  g = jax.grad(lambda p: _loss("topk", p, x, settings=s, dead=dead, k=2)[1].parts["aux"])(p)
  rows_with_grad = np.flatnonzero(np.abs(np.asarray(g.W_dec)).sum(1))
  np.testing.assert_array_equal(rows_with_grad, [5])
  assert float(_loss("topk", p, x, settings=s, k=2)[1].parts["aux"]) == 0.0


# ----------------------------------------------------------------------------- 3. BatchTopK


def test_batchtopk_keeps_k_times_batch_and_threshold():
  s = topk_lib.TopKSettings(aux_coeff=0.0)
  fam = saes.get("batchtopk")
  p = _linear("batchtopk", np.eye(3), np.eye(3), k=1)
  x = np.array([[5.0, 4.0, 0.0], [1.0, 0.5, -1.0]])
  state = fam.init_state(3, s)
  _, out = _loss("batchtopk", p, x, state=state, settings=s, k=1)
  np.testing.assert_array_equal(out.f, [[5.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
  np.testing.assert_array_equal((np.asarray(out.f) != 0).sum(1), [2, 0])
  # min positive kept = 4: bias-corrected EMA gives 4 at once and keeps it.
  assert float(out.state.threshold) == pytest.approx(4.0)
  for _ in range(3):
    _, out = _loss("batchtopk", p, x, state=out.state, settings=s, k=1)
  assert float(out.state.threshold) == pytest.approx(4.0, rel=1e-6)
  # Its JumpReLU inference form at theta = 3.5 reproduces the training output;
  # at 0.75 row 1 gains latent 0 (inference L0 != k).
  jr = saes.get("jumprelu")
  for theta, want in [(3.5, out.f), (0.75, [[5.0, 4.0, 0.0], [1.0, 0.0, 0.0]])]:
    q = saes.JumpReLUParams(W_enc=p.W_enc, b_enc=p.b_enc, W_dec=p.W_dec, b_dec=p.b_dec,
                            threshold=jnp.full(3, theta), pre_encoder_bias=False)
    np.testing.assert_array_equal(jr.infer(q, jnp.asarray(x)), want)
  name, folded = fam.fold(p, out.state, 1.0)
  assert name == "jumprelu"
  np.testing.assert_allclose(folded.threshold, 4.0, rtol=1e-6)


def _brute_batch_topk(pre, n):
  flat = pre.reshape(-1)
  order = np.lexsort((np.arange(flat.size), -flat))[:n]  # value desc, then index asc
  mask = np.zeros(flat.size, bool)
  mask[order] = True
  return mask.reshape(pre.shape)


@pytest.mark.parametrize("per_row", [1, 4, 100])
def test_batch_topk_mask_equals_brute_force_with_ties(per_row):
  """Candidates path, flat fallback (one row owns the top) and flat-only (cap = d_sae)."""
  rng = np.random.default_rng(0)
  pre = np.round(rng.normal(size=(16, 40)), 1).astype(np.float32)  # many ties
  pre[5, :8] = -0.0  # signed zeros order as equal
  owner = pre.copy()
  owner[3] = 5.0 + rng.random(40)  # one row owns much of the top: forces the fallback
  select = jax.jit(topk_lib.batch_topk_mask, static_argnums=(1, 3))
  for k in (1, 2, 3):  # traced k below the capacity 3, as in a sweep
    for case in (pre, owner, -np.abs(pre)):
      mask, smallest = select(jnp.asarray(case), 3, jnp.int32(k), per_row)
      want = _brute_batch_topk(case, k * case.shape[0])
      np.testing.assert_array_equal(mask, want)
      positive = case[want][case[want] > 0]
      assert float(smallest) == (positive.min() if positive.size else np.inf)


# ----------------------------------------------------------------------------- 4. Matryoshka


def test_matryoshka_two_group_example():
  x = jnp.array([[3.0, 4.0]])
  f = jnp.array([[2.0, 4.0]])
  W, b = jnp.eye(2), jnp.zeros(2)

  def total(f):
    levels, _ = prefix_losses(x, f, W, b, (1, 1), "float32")
    return sum(levels)
  levels, x_hat = prefix_losses(x, f, W, b, (1, 1), "float32")
  assert [float(v) for v in levels] == [pytest.approx(17.0), pytest.approx(1.0)]
  np.testing.assert_allclose(x_hat, [[2.0, 4.0]])
  assert float(total(f)) == pytest.approx(18.0)
  np.testing.assert_allclose(jax.grad(total)(f), [[-4.0, 0.0]])
  # Through the family: W_enc = I, k = 1 per row on a batch of one keeps f = [0, 4]...
  fam = saes.get("matryoshka")
  s = saes.matryoshka.MatryoshkaSettings(aux_coeff=0.0)
  p = _linear("matryoshka", np.eye(2), np.eye(2), k=2, group_sizes=(1, 1))
  loss, out = _loss("matryoshka", p, x, settings=s, k=2)
  np.testing.assert_allclose(out.f, [[3.0, 4.0]])
  assert float(loss) == pytest.approx(16.0)  # levels 16 + 0, as SAELens
  assert float(out.state.threshold) == pytest.approx(3.0)  # SAELens: 0.03 (EMA from 0)
  s_mean = saes.matryoshka.MatryoshkaSettings(aux_coeff=0.0, group_loss="mean")
  assert float(_loss("matryoshka", p, x, settings=s_mean, k=2)[0]) == pytest.approx(8.0)
  assert fam.fold(p, out.state, 1.0)[0] == "jumprelu"


# ----------------------------------------------------------------------------- 5. Gated


def _gated_params():
  return saes.GatedParams(
      W_enc=jnp.eye(2), b_gate=jnp.array([-1.0, 0.5]), r_mag=jnp.array([0.0, math.log(2)]),
      b_mag=jnp.array([0.0, -1.0]), W_dec=jnp.eye(2), b_dec=jnp.zeros(2),
      pre_encoder_bias=False)


@pytest.mark.parametrize("penalty", ["ri_l1", "l1"])
def test_gated_closed_form_loss_and_gradients(penalty):
  s = saes.gated.GatedSettings(penalty=penalty)
  x = jnp.array([[2.0, -0.25]])
  p = _gated_params()
  loss, out = _loss("gated", p, x, settings=s, sparsity_coeff=1.0)
  np.testing.assert_allclose(out.f, [[2.0, 0.0]])
  assert float(out.parts["reconstruction"]) == pytest.approx(0.0625)
  assert float(out.parts["sparsity"]) == pytest.approx(1.25)
  assert float(out.parts["aux"]) == pytest.approx(1.25)
  assert float(loss) == pytest.approx(2.5625)
  g = jax.grad(lambda p: _loss("gated", p, x, settings=s, sparsity_coeff=1.0)[0])(p)
  np.testing.assert_allclose(g.b_gate, [-1.0, 2.0], atol=1e-6)  # every variant
  want = {"l1": [[0.0, 1.0], [0.0, 0.0]],          # Gated paper / dictionary_learning
          "ri_l1": [[-1.0, 2.0], [-0.5, 0.5]]}     # SAELens
  np.testing.assert_allclose(g.W_dec, want[penalty], atol=1e-6)


def test_gated_gradients_match_finite_differences():
  s = saes.gated.GatedSettings()
  x = jax.random.normal(jax.random.key(0), (6, 4)) * 0.7
  p = saes.get("gated").init(jax.random.key(1), d_in=4, d_sae=5)
  rng = np.random.default_rng(2)
  p = p.replace(**{n: jnp.asarray(getattr(p, n) + rng.normal(0, 0.2, getattr(p, n).shape),
                                  jnp.float64 if False else jnp.float32)
                   for n in ("b_gate", "r_mag", "b_mag", "b_dec", "W_dec")})
  f = lambda p: _loss("gated", p, x, settings=s, sparsity_coeff=0.3)[0]
  g = jax.grad(f)(p)
  for name in ("r_mag", "b_mag", "W_dec", "b_dec", "W_enc"):
    a = np.asarray(getattr(p, name))
    idx = np.unravel_index(np.argmax(np.abs(np.asarray(getattr(g, name)))), a.shape)
    h = 1e-3
    plus = p.replace(**{name: jnp.asarray(a).at[idx].add(h)})
    minus = p.replace(**{name: jnp.asarray(a).at[idx].add(-h)})
    fd = (float(f(plus)) - float(f(minus))) / (2 * h)
    assert float(np.asarray(getattr(g, name))[idx]) == pytest.approx(fd, rel=2e-2, abs=1e-3), name


def test_gated_jumprelu_form_is_exact():
  p = _gated_params()
  jr = saes.get("gated").as_jumprelu(p)
  np.testing.assert_allclose(jr.threshold, [1.0, -2.0])
  x = jax.random.normal(jax.random.key(3), (1000, 2)) * 2
  f_gated = saes.get("gated").encode(p, x)
  np.testing.assert_allclose(saes.get("jumprelu").infer(jr, x), f_gated, rtol=1e-6, atol=1e-6)
  assert 0.1 < float((f_gated != 0).mean()) < 0.9


# ----------------------------------------------------------------------------- config errors


def _config(family, **overrides):
  c = default.get_config(f"family={family}")
  for dotted, value in overrides.items():
    group, field = dotted.split("__")
    c[group][field] = value
  return c


@pytest.mark.parametrize("family,overrides,match", [
    ("topk", {"sae__k": 20000}, r"config\.sae\.k: must be an integer in \[1, d_sae=16384\]"),
    ("matryoshka", {"sae__group_sizes": (100, 200)},
     r"group_sizes: \(100, 200\) sums to 300, not d_sae = 16384"),
    ("gated", {"loss__penalty": "l2"}, "'ri_l1' or 'l1'"),
    ("batchtopk", {"sae__threshold_ema": 0.0}, r"threshold_ema: must lie in \(0, 1\]"),
    ("jumprelu", {"eval__memory_mb": 0}, r"eval\.memory_mb: must be a positive integer \(MiB\)"),
    ("relu", {"eval__batch_size": -1}, r"eval\.batch_size: must be >= 0"),
])
def test_bad_family_values_are_config_errors(family, overrides, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(_config(family, **overrides))


def test_a_field_of_another_family_names_its_owner():
  c = _config("gated")
  c.sae.k = 32
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  msg = str(e.value)
  assert "config.sae.k is not a field of family 'gated'" in msg
  assert "topk/batchtopk/matryoshka" in msg and "family=topk" in msg
  c = _config("jumprelu")
  c.loss.sparsity_coef = 1.0  # a typo: the nearest name is suggested
  with pytest.raises(config_lib.ConfigError, match="Did you mean config.loss.sparsity_coeff"):
    config_lib.validate(c)
  c = _config("jumprelu")
  c.sae.family = "topk"  # switched after building: the topk fields are missing
  with pytest.raises(config_lib.ConfigError, match="family=topk"):
    config_lib.validate(c)
  with pytest.raises(ValueError, match="Did you mean 'topk'"):
    saes.get("topkk")


def test_every_family_has_a_spec_for_every_parameter_and_documents_fields():
  for name in saes.names():
    fam = saes.get(name)
    c = default.get_config(f"family={name}")
    c.sae.d_sae = 32
    config_lib.validate(c)
    params = jax.eval_shape(lambda k: fam.init(k, d_in=8, d_sae=32, **fam.init_kwargs(c)),
                            jax.random.key(0))
    specs = fam.param_specs(params)
    assert all(isinstance(s, jax.sharding.PartitionSpec) for s in jax.tree.leaves(
        specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)))
    for group in fam.fields.values():
      for f in group.values():
        assert f.doc and "\n" not in f.doc
  broken = saes.get("relu")
  class NoSpec(type(broken)):
    param_spec_table = {"W_enc": None}
  with pytest.raises(ValueError, match="no sharding spec for parameter"):
    NoSpec().param_specs(broken.init(jax.random.key(0), d_in=4, d_sae=8))


def test_cli_names_the_family_that_owns_an_override():
  from jsae import cli
  with pytest.raises(cli.UsageError) as e:
    cli.parse_config_flags("jsae train", ["--config=configs/tiny_gated.py", "--config.sae.k=32",
                                          "--workdir=/tmp/unused"])
  assert "config.sae.k is a field of the batchtopk/matryoshka/topk" in str(e.value)
  assert "family=batchtopk" in str(e.value)
  with pytest.raises(cli.UsageError, match="unknown SAE family 'topkk'.*Did you mean 'topk'"):
    cli.parse_config_flags("jsae train", ["--config=configs/default.py:family=topkk",
                                          "--workdir=/tmp/unused"])


@pytest.mark.parametrize("family", ["jumprelu", "relu", "topk", "batchtopk", "matryoshka",
                                    "gated"])
def test_the_sparsity_knob_is_traced_so_a_sweep_can_vmap_it(family):
  """Two members with different knobs in one vmapped loss equal two separate losses."""
  fam = saes.get(family)
  c = default.get_config(f"family={family}")
  c.sae.d_in, c.sae.d_sae = 8, 32
  if "k" in c.sae:
    c.sae.k = 4
  settings = fam.settings(c)
  params = fam.init(jax.random.key(0), d_in=8, d_sae=32, **fam.init_kwargs(c))
  state = fam.init_state(32, settings)
  x = jax.random.normal(jax.random.key(1), (16, 8))
  base_hp = fam.hyperparams(c)
  knob = "k" if "k" in base_hp else "sparsity_coeff"
  values = [jnp.asarray(v, base_hp[knob].dtype) for v in ((2, 4) if knob == "k" else (1e-3, 0.3))]
  members = [dict(base_hp, **{knob: v}) for v in values]

  def loss(hp):
    return fam.loss(params, state, x, settings=settings, hparams=hp,
                    dead=jnp.zeros(32, bool).at[:5].set(True), step=jnp.int32(10**6))[0]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
  together = jax.jit(jax.vmap(loss))(stacked)
  apart = [float(loss(hp)) for hp in members]
  np.testing.assert_allclose(together, apart, rtol=1e-5)
  assert apart[0] != pytest.approx(apart[1])  # the knob matters
