"""Activations from a planted dictionary: a training source with known ground truth.

    x = sum_i c_i d_i + noise,   c_i = active_i * m_i >= 0

`d_i` are `n_features` random unit vectors in R^d_in; latent i fires with
probability p_i proportional to rank^-zipf_exponent (a heavy-tailed firing
frequency, as measured for real SAE latents), scaled so the expected number of
active features per row is `l0`; magnitudes m_i ~ Uniform(0.5, 1.5). Batches
are generated on device by a jitted function of (seed, step).

For a transcoder (`d_out` > 0) each row also has a target in R^d_out,

    y = sum_i c_i e_i + x @ A,

the same codes decoded by a second planted dictionary `e_i` (unit vectors in
R^d_out) plus a planted linear map A, and `batch` serves the pair as one row
[x, y]. With a linear map (skip_scale > 0) the last d_in / 4 coordinates of x
are a dense part z ~ N(0, 1/d_in per coordinate, times the signal's scale), the
dictionary lives in the others, and A reads z alone (its other rows are 0, its
z rows N(0, skip_scale^2 / (d_in / 4))). A map of the sparse directions could be
traded between a skip and the latents (decoder rows e_i + d_i A fit as well),
so only a map of a dense part is identifiable, as a real MLP's linear part is.
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


@jax.jit
def _target(x, coeffs, output_features, linear_map):
  return coeffs @ output_features + x @ linear_map


class SyntheticSource:
  """An `ActivationSource` of planted sparse features (see the module docstring).

  Attributes:
    features: `[n_features, d_in]` the true directions.
    probs: `[n_features]` the true firing probabilities.
    d_out: a transcoder target's width (0: an SAE's data, rows are x alone).
    output_features: `[n_features, d_out]` the true output directions (transcoders).
    linear_map: `[d_in, d_out]` the true linear part of y (transcoders; zeros if none).
    norm_scale, target_norm_scale: C of x and of y (None for an SAE's data).
  """

  def __init__(self, *, d_in: int, batch_size: int, seed: int, n_features: int,
               l0: float, zipf_exponent: float = 0.5, noise: float = 0.0,
               dictionary_seed: int = 1234, process_index: int = 0,
               process_count: int = 1, d_out: int = 0, skip_scale: float = 0.0):
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by the"
                       f" {process_count} processes.")
    self.d_in, self.batch_size, self.seed = d_in, batch_size, seed
    d_out = int(d_out)
    self.dense_dims = d_in // 4 if d_out and skip_scale > 0 else 0
    sparse_dims = d_in - self.dense_dims
    self.features = np.pad(planted_dictionary(n_features, sparse_dims, dictionary_seed),
                           ((0, 0), (0, self.dense_dims)))
    self.probs = firing_probabilities(n_features, l0, zipf_exponent)
    # Noise std per dimension, relative to the signal's RMS per dimension.
    signal_sq = float(np.sum(self.probs)) * (13.0 / 12.0)  # E[m^2] for U(0.5, 1.5)
    self.noise_std = noise * np.sqrt(signal_sq / d_in)
    self._process_index, self._process_count = process_index, process_count
    self._features = jnp.asarray(self.features)
    self._probs = jnp.asarray(self.probs)
    self.d_out = d_out
    self.target_norm_scale = None
    # The dense part's std per coordinate: the sparse signal's RMS per coordinate.
    self.dense_std = float(np.sqrt(signal_sq / d_in)) if self.dense_dims else 0.0
    if self.d_out:
      self.output_features = planted_dictionary(n_features, self.d_out, dictionary_seed + 1)
      rng = np.random.default_rng(dictionary_seed + 2)
      self.linear_map = np.zeros((d_in, self.d_out), np.float32)
      if self.dense_dims:
        self.linear_map[sparse_dims:] = skip_scale / np.sqrt(self.dense_dims) * (
            rng.standard_normal((self.dense_dims, self.d_out)))
      self._out = (jnp.asarray(self.output_features), jnp.asarray(self.linear_map))
    self.norm_scale, target = self._estimate_norm_scales()
    if self.d_out:
      self.target_norm_scale = target

  def _estimate_norm_scales(self, batches: int = 4) -> tuple[float, float]:
    """(C of x, C of y) = sqrt(mean ||.||^2) over `batches` batches drawn from a reserved
    stream (y: the transcoder's target, x again for an SAE's data)."""
    key = jax.random.key(2**31 - 1)
    total_x = total_y = 0.0
    for i in range(batches):
      x, coeffs = self._draw(jax.random.fold_in(key, i))
      y = self.target(x, coeffs) if self.d_out else x
      total_x += float(jnp.mean(jnp.sum(jnp.square(x), axis=-1)))
      total_y += float(jnp.mean(jnp.sum(jnp.square(y), axis=-1)))
    return float(np.sqrt(total_x / batches)), float(np.sqrt(total_y / batches))

  def target(self, x: jax.Array, coeffs: jax.Array) -> jax.Array:
    """A transcoder's y `[rows, d_out]` of inputs `x` and their true codes `coeffs`."""
    return _target(x, coeffs, *self._out)

  def batch_with_truth(self, step: int) -> tuple[jax.Array, jax.Array]:
    """The global batch of `step` and its true coefficients (for evaluation)."""
    key = jax.random.fold_in(jax.random.key(self.seed), step)
    return self._draw(key)

  def _draw(self, key) -> tuple[jax.Array, jax.Array]:
    """(x [batch_size, d_in], codes [batch_size, n_features]) of one batch's key."""
    x, coeffs = _generate(key, self._features, self._probs, self.noise_std,
                          batch_size=self.batch_size)
    if self.dense_dims:
      z = self.dense_std * jax.random.normal(jax.random.fold_in(key, 7),
                                             (self.batch_size, self.dense_dims))
      x = x.at[:, -self.dense_dims:].add(z)
    return x, coeffs

  def batch(self, step: int) -> jax.Array:
    """This process's rows of the global batch of `step`: `[batch_size / processes, d_in]`
    (a transcoder's pairs: `[batch_size / processes, d_in + d_out]`, x then y)."""
    x, coeffs = self.batch_with_truth(step)
    if self.d_out:
      x = jnp.concatenate([x, self.target(x, coeffs)], axis=-1)
    rows = self.batch_size // self._process_count
    return x[self._process_index * rows:(self._process_index + 1) * rows]

  def close(self) -> None:
    """Nothing to release."""
