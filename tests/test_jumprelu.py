"""The straight-through estimators against closed forms and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsae

EPS = 0.1


def _inputs(shape, seed=0):
  """Pre-activations, thresholds and a cotangent, with many points in the window."""
  rng = np.random.default_rng(seed)
  d_sae = shape[-1]
  theta = rng.uniform(0.2, 0.6, d_sae).astype(np.float32)
  z = (theta + rng.uniform(-0.3, 0.3, shape)).astype(np.float32)
  g = rng.standard_normal(shape).astype(np.float32)
  return jnp.asarray(z), jnp.asarray(theta), jnp.asarray(g)


def _kernel(z, theta, eps):
  return (np.abs((np.asarray(z) - np.asarray(theta)) / eps) < 0.5) / eps


def _lead_axes(x):
  return tuple(range(x.ndim - 1))


@pytest.mark.parametrize("shape", [(32, 7), (4, 8, 7)])
@pytest.mark.parametrize("ste_to_input", [False, True])
def test_jumprelu_pseudo_derivatives_closed_form(shape, ste_to_input):
  z, theta, g = _inputs(shape)
  out, vjp = jax.vjp(lambda z, t: jsae.jumprelu(z, t, EPS, ste_to_input=ste_to_input), z, theta)
  dz, dtheta = vjp(g)
  zn, tn, gn = map(np.asarray, (z, theta, g))
  np.testing.assert_array_equal(out, zn * (zn > tn))
  k = _kernel(zn, tn, EPS)
  expected_dtheta = (-(tn * k) * gn).sum(axis=_lead_axes(zn))
  expected_dz = (zn > tn) * gn + (tn * k * gn if ste_to_input else 0.0)
  assert dtheta.shape == theta.shape
  np.testing.assert_allclose(dtheta, expected_dtheta, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dz, expected_dz, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(32, 7), (4, 8, 7)])
@pytest.mark.parametrize("ste_to_input", [False, True])
def test_step_pseudo_derivatives_closed_form(shape, ste_to_input):
  z, theta, g = _inputs(shape, seed=1)
  out, vjp = jax.vjp(lambda z, t: jsae.step(z, t, EPS, ste_to_input=ste_to_input), z, theta)
  dz, dtheta = vjp(g)
  zn, tn, gn = map(np.asarray, (z, theta, g))
  np.testing.assert_array_equal(out, (zn > tn).astype(np.float32))
  k = _kernel(zn, tn, EPS)
  np.testing.assert_allclose(dtheta, (-k * gn).sum(axis=_lead_axes(zn)), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dz, k * gn if ste_to_input else np.zeros_like(zn), atol=1e-6)


def _smoothed_step(z, theta, eps):
  """H convolved with the rectangle kernel: a ramp of width eps around theta."""
  return jnp.clip((z - theta) / eps + 0.5, 0.0, 1.0)


def test_estimators_equal_gradient_of_kernel_smoothed_step():
  """Smoothing H with K gives an ordinary function whose gradient is the estimator."""
  z, theta, g = _inputs((64, 5), seed=2)
  # Keep points away from the window edges, where the smoothed ramp has a kink.
  u = np.abs(np.asarray(z - theta)) / EPS
  z = jnp.where(jnp.abs(u - 0.5) < 0.02, z + 0.05 * EPS, z)
  theta64 = np.asarray(theta, np.float64)
  loss = lambda t: np.sum(np.asarray(g, np.float64) * np.clip(
      (np.asarray(z, np.float64) - t) / EPS + 0.5, 0.0, 1.0))
  h = 1e-5
  fd = np.array([(loss(theta64 + h * e) - loss(theta64 - h * e)) / (2 * h)
                 for e in np.eye(theta.shape[0])])
  step_grad = jax.grad(lambda t: jnp.sum(g * jsae.step(z, t, EPS)))(theta)
  np.testing.assert_allclose(step_grad, fd, rtol=1e-3, atol=1e-2)
  # JumpReLU's jump has height theta: its estimator is theta times the smoothed step's.
  jump_grad = jax.grad(lambda t: jnp.sum(g * jsae.jumprelu(z, t, EPS)))(theta)
  np.testing.assert_allclose(jump_grad, np.asarray(theta) * fd, rtol=1e-3, atol=1e-2)
  # And the smoothed step's autodiff gradient agrees with the finite differences.
  auto = jax.grad(lambda t: jnp.sum(g * _smoothed_step(z, t, EPS)))(theta)
  np.testing.assert_allclose(auto, fd, rtol=1e-3, atol=1e-2)


def test_threshold_at_pre_activation_is_off():
  z = jnp.array([[0.5, 0.49, 0.51]])
  theta = jnp.array([0.5, 0.5, 0.5])
  np.testing.assert_array_equal(jsae.jumprelu(z, theta, EPS), np.float32([[0.0, 0.0, 0.51]]))
  np.testing.assert_array_equal(jsae.step(z, theta, EPS), [[0.0, 0.0, 1.0]])


def test_bfloat16_inputs_float32_threshold():
  z, theta, g = _inputs((16, 6), seed=3)
  zb = z.astype(jnp.bfloat16)
  out, vjp = jax.vjp(lambda z, t: jsae.jumprelu(z, t, EPS), zb, theta)
  dz, dtheta = vjp(g.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16 and dz.dtype == jnp.bfloat16
  assert dtheta.dtype == jnp.float32 and dtheta.shape == (6,)
  zn = np.asarray(zb.astype(jnp.float32))
  gn = np.asarray(g.astype(jnp.bfloat16).astype(jnp.float32))
  tn = np.asarray(theta)
  expected = (-(tn * _kernel(zn, tn, EPS)) * gn).sum(0)
  np.testing.assert_allclose(dtheta, expected, rtol=1e-5, atol=1e-4)


def test_jit_vmap_and_traced_bandwidth():
  z, theta, g = _inputs((8, 16, 4), seed=4)
  f = lambda z, t, eps: jnp.sum(g[0] * jsae.step(z, t, eps))
  per_example = jax.jit(jax.vmap(jax.grad(f, argnums=1), in_axes=(0, None, None)))(z, theta, EPS)
  direct = np.stack([np.asarray(jax.grad(f, argnums=1)(z[i], theta, EPS)) for i in range(8)])
  np.testing.assert_allclose(per_example, direct, rtol=1e-6)
  # A sweep over bandwidths: the estimator scales as 1/eps inside the window.
  sweep = jax.vmap(jax.grad(f, argnums=1), in_axes=(None, None, 0))(z[0], theta, jnp.array([EPS, 2 * EPS]))
  zn, tn, gn = np.asarray(z[0]), np.asarray(theta), np.asarray(g[0])
  for i, eps in enumerate([EPS, 2 * EPS]):
    np.testing.assert_allclose(sweep[i], (-_kernel(zn, tn, eps) * gn).sum(0), rtol=1e-5, atol=1e-4)


def test_threshold_cotangent_is_per_latent_not_scalar():
  """The bug of some public ports: summing over all axes gives a scalar-like gradient."""
  z = jnp.array([[0.50, 0.10], [0.52, 0.10]])  # only latent 0 has points in its window
  theta = jnp.array([0.5, 0.5])
  grad = jax.grad(lambda t: jnp.sum(jsae.step(z, t, EPS)))(theta)
  np.testing.assert_allclose(grad, [-2 / EPS, 0.0])


@pytest.mark.parametrize("bad", [0.0, -1e-3])
def test_non_positive_bandwidth_rejected(bad):
  with pytest.raises(ValueError, match="bandwidth must be > 0"):
    jsae.jumprelu(jnp.ones((2, 3)), jnp.ones(3), bad)


def test_mismatched_threshold_shape_rejected():
  with pytest.raises(ValueError, match="does not broadcast"):
    jsae.step(jnp.ones((2, 3)), jnp.ones(4), 0.1)
