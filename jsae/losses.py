"""Loss terms shared by SAE families. All return float32 scalars.

Conventions (Gemma Scope): squared error is summed over the `d_in` dimensions
and averaged over the batch, on inputs scaled so E||x||^2 = 1; penalties are
per token, averaged over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reconstruction(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """Mean over the batch of ||x - x_hat||^2 (summed over dims); x: [batch, d_in]."""
  err = x.astype(jnp.float32) - x_hat.astype(jnp.float32)
  return jnp.mean(jnp.sum(jnp.square(err), axis=-1))


def step_l0(gates: jax.Array) -> jax.Array:
  """Batch-mean L0 from 0/1 gates `[batch, d_sae]` (the paper's sparsity term)."""
  return jnp.mean(jnp.sum(gates.astype(jnp.float32), axis=-1))


def tanh_penalty(f: jax.Array, dec_norms: jax.Array, scale: float) -> jax.Array:
  """Anthropic's sum_i tanh(c |f_i| ||d_i||), batch mean; f: [batch, d_sae]."""
  weighted = jnp.abs(f.astype(jnp.float32)) * dec_norms
  return jnp.mean(jnp.sum(jnp.tanh(scale * weighted), axis=-1))


def quadratic_l0(gates: jax.Array, target_l0: float) -> jax.Array:
  """Target-L0 penalty (mean_L0 / T - 1)^2 on the batch-mean L0 (Gemma Scope 2, dictionary_learning)."""
  return jnp.square(step_l0(gates) / target_l0 - 1.0)


def pre_activation(pre: jax.Array, threshold: jax.Array, dec_norms: jax.Array,
                   latent_mask: jax.Array | None = None) -> jax.Array:
  """sum_i ReLU(theta_i - pi_i) ||d_i||, batch mean: pulls silent latents up.

  Args:
    pre: pre-activations `[batch, d_sae]`.
    threshold: `[d_sae]`.
    dec_norms: decoder row norms `[d_sae]`.
    latent_mask: `[d_sae]` bool; only these latents contribute (e.g. dead ones).
  """
  below = jax.nn.relu(threshold - pre.astype(jnp.float32)) * dec_norms
  if latent_mask is not None:
    below = below * latent_mask.astype(jnp.float32)
  return jnp.mean(jnp.sum(below, axis=-1))


def fvu(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """Fraction of variance unexplained sum||x - x_hat||^2 / sum||x - mean(x)||^2."""
  x = x.astype(jnp.float32)
  err = jnp.sum(jnp.square(x - x_hat.astype(jnp.float32)))
  var = jnp.sum(jnp.square(x - jnp.mean(x, axis=0, keepdims=True)))
  return err / jnp.maximum(var, jnp.finfo(jnp.float32).tiny)
