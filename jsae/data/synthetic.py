"""Activations from a planted dictionary: a training source with known ground truth.

    x = sum_i c_i d_i + noise,   c_i = active_i * m_i >= 0

`d_i` are `n_features` random unit vectors in R^d_in; latent i fires with
probability p_i proportional to rank^-zipf_exponent (a heavy-tailed firing
frequency, as measured for real SAE latents), scaled so the expected number of
active features per row is `l0`; magnitudes m_i ~ Uniform(0.5, 1.5). Batches
are generated on device by a jitted function of (seed, step).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def firing_probabilities(n_features: int, l0: float, zipf_exponent: float) -> np.ndarray:
  """p_i ~ (i+1)^-a scaled so sum_i p_i = l0 (capped at 1); `[n_features]`."""
  if not 0 < l0 < n_features:
    raise ValueError(f"synthetic l0 must be in (0, n_features={n_features}); got {l0}.")
  raw = np.arange(1, n_features + 1, dtype=np.float64) ** -zipf_exponent
  p = raw * l0 / raw.sum()
  for _ in range(50):  # redistribute the mass that the cap at 1 removes
    p = np.minimum(p, 1.0)
    deficit = l0 - p.sum()
    if deficit < 1e-9:
      break
    free = p < 1.0
    p[free] += deficit * raw[free] / raw[free].sum()
  return p.astype(np.float32)


def planted_dictionary(n_features: int, d_in: int, seed: int) -> np.ndarray:
  """`[n_features, d_in]` random unit-norm directions."""
  rng = np.random.default_rng(seed)
  d = rng.standard_normal((n_features, d_in)).astype(np.float32)
  return d / np.linalg.norm(d, axis=1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _generate(key, features, probs, noise_std, *, batch_size):
  """One batch `[batch_size, d_in]` and its true coefficients `[batch_size, n_features]`."""
  k_fire, k_mag, k_noise = jax.random.split(key, 3)
  n_features, d_in = features.shape
  active = jax.random.uniform(k_fire, (batch_size, n_features)) < probs
  mags = jax.random.uniform(k_mag, (batch_size, n_features), minval=0.5, maxval=1.5)
  coeffs = jnp.where(active, mags, 0.0)
  x = coeffs @ features + noise_std * jax.random.normal(k_noise, (batch_size, d_in))
  return x, coeffs


class SyntheticSource:
  """An `ActivationSource` of planted sparse features (see the module docstring).

  Attributes:
    features: `[n_features, d_in]` the true directions.
    probs: `[n_features]` the true firing probabilities.
  """

  def __init__(self, *, d_in: int, batch_size: int, seed: int, n_features: int,
               l0: float, zipf_exponent: float = 0.5, noise: float = 0.0,
               dictionary_seed: int = 1234, process_index: int = 0,
               process_count: int = 1):
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by the"
                       f" {process_count} processes.")
    self.d_in, self.batch_size, self.seed = d_in, batch_size, seed
    self.features = planted_dictionary(n_features, d_in, dictionary_seed)
    self.probs = firing_probabilities(n_features, l0, zipf_exponent)
    # Noise std per dimension, relative to the signal's RMS per dimension.
    signal_sq = float(np.sum(self.probs)) * (13.0 / 12.0)  # E[m^2] for U(0.5, 1.5)
    self.noise_std = noise * np.sqrt(signal_sq / d_in)
    self._process_index, self._process_count = process_index, process_count
    self._features = jnp.asarray(self.features)
    self._probs = jnp.asarray(self.probs)
    self.norm_scale = self._estimate_norm_scale()

  def _estimate_norm_scale(self, batches: int = 4) -> float:
    """C = sqrt(mean ||x||^2) over `batches` batches drawn from a reserved stream."""
    key = jax.random.key(2**31 - 1)
    total = 0.0
    for i in range(batches):
      x, _ = _generate(jax.random.fold_in(key, i), self._features, self._probs,
                       self.noise_std, batch_size=self.batch_size)
      total += float(jnp.mean(jnp.sum(jnp.square(x), axis=-1)))
    return float(np.sqrt(total / batches))

  def batch_with_truth(self, step: int) -> tuple[jax.Array, jax.Array]:
    """The global batch of `step` and its true coefficients (for evaluation)."""
    key = jax.random.fold_in(jax.random.key(self.seed), step)
    return _generate(key, self._features, self._probs, self.noise_std,
                     batch_size=self.batch_size)

  def batch(self, step: int) -> jax.Array:
    """This process's rows of the global batch of `step`: `[batch_size / processes, d_in]`."""
    x, _ = self.batch_with_truth(step)
    rows = self.batch_size // self._process_count
    return x[self._process_index * rows:(self._process_index + 1) * rows]

  def close(self) -> None:
    """Nothing to release."""
