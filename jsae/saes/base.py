"""The small protocol every SAE family implements, and the registry by name.

A family is a namespace of pure functions over its own parameter pytree. The
trainer only calls `init`, `loss`, `constrain`; users call `encode`/`decode`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp

Params = Any


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """Static hyperparameters of one training loss (hashable, so jit-static).

  Attributes:
    bandwidth: straight-through kernel width eps, in normalised units.
    ste_to_input: pass the estimator's gradient to the pre-activations too.
    sparsity: 'step' (L0), 'tanh' (Anthropic) or 'quadratic' (target L0).
    tanh_scale: c in tanh(c * |f_i| * ||d_i||).
    target_l0: T of the quadratic penalty (L0_mean / T - 1)^2.
    pre_act_coeff: weight of the pre-activation loss (0 disables it).
    pre_act_dead_only: apply the pre-activation loss to dead latents only.
    compute_dtype: dtype of the encoder/decoder matmuls ('float32'/'bfloat16').
  """

  bandwidth: float = 0.001
  ste_to_input: bool = False
  sparsity: str = "step"
  tanh_scale: float = 4.0
  target_l0: float = 50.0
  pre_act_coeff: float = 0.0
  pre_act_dead_only: bool = True
  compute_dtype: str = "float32"


class Family(Protocol):
  """What an SAE family provides."""

  name: str
  params_type: type

  def init(self, key: jax.Array, *, d_in: int, d_sae: int, **options) -> Params:
    """Fresh float32 parameters."""

  def encode(self, params: Params, x: jax.Array, **kw) -> jax.Array:
    """Latents `[..., d_sae]` of inputs `x: [..., d_in]`."""

  def decode(self, params: Params, f: jax.Array, **kw) -> jax.Array:
    """Reconstruction `[..., d_in]` of latents `f: [..., d_sae]`."""

  def loss(self, params: Params, x: jax.Array, *, settings: LossSettings,
           sparsity_coeff: jax.Array, dead: jax.Array) -> tuple[jax.Array, dict]:
    """Scalar training loss on `x: [batch, d_in]` and its parts."""

  def constrain(self, params: Params) -> Params:
    """Projects parameters back onto their constraint set after an update."""


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
  """Adds a family to the registry under `family.name`."""
  _REGISTRY[family.name] = family
  return family


def get(name: str) -> Family:
  """The family registered as `name`, with a clear error for unknown names."""
  if name not in _REGISTRY:
    raise ValueError(
        f"unknown SAE family {name!r}; known families: {sorted(_REGISTRY)}."
        " Set config.sae.family to one of them.")
  return _REGISTRY[name]


def names() -> list[str]:
  """Names of all registered families."""
  return sorted(_REGISTRY)


def family_of(params: Params) -> Family:
  """The family whose parameter type `params` is."""
  for family in _REGISTRY.values():
    if isinstance(params, family.params_type):
      return family
  raise TypeError(
      f"{type(params).__name__} is not the parameter type of any SAE family"
      f" ({names()}); create parameters with jsae.saes.get(name).init(...).")


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


