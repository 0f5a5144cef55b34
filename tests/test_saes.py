"""The JumpReLU family, loss terms and optimizer against closed forms and numpy."""

import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

import jsae
from jsae import losses, optim, saes

FAMILY = saes.get("jumprelu")


def _loss(p, x, *, bandwidth, coeff=0.0, sparsity="step", target_l0=50.0,
          compute_dtype="float32"):
  """The JumpReLU loss and its Output with the given settings (no lambda warm-up)."""
  settings = saes.jumprelu.JumpReLUSettings(sparsity=sparsity, compute_dtype=compute_dtype)
  hparams = dict(bandwidth=jnp.float32(bandwidth), sparsity_coeff=jnp.float32(coeff),
                 target_l0=jnp.float32(target_l0))
  return FAMILY.loss(p, saes.NoState(), x, settings=settings, hparams=hparams,
                     dead=jnp.zeros(p.d_sae, bool), step=jnp.int32(0))


def _params(d_in=16, d_sae=32, seed=0, **kw):
  params = FAMILY.init(jax.random.key(seed), d_in=d_in, d_sae=d_sae, **kw)
  rng = np.random.default_rng(seed)  # non-trivial biases and thresholds
  return params.replace(
      b_enc=jnp.asarray(rng.normal(0, 0.1, d_sae), jnp.float32),
      b_dec=jnp.asarray(rng.normal(0, 0.1, d_in), jnp.float32),
      threshold=jnp.asarray(rng.uniform(0.05, 0.2, d_sae), jnp.float32))


def test_gemma_scope_init():
  p = FAMILY.init(jax.random.key(0), d_in=24, d_sae=96)
  np.testing.assert_allclose(np.linalg.norm(p.W_dec, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(p.W_enc, p.W_dec.T)
  assert not np.any(p.b_enc) and not np.any(p.b_dec)
  np.testing.assert_allclose(p.threshold, 0.001)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
  log_p = FAMILY.init(jax.random.key(0), d_in=24, d_sae=96, log_threshold=True)
  np.testing.assert_allclose(log_p.theta(), 0.001, rtol=1e-6)


@pytest.mark.parametrize("pre_encoder_bias", [True, False])
def test_encode_decode_match_numpy(pre_encoder_bias):
  p = _params(pre_encoder_bias=pre_encoder_bias)
  x = np.random.default_rng(1).normal(0, 0.3, (10, 16)).astype(np.float32)
  W_enc, b_enc, W_dec, b_dec, th = map(np.asarray, (p.W_enc, p.b_enc, p.W_dec, p.b_dec, p.threshold))
  pre = ((x - b_dec) if pre_encoder_bias else x) @ W_enc + b_enc
  f = pre * (pre > th)
  np.testing.assert_allclose(jsae.encode(p, x), f, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jsae.decode(p, f), f @ W_dec + b_dec, rtol=1e-5, atol=1e-6)
  assert 0 < (f != 0).mean() < 1  # the test exercises both sides of the threshold


def test_encode_works_under_jit_vmap_and_bfloat16():
  p = _params()
  x = jax.random.normal(jax.random.key(2), (3, 5, 16)) * 0.3
  f = jax.jit(jsae.encode)(p, x)
  assert f.shape == (3, 5, 32)
  np.testing.assert_allclose(jax.vmap(jsae.encode, in_axes=(None, 0))(p, x), f, rtol=1e-6)
  f16 = jsae.encode(p, x, compute_dtype="bfloat16")
  assert f16.dtype == jnp.float32
  np.testing.assert_allclose(f16, f, atol=0.03)
  # Sweeps: a stack of parameter sets vmapped together.
  stacked = jax.tree.map(lambda *a: jnp.stack(a), p, _params(seed=3))
  assert jax.vmap(jsae.encode, in_axes=(0, None))(stacked, x).shape == (2, 3, 5, 32)


def _dots(jaxpr):
  """Every dot_general equation in a (closed) jaxpr, sub-jaxprs included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += _dots(sub)
  return out


def test_bfloat16_matmul_gradients_run_in_bfloat16_and_stay_float32():
  """The 5 train-step matmuls take bf16 operands; no 6th for b_dec; gradients stay float32."""
  params = _params(d_in=32, d_sae=64)
  x = jax.random.normal(jax.random.key(3), (16, 32))
  settings = "bfloat16"
  def loss(p, settings):
    return _loss(p, x, bandwidth=0.05, coeff=1e-3, compute_dtype=settings)[0]
  jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, settings).jaxpr
  batch = lambda eqn: any(16 in v.aval.shape for v in (*eqn.invars, *eqn.outvars))
  for eqn in filter(batch, _dots(jaxpr)):  # also the encoder's unused dx, which XLA drops
    assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2, eqn
    # float32 out, except activation gradients (dx), which are rounded to bf16.
    assert eqn.outvars[0].aval.dtype in (jnp.float32, jnp.bfloat16), eqn
  # After XLA: encode, decode and three gradient matmuls, no sixth one for
  # b_dec's gradient (whose b_dec @ W_enc term leaves only vector products).
  assert jax.default_backend() == "cpu"  # conftest's default; GPU HLO names dots differently
  hlo = jax.jit(jax.grad(loss), static_argnums=1).lower(params, settings).compile().as_text()
  shapes = re.findall(r"= (?:f32|bf16)\[(\d+),(\d+)\]\S* dot\(", hlo)
  assert sorted(shapes) == sorted([("16", "64"), ("16", "32"), ("16", "64"), ("64", "32"),
                                   ("32", "64")] + [s for s in shapes if "1" in s]), shapes
  g = jax.grad(loss)(params, settings)
  assert all(getattr(g, n).dtype == jnp.float32 for n in ("W_enc", "W_dec", "b_enc", "b_dec"))


def test_bfloat16_matmul_gradients_equal_float32_math_on_rounded_operands():
  """bf16 operands (cotangent included), f32 accumulation; dx rounded to bf16, dw not."""
  from jsae import ops  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(0), (12, 24))
  w = jax.random.normal(jax.random.key(1), (24, 40))
  rnd = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  out, vjp = jax.vjp(lambda x, w: ops.matmul(x, w, "bfloat16"), x, w)
  ct = jax.random.normal(jax.random.key(2), out.shape)
  dx, dw = vjp(ct)
  np.testing.assert_allclose(out, rnd(x) @ rnd(w), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, rnd(rnd(ct) @ rnd(w).T), rtol=1e-5, atol=1e-5)  # bf16 result
  np.testing.assert_allclose(dw, rnd(x).T @ rnd(ct), rtol=1e-5, atol=1e-5)
  assert dw.dtype == jnp.float32 and not np.array_equal(dw, rnd(dw))  # not rounded to bf16


def test_mixed_matmul_matches_plain_gradients_in_float32_and_under_vmap():
  from jsae import ops  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(0), (3, 5, 8))
  ws = jax.random.normal(jax.random.key(1), (2, 8, 16))
  f = lambda x, w: jnp.sum(jnp.sin(ops.matmul(x, w, "float32")))
  ref = lambda x, w: jnp.sum(jnp.sin(x @ w))
  for got, want in zip(jax.grad(f, (0, 1))(x, ws[0]), jax.grad(ref, (0, 1))(x, ws[0])):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The pre-encoder-bias form (x - b) @ w, with its cheap gradient for b.
  b = jax.random.normal(jax.random.key(2), (8,))
  fb = lambda x, b, w: jnp.sum(jnp.sin(ops.matmul(x, w, "float32", input_bias=b)))
  refb = lambda x, b, w: jnp.sum(jnp.sin((x - b) @ w))
  for got, want in zip(jax.grad(fb, (0, 1, 2))(x, b, ws[0]),
                       jax.grad(refb, (0, 1, 2))(x, b, ws[0])):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Vmapped over stacked SAEs (a sweep), the bias batched too; and in bfloat16.
  bs = jnp.stack([b, 2 * b])
  got = jax.grad(lambda bs, ws: jax.vmap(lambda b, w: fb(x, b, w))(bs, ws).sum(), (0, 1))(bs, ws)
  want = jax.grad(lambda bs, ws: jax.vmap(lambda b, w: refb(x, b, w))(bs, ws).sum(), (0, 1))(bs, ws)
  for g, w_ in zip(got, want):
    np.testing.assert_allclose(g, w_, rtol=1e-5, atol=1e-5)
  db = jax.grad(lambda b: jnp.sum(jnp.sin(ops.matmul(x, ws[0], "bfloat16", input_bias=b))))(b)
  np.testing.assert_allclose(db, jax.grad(refb, 1)(x, b, ws[0]), rtol=0.03, atol=0.03)
  with pytest.raises(ValueError, match="2-D weight"):
    ops.matmul(x, ws, "float32")
  got = jax.grad(lambda ws: jax.vmap(lambda w: f(x, w))(ws).sum())(ws)
  want = jax.grad(lambda ws: jax.vmap(lambda w: ref(x, w))(ws).sum())(ws)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_wrong_input_width_is_a_clear_error():
  with pytest.raises(ValueError, match="expects d_in=16"):
    jsae.encode(_params(), jnp.ones((2, 17)))


def test_unknown_family_and_foreign_params():
  with pytest.raises(ValueError, match="known families"):
    saes.get("nope")
  with pytest.raises(TypeError, match="not the parameter type"):
    jsae.encode({"W_enc": 1}, jnp.ones(3))


def test_scale_invariance_of_mask_and_losses():
  """x -> s x with theta, eps and biases -> s (.): same mask, s^2 losses, grads / s."""
  s = 7.0
  p = _params()
  x = jax.random.normal(jax.random.key(4), (64, 16)) * 0.3
  ps = p.replace(b_enc=s * p.b_enc, b_dec=s * p.b_dec, threshold=s * p.threshold)
  settings, settings_s = 0.05, 0.05 * s  # the bandwidths
  (l1, a1), g1 = jax.value_and_grad(lambda p: _loss(p, x, bandwidth=settings),
                                    has_aux=True)(p)
  (l2, a2), g2 = jax.value_and_grad(lambda p: _loss(p, s * x, bandwidth=settings_s),
                                    has_aux=True)(ps)
  np.testing.assert_array_equal(a1.f != 0, a2.f != 0)
  np.testing.assert_allclose(a2.parts["reconstruction"], s**2 * a1.parts["reconstruction"],
                             rtol=1e-4)
  np.testing.assert_allclose(a2.parts["sparsity"], a1.parts["sparsity"])  # L0 is scale-free
  np.testing.assert_allclose(g2.threshold, s * g1.threshold, rtol=1e-3, atol=1e-6)
  # The L0 term's threshold gradient (Step estimator, 1/eps) scales as 1/s.
  step_grad = lambda p, x, eps: jax.grad(lambda p: _loss(
      p, x, bandwidth=eps, coeff=1.0)[1].parts["sparsity"])(p).threshold
  np.testing.assert_allclose(step_grad(ps, s * x, settings_s), step_grad(p, x, settings) / s,
                             rtol=1e-4, atol=1e-6)


def test_loss_terms_closed_forms():
  x = jnp.array([[1.0, 2.0], [3.0, 5.0]])
  x_hat = jnp.array([[1.0, 1.0], [2.0, 5.0]])
  assert float(losses.reconstruction(x, x_hat)) == pytest.approx((1 + 1) / 2)
  # FVU: sum err^2 / sum ||x - mean||^2 = 2 / (2*1 + 2*2.25) ; mean=(2, 3.5)
  assert float(losses.fvu(x, x_hat)) == pytest.approx(2 / (1 + 1 + 2.25 + 2.25))
  gates = jnp.array([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
  assert float(losses.step_l0(gates)) == pytest.approx(2.5)
  assert float(losses.quadratic_l0(gates, 5.0)) == pytest.approx((2.5 / 5 - 1) ** 2)
  f = jnp.array([[0.5, 0.0, -1.0]])
  norms = jnp.array([1.0, 2.0, 0.5])
  assert float(losses.tanh_penalty(f, norms, 4.0)) == pytest.approx(np.tanh(2.0) + np.tanh(2.0))
  pre = jnp.array([[0.1, 0.5, -0.2]])
  theta = jnp.array([0.3, 0.3, 0.3])
  assert float(losses.pre_activation(pre, theta, norms)) == pytest.approx(0.2 * 1 + 0.5 * 0.5)
  mask = jnp.array([False, True, True])
  assert float(losses.pre_activation(pre, theta, norms, mask)) == pytest.approx(0.25)


@pytest.mark.parametrize("sparsity", ["step", "tanh", "quadratic"])
def test_sparsity_penalties_train_the_threshold(sparsity):
  p = _params()
  x = jax.random.normal(jax.random.key(5), (256, 16)) * 0.3
  grad = jax.grad(lambda p: _loss(p, x, bandwidth=0.2, coeff=1.0, sparsity=sparsity,
                                  target_l0=1.0)[1].parts["sparsity"])(p)
  assert np.abs(np.asarray(grad.threshold)).max() > 0
  if sparsity != "tanh":  # step-based penalties train theta only
    assert not np.any(grad.W_enc) and not np.any(grad.b_enc)


def test_lr_schedule_shape():
  sched = optim.lr_schedule(lr=1.0, warmup_steps=100, total_steps=1000, decay="linear",
                            decay_start_frac=0.8)
  assert float(sched(0)) == pytest.approx(0.1)
  assert float(sched(50)) == pytest.approx(0.55)  # half-cosine midpoint
  assert float(sched(100)) == pytest.approx(1.0)
  assert float(sched(500)) == pytest.approx(1.0)
  assert float(sched(900)) == pytest.approx(0.5)
  assert float(sched(1000)) == pytest.approx(0.0, abs=1e-6)


def test_sparsity_coeff_warmup():
  f = lambda t: float(saes.base.warmed_coeff(2.0, jnp.asarray(t), 10))
  assert (f(0), f(5), f(10), f(20)) == (0.0, 1.0, 2.0, 2.0)


def test_adam_without_momentum_equals_optax_adam_b1_zero():
  params = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(4)}
  ours, ref = optim.scale_by_adam_no_momentum(), optax.scale_by_adam(b1=0.0)
  s1, s2 = ours.init(params), ref.init(params)
  for i in range(5):
    g = jax.tree.map(lambda p: jnp.sin(p * (i + 1)), params)
    u1, s1 = ours.update(g, s1)
    u2, s2 = ref.update(g, s2)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_allclose(a, b, rtol=1e-6)
  assert len(jax.tree.leaves(s1)) < len(jax.tree.leaves(s2))  # no momentum buffer


def test_decoder_constraint():
  p = _params()
  g = jax.tree.map(lambda x: jnp.ones_like(x), p)
  projected, _ = optim.project_decoder_gradient().update(g, optax.EmptyState(), p)
  np.testing.assert_allclose(jnp.sum(projected.W_dec * p.W_dec, axis=1), 0.0, atol=1e-5)
  config = ConfigDict(dict(lr=0.1, b1=0.0, b2=0.999, eps=1e-8, warmup_steps=0, decay="none",
                           decay_start_frac=0.8, final_lr_frac=0.0, clip_grad_norm=1.0,
                           decoder_unit_norm=True))
  opt = optim.make_optimizer(config, total_steps=10)
  updates, _ = opt.update(g, opt.init(p), p)
  new = optim.apply_updates(p, updates, family=FAMILY, decoder_unit_norm=True)
  np.testing.assert_allclose(np.linalg.norm(new.W_dec, axis=1), 1.0, rtol=1e-6)
  assert float(jnp.min(new.threshold)) >= 0.0  # raw theta stays non-negative
