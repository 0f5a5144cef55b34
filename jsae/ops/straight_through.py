"""JumpReLU and Heaviside step with straight-through pseudo-derivatives.

The straight-through estimators of jsae (the other `custom_vjp`, in
`jsae.ops.matmul`, only sets matmul precisions). Following Rajamanoharan et al. (2024),
with K the rectangle kernel of bandwidth eps:

  jumprelu(z, theta) = z * H(z - theta)
    d/dz     = H(z - theta)                       (a.e. derivative)
    d/dtheta = -(theta / eps) * K((z - theta) / eps)
  step(z, theta) = H(z - theta)
    d/dz     = 0
    d/dtheta = -(1 / eps) * K((z - theta) / eps)

H(0) = 0, so a pre-activation exactly at the threshold is off. The threshold
cotangent is summed over every axis that `z` broadcasts over, so it has the
threshold's own shape (normally `[d_sae]`). With `ste_to_input=True` (the
Anthropic Jan-2025 variant) the input also receives the estimator:
d/dz := -d/dtheta, since both functions depend on z only through z - theta.

`z` may be bfloat16; the threshold should be float32. Pseudo-derivatives are
computed in float32 and cast to each primal's dtype.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

__all__ = ["jumprelu", "step", "rectangle"]


def rectangle(u: jax.Array) -> jax.Array:
  """Rectangle kernel: 1 on the open interval |u| < 1/2, else 0 (unit integral)."""
  return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def _check_bandwidth(bandwidth) -> None:
  if isinstance(bandwidth, numbers.Real) and not bandwidth > 0:
    raise ValueError(
        f"bandwidth must be > 0 (the width of the straight-through window, in"
        f" the units of the pre-activations); got {bandwidth}. Gemma Scope uses"
        f" 0.001 on inputs normalised to E||x||^2 = 1.")


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums `x` over the axes it was broadcast along so the result has `shape`."""
  lead = x.ndim - len(shape)
  x = x.sum(axis=tuple(range(lead))) if lead else x
  keep_one = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
  return x.sum(axis=keep_one, keepdims=True) if keep_one else x


def _window(z, threshold, bandwidth):
  """K((z - theta) / eps) / eps in float32: the kernel-density weight."""
  z32 = z.astype(jnp.float32)
  th32 = threshold.astype(jnp.float32)
  eps = jnp.asarray(bandwidth, jnp.float32)
  return rectangle((z32 - th32) / eps) / eps, th32


# --- JumpReLU -----------------------------------------------------------------


# `ste_to_input` is a Python bool (static); arrays, bandwidth included, are
# primal inputs so that a bandwidth can be traced (e.g. vmapped in a sweep).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _jumprelu(z, threshold, bandwidth, ste_to_input):
  del bandwidth, ste_to_input
  return z * (z > threshold).astype(z.dtype)


def _jumprelu_fwd(z, threshold, bandwidth, ste_to_input):
  out = _jumprelu(z, threshold, bandwidth, ste_to_input)
  return out, (z, threshold, bandwidth)


def _jumprelu_bwd(ste_to_input, res, g):
  z, threshold, bandwidth = res
  window, th32 = _window(z, threshold, bandwidth)
  g32 = g.astype(jnp.float32)
  d_theta = -th32 * window * g32  # per element: -(theta/eps) K(.) * g
  d_z = (z > threshold).astype(jnp.float32) * g32
  if ste_to_input:
    d_z = d_z - d_theta
  return (
      d_z.astype(z.dtype),
      _sum_to_shape(d_theta, threshold.shape).astype(threshold.dtype),
      jnp.zeros_like(bandwidth),
  )


_jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


# --- Heaviside step -------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _step(z, threshold, bandwidth, ste_to_input):
  del bandwidth, ste_to_input
  return (z > threshold).astype(z.dtype)


def _step_fwd(z, threshold, bandwidth, ste_to_input):
  return _step(z, threshold, bandwidth, ste_to_input), (z, threshold, bandwidth)


def _step_bwd(ste_to_input, res, g):
  z, threshold, bandwidth = res
  window, _ = _window(z, threshold, bandwidth)
  d_theta = -window * g.astype(jnp.float32)  # per element: -(1/eps) K(.) * g
  d_z = -d_theta if ste_to_input else jnp.zeros_like(d_theta)
  return (
      d_z.astype(z.dtype),
      _sum_to_shape(d_theta, threshold.shape).astype(threshold.dtype),
      jnp.zeros_like(bandwidth),
  )


_step.defvjp(_step_fwd, _step_bwd)


# --- Public API -----------------------------------------------------------------


def _prepare(z, threshold, bandwidth, ste_to_input):
  _check_bandwidth(bandwidth)
  z = jnp.asarray(z)
  threshold = jnp.asarray(threshold)
  try:
    broadcast = jnp.broadcast_shapes(z.shape, threshold.shape)
  except ValueError:
    broadcast = None
  if threshold.ndim > z.ndim or broadcast != z.shape:
    raise ValueError(
        f"threshold of shape {threshold.shape} does not broadcast against"
        f" pre-activations of shape {z.shape}; pass one threshold per latent"
        f" (shape [{z.shape[-1] if z.ndim else 1}]).")
  bandwidth = jnp.asarray(bandwidth, jnp.float32)
  return z, threshold, bandwidth, bool(ste_to_input)


def jumprelu(z, threshold, bandwidth, *, ste_to_input: bool = False):
  """JumpReLU z * H(z - threshold) with the paper's straight-through gradients.

  Args:
    z: pre-activations `[..., d_sae]` (float32 or bfloat16).
    threshold: `[d_sae]` (float32), or anything broadcastable against `z`.
    bandwidth: kernel width eps (> 0); a Python float or a traced scalar.
    ste_to_input: also pass the estimator to `z` (d/dz gains (theta/eps) K).

  Returns:
    `[..., d_sae]` in `z`'s dtype.
  """
  return _jumprelu(*_prepare(z, threshold, bandwidth, ste_to_input))


def step(z, threshold, bandwidth, *, ste_to_input: bool = False):
  """Heaviside H(z - threshold) with the paper's straight-through gradients.

  Args:
    z: pre-activations `[..., d_sae]` (float32 or bfloat16).
    threshold: `[d_sae]` (float32), or anything broadcastable against `z`.
    bandwidth: kernel width eps (> 0); a Python float or a traced scalar.
    ste_to_input: also pass the estimator to `z` (d/dz = +(1/eps) K).

  Returns:
    `[..., d_sae]` of 0/1 in `z`'s dtype; its sum over the last axis is L0.
  """
  return _step(*_prepare(z, threshold, bandwidth, ste_to_input))
