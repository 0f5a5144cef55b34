"""Loss terms shared by SAE families. All return float32 scalars.

Conventions (Gemma Scope): squared error is summed over the `d_in` dimensions
and averaged over the batch, on inputs scaled so E||x||^2 = 1; penalties are
per token, averaged over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsae import ops


def reconstruction(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """Mean over the batch of ||x - x_hat||^2 (summed over dims); x: [batch, d_in]."""
  err = x.astype(jnp.float32) - x_hat.astype(jnp.float32)
  return jnp.mean(jnp.sum(jnp.square(err), axis=-1))


def step_l0(gates: jax.Array) -> jax.Array:
  """Batch-mean L0 from 0/1 gates `[batch, d_sae]` (the paper's sparsity term)."""
  return jnp.mean(jnp.sum(gates.astype(jnp.float32), axis=-1))


def weighted_l1(f: jax.Array, dec_norms: jax.Array) -> jax.Array:
  """sum_i |f_i| ||d_i||, batch mean (Anthropic April 2024; SAELens `standard`); f: [batch, d_sae]."""
  return jnp.mean(jnp.sum(jnp.abs(f.astype(jnp.float32)) * dec_norms, axis=-1))


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


def auxk(residual: jax.Array, pre: jax.Array, dead: jax.Array, W_dec: jax.Array,
         k_aux: int, *, form: str = "gao", compute_dtype="float32") -> jax.Array:
  """AuxK dead-latent loss (Gao et al. 2024 App. A.2): dead latents model the residual.

  The k_aux largest pre-activations among dead latents (live ones set to -inf)
  reconstruct the stopped-gradient residual e = x - x_hat with the decoder
  alone (no b_dec).

  Args:
    residual: e `[batch, d_in]` (the caller stops its gradient).
    pre: pre-activations `[batch, d_sae]`.
    dead: `[d_sae]` bool.
    W_dec: `[d_sae, d_in]`.
    k_aux: static number of dead latents used per row (<= d_sae).
    form: 'gao': ReLU'd values, ||e - e_hat||^2 / ||e - mean_batch(e)||^2
      summed over the batch (OpenAI, dictionary_learning); 'saelens': raw
      (pre-ReLU) values, batch mean of ||e - e_hat||^2, times min(n_dead/k_aux, 1).
    compute_dtype: the decoder matmul's dtype.

  Returns:
    The scalar loss (0 when no latent is dead or the residual has no variance).
  """
  neg = jnp.asarray(-jnp.inf, jnp.float32)
  masked = jnp.where(dead, pre.astype(jnp.float32), neg)
  values, idx = jax.lax.top_k(masked, k_aux)  # [batch, k_aux]
  valid = values > neg
  values = jnp.where(valid, values if form == "saelens" else jax.nn.relu(values), 0.0)
  z = jnp.zeros_like(masked).at[jnp.arange(pre.shape[0])[:, None], idx].add(values)
  e_hat = ops.matmul(z, W_dec, compute_dtype)
  e = residual.astype(jnp.float32)
  err = jnp.sum(jnp.square(e - e_hat))
  if form == "saelens":
    n_dead = jnp.sum(dead.astype(jnp.float32))
    return err / pre.shape[0] * jnp.minimum(n_dead / k_aux, 1.0)
  var = jnp.sum(jnp.square(e - jnp.mean(e, axis=0, keepdims=True)))
  ok = (var > 0) & jnp.any(dead)
  return jnp.where(ok, err / jnp.maximum(var, jnp.finfo(jnp.float32).tiny), 0.0)
