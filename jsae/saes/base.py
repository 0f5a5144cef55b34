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
