"""Mixed-precision matmul with a custom VJP, and decoder-row norms.

The numerics every SAE family shares: operands cast to a compute dtype
(bfloat16 on accelerators), float32 accumulation, float32 weight gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def matmul(x: jax.Array, w: jax.Array, compute_dtype: str | jnp.dtype,
           input_bias: jax.Array | None = None) -> jax.Array:
  """`(x - input_bias) @ w`: `x: [..., k]`, `w: [k, n]` -> `[..., n]` float32.

  Operands are cast to `compute_dtype` and products accumulate in float32, in
  the forward pass and in both gradient matmuls; the input gradient is rounded
  to `compute_dtype`, the weight gradient stays float32. (JAX's own transpose of a
  `preferred_element_type=float32` dot multiplies the float32 cotangent with
  the bfloat16 operand, which runs as a float32 matmul, and rounds the weight
  gradient to bfloat16; here the cotangent is cast once and `dw` stays float32.)

  The gradient of `input_bias: [k]` (a pre-encoder bias) is `-(sum of the
  cotangent over leading axes) @ w.T`, a vector product, instead of autodiff's
  full `[..., n] @ [n, k]` matmul followed by the sum (+20% of a train step).

  Reverse mode only (`grad`, `vjp`), as for every `jax.custom_vjp`; stack
  several SAEs with `jax.vmap`, not with a batched `w`.
  """
  if w.ndim != 2:
    raise ValueError(f"matmul expects a 2-D weight [k, n], got shape {w.shape};"
                     " use jax.vmap over stacked SAEs.")
  if input_bias is None:
    return _mixed_matmul(x, w, jnp.dtype(compute_dtype))
  return _biased_matmul(x, input_bias, w, jnp.dtype(compute_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_matmul(x, w, dtype):
  return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _mixed_matmul_fwd(x, w, dtype):
  xc, wc = x.astype(dtype), w.astype(dtype)
  out = jnp.matmul(xc, wc, preferred_element_type=jnp.float32)
  # Residuals: the cast operands, and zero-size arrays that carry the input dtypes.
  return out, (xc, wc, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _mixed_matmul_bwd(dtype, residuals, g):
  xc, wc, x_kind, w_kind = residuals
  gc = g.astype(dtype)
  # dx leaves in compute_dtype: it is an activation gradient that the next
  # matmul back casts to compute_dtype anyway, and at [batch, d_sae] the f32
  # copy would cost a full extra pass over memory.
  dx = jnp.matmul(gc, wc.T, preferred_element_type=dtype)
  # dw = sum over every leading axis of x^T g: [k, n].
  dw = jnp.tensordot(xc, gc, axes=(tuple(range(xc.ndim - 1)),) * 2,
                     preferred_element_type=jnp.float32)
  return dx.astype(x_kind.dtype), dw.astype(w_kind.dtype)


_mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _biased_matmul(x, b, w, dtype):
  return _mixed_matmul(x - b.astype(x.dtype), w, dtype)


def _biased_matmul_fwd(x, b, w, dtype):
  out, residuals = _mixed_matmul_fwd(x - b.astype(x.dtype), w, dtype)
  return out, (residuals, jnp.zeros((0,), b.dtype))


def _biased_matmul_bwd(dtype, residuals, g):
  residuals, b_kind = residuals
  dx, dw = _mixed_matmul_bwd(dtype, residuals, g)
  wc = residuals[1]
  g_sum = jnp.sum(g.astype(jnp.float32), axis=tuple(range(g.ndim - 1)))  # [n]
  db = -jnp.matmul(g_sum.astype(dtype), wc.T, preferred_element_type=jnp.float32)
  return dx, db.astype(b_kind.dtype), dw


_biased_matmul.defvjp(_biased_matmul_fwd, _biased_matmul_bwd)


def decoder_norms(W_dec: jax.Array) -> jax.Array:
  """Row norms ||d_i|| of a decoder `W_dec: [d_sae, d_in]` -> `[d_sae]`."""
  return jnp.sqrt(jnp.sum(jnp.square(W_dec.astype(jnp.float32)), axis=-1))


