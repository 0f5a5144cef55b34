"""Per-latent statistics accumulated in one streaming pass: top examples, a seeded
uniform sample, an activation histogram, firing counts.

`LatentStats` is a pytree of `[d_sae, ...]` arrays, so `update` is one jitted
function of (stats, a batch of SAE activations) and, for a latent-sharded SAE,
every array stays sharded on the `model` axis with its latents. Given the ids of
a subset of latents, the arrays have one row per chosen latent and a latent's
row holds exactly what it holds in a pass over every latent.

Tokens are named by their *global index* g = context * seq_len + position in
the stream of contexts. Per latent:

  * top examples: the `n_top` largest positive activations, ties broken by the
    smaller g (the order a brute-force stable sort gives), each with the
    latent's activations over a window of tokens around it (`window_left`
    before, `window_right` after, within the context; 0 outside it);
  * a uniform sample: the `n_samples` active tokens with the smallest
    priority hash(seed, g, latent) (bottom-k sampling: uniform without
    replacement, deterministic from the seed, independent of batching), with
    their windows; the browser draws quantile-band samples from it;
  * `hist_counts`: counts of positive activations in fixed log-spaced bins
    (`hist_edges`, shared by all latents, so `numpy.histogram(values,
    bins=hist_edges)` is the reference);
  * `fire_count`, `max_value`, `sum_value` over active tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

_EMPTY = -1  # token index of an empty top / sample slot
# Priorities are 24-bit integers held exactly in float32 (XLA's CPU top_k is an order
# of magnitude faster on floats than on ints); equal priorities go to the earlier token.
_NO_PRIORITY = np.float32(2**24)


def hist_edges(low: float = 1e-3, high: float = 1e5, bins_per_decade: int = 20) -> np.ndarray:
  """Log-spaced activation-histogram edges `[n_bins + 1]` from `low` to `high`."""
  decades = np.log10(high) - np.log10(low)
  return np.logspace(np.log10(low), np.log10(high), int(round(decades * bins_per_decade)) + 1,
                     dtype=np.float64)


@struct.dataclass
class LatentStats:
  """The streaming accumulators (see the module docstring); every array has one row per
  latent accumulated (`d_sae` below; the number of chosen latents for a subset).

  Attributes:
    top_values: `[d_sae, n_top]` largest activations, descending (0 where empty).
    top_tokens: `[d_sae, n_top]` their global token indices (-1 where empty).
    top_windows: `[d_sae, n_top, window]` the latent's activations around each.
    sample_priority: `[d_sae, n_samples]` float32 hash priorities, ascending (2^24 where empty).
    sample_values: `[d_sae, n_samples]` the sampled activations.
    sample_tokens: `[d_sae, n_samples]` their global token indices (-1 where empty).
    sample_windows: `[d_sae, n_samples, window]` the latent's activations around each.
    hist_counts: `[d_sae, n_bins]` int32 counts per log-spaced bin.
    fire_count: `[d_sae]` int32 active tokens.
    max_value: `[d_sae]` largest activation (0 if never active).
    sum_value: `[d_sae]` float32 sum of activations.
    tokens_seen: `[]` int32 tokens (valid positions) streamed.
  """

  top_values: jax.Array
  top_tokens: jax.Array
  top_windows: jax.Array
  sample_priority: jax.Array
  sample_values: jax.Array
  sample_tokens: jax.Array
  sample_windows: jax.Array
  hist_counts: jax.Array
  fire_count: jax.Array
  max_value: jax.Array
  sum_value: jax.Array
  tokens_seen: jax.Array


def init(d_sae: int, *, n_top: int, n_samples: int, window: int, n_bins: int) -> LatentStats:
  """Empty accumulators for `d_sae` latents."""
  f32, i32 = jnp.float32, jnp.int32
  return LatentStats(
      top_values=jnp.zeros((d_sae, n_top), f32),
      top_tokens=jnp.full((d_sae, n_top), _EMPTY, i32),
      top_windows=jnp.zeros((d_sae, n_top, window), f32),
      sample_priority=jnp.full((d_sae, n_samples), _NO_PRIORITY, f32),
      sample_values=jnp.zeros((d_sae, n_samples), f32),
      sample_tokens=jnp.full((d_sae, n_samples), _EMPTY, i32),
      sample_windows=jnp.zeros((d_sae, n_samples, window), f32),
      hist_counts=jnp.zeros((d_sae, n_bins), i32),
      fire_count=jnp.zeros((d_sae,), i32),
      max_value=jnp.zeros((d_sae,), f32),
      sum_value=jnp.zeros((d_sae,), f32),
      tokens_seen=jnp.zeros((), i32))


def priority(seed: int, tokens: jax.Array, latents: jax.Array) -> jax.Array:
  """An integer in [0, 2^24) as float32: a hash of (seed, global token index, latent)
  (a murmur3 finaliser).

  Works on numpy arrays too (the tests' brute force uses the same function).
  """
  xp = jnp if isinstance(tokens, jax.Array) or isinstance(latents, jax.Array) else np
  h = (xp.asarray(tokens, xp.uint32) * xp.uint32(0x9E3779B1)
       ^ xp.asarray(latents, xp.uint32) * xp.uint32(0x85EBCA77) ^ xp.uint32(seed & 0xFFFFFFFF))
  for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
    h = (h ^ (h >> xp.uint32(shift))) * xp.uint32(mult)
  h = h ^ (h >> xp.uint32(16))
  return (h >> xp.uint32(8)).astype(xp.float32)


def histogram_bins(values: jax.Array, edges: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each value's bin over fixed log-spaced `edges` (numpy.histogram's convention: the
  last bin is closed) and whether it falls inside them: the bin from the logarithm, then
  corrected against the edges themselves.

  Args:
    values: float32 activations, any shape.
    edges: `[n_bins + 1]` float32 edges.

  Returns:
    (bins int32, in_range bool), both shaped like `values`.
  """
  n_bins = edges.shape[0] - 1
  log_lo, log_hi = jnp.log(edges[0]), jnp.log(edges[-1])
  guess = jnp.floor((jnp.log(jnp.maximum(values, 1e-30)) - log_lo) / (log_hi - log_lo) * n_bins)
  bins = jnp.clip(guess.astype(jnp.int32), 0, n_bins - 1)
  bins = bins - (values < edges[bins]) + ((values >= edges[bins + 1]) & (bins < n_bins - 1))
  return bins, (values >= edges[0]) & (values <= edges[-1])


def _windows(acts_t: jax.Array, flat: jax.Array, seq_len: int, left: int, right: int
             ) -> jax.Array:
  """`[d_sae, k, window]` activations of latent l at tokens flat[l, k] - left ... + right,
  0 outside the token's context. acts_t: `[d_sae, batch * seq_len]`."""
  offsets = jnp.arange(-left, right + 1)
  pos = flat[..., None] + offsets  # [d_sae, k, window]
  same_context = (pos // seq_len == flat[..., None] // seq_len) & (pos >= 0)
  safe = jnp.clip(pos, 0, acts_t.shape[1] - 1)
  values = jnp.take_along_axis(acts_t[:, None, :], safe, axis=2)
  return jnp.where(same_context & (flat[..., None] >= 0), values, 0.0)


def _merge_top(values, tokens, windows, new_values, new_tokens, new_windows, k: int):
  """The k largest of (kept, new), ties to the kept (earlier) entries."""
  all_values = jnp.concatenate([values, new_values], axis=1)
  order = jax.lax.top_k(all_values, k)[1]  # top_k puts the lower index first on ties
  take = lambda a: jnp.take_along_axis(a, order if a.ndim == 2 else order[..., None], axis=1)
  return (take(all_values), take(jnp.concatenate([tokens, new_tokens], axis=1)),
          take(jnp.concatenate([windows, new_windows], axis=1)))


@functools.partial(jax.jit, static_argnames=("seq_len", "left", "right", "seed"))
def update(stats: LatentStats, acts: jax.Array, valid: jax.Array, first_token: jax.Array,
           edges: jax.Array, latents: jax.Array | None = None, *, seq_len: int, left: int,
           right: int, seed: int) -> LatentStats:
  """Folds a batch into `stats`.

  Args:
    stats: the accumulators: one row per latent of `latents` (all `d_sae` without it).
    acts: `[batch * seq_len, d_sae]` SAE activations of a batch of whole contexts.
    valid: `[batch * seq_len]` bool, False at BOS / pad positions (never counted).
    first_token: `[]` int32 global index of the batch's first token.
    edges: `[n_bins + 1]` float32 histogram edges.
    latents: optional `[n]` int32 ids of the latents accumulated, in the order of the
      rows of `stats` (None: every latent, row l is latent l).
    seq_len, left, right, seed: context length, window, sampling seed (static).
  """
  n_top, n_samples = stats.top_values.shape[1], stats.sample_values.shape[1]
  if latents is not None:  # only the chosen latents' columns: the work below is per row
    acts = acts[:, latents]
  acts = jnp.where(valid[:, None], acts.astype(jnp.float32), 0.0)
  acts_t = acts.T  # [n_rows, P]: one row per latent accumulated
  active = acts_t > 0
  n_rows, n_pos = acts_t.shape
  global_tok = first_token + jnp.arange(n_pos, dtype=jnp.int32)

  # Top examples: the batch's own top n_top first, then the merge.
  masked = jnp.where(active, acts_t, -jnp.inf)
  k = min(n_top, n_pos)
  batch_values, batch_pos = jax.lax.top_k(masked, k)
  got = jnp.isfinite(batch_values)
  batch_tokens = jnp.where(got, global_tok[batch_pos], _EMPTY)
  batch_windows = _windows(acts_t, jnp.where(got, batch_pos, -1), seq_len, left, right)
  kept_values = jnp.where(stats.top_tokens >= 0, stats.top_values, -jnp.inf)
  top_values, top_tokens, top_windows = _merge_top(
      kept_values, stats.top_tokens, stats.top_windows,
      jnp.where(got, batch_values, -jnp.inf), batch_tokens, batch_windows, n_top)
  top_values = jnp.where(jnp.isfinite(top_values), top_values, 0.0)

  # Uniform sample: the smallest priorities among active tokens. The hash takes the
  # latent's own id, not its row, so a latent's sample is the same in any subset.
  rows = jnp.arange(n_rows, dtype=jnp.int32)[:, None]
  latent_ids = rows if latents is None else latents.astype(jnp.int32)[:, None]
  prio = jnp.where(active, priority(seed, global_tok[None, :], latent_ids), _NO_PRIORITY)
  k = min(n_samples, n_pos)
  neg, sample_pos = jax.lax.top_k(-prio, k)
  got = -neg < _NO_PRIORITY
  new_windows = _windows(acts_t, jnp.where(got, sample_pos, -1), seq_len, left, right)
  all_prio = jnp.concatenate([stats.sample_priority, -neg], axis=1)
  order = jax.lax.top_k(-all_prio, n_samples)[1]
  take = lambda a: jnp.take_along_axis(a, order if a.ndim == 2 else order[..., None], axis=1)
  sample_values = take(jnp.concatenate(
      [stats.sample_values, jnp.take_along_axis(acts_t, sample_pos, axis=1)], axis=1))
  sample_tokens = take(jnp.concatenate(
      [stats.sample_tokens, jnp.where(got, global_tok[sample_pos], _EMPTY)], axis=1))
  sample_windows = take(jnp.concatenate([stats.sample_windows, new_windows], axis=1))
  sample_priority = take(all_prio)

  n_bins = edges.shape[0] - 1
  bins, in_range = histogram_bins(acts_t, edges)
  flat = jnp.where(active & in_range, rows * n_bins + bins, n_rows * n_bins)  # else dropped
  hist = jnp.zeros(n_rows * n_bins + 1, jnp.int32).at[flat.reshape(-1)].add(1)[:-1]

  return LatentStats(
      top_values=top_values, top_tokens=top_tokens, top_windows=top_windows,
      sample_priority=sample_priority, sample_values=sample_values,
      sample_tokens=sample_tokens, sample_windows=sample_windows,
      hist_counts=stats.hist_counts + hist.reshape(n_rows, n_bins),
      fire_count=stats.fire_count + active.sum(axis=1, dtype=jnp.int32),
      max_value=jnp.maximum(stats.max_value, acts_t.max(axis=1)),
      sum_value=stats.sum_value + acts_t.sum(axis=1),
      tokens_seen=stats.tokens_seen + valid.sum(dtype=jnp.int32))


@jax.jit
def merge(earlier: LatentStats, later: LatentStats) -> LatentStats:
  """The accumulators of two streams, `earlier`'s tokens all before `later`'s (for example
  two processes' contiguous shares of the contexts): what one stream of both holds.

  Ties in the top examples and equal sample priorities go to `earlier`, which is the
  earlier token, as in `update`; within each, the order is already (value, token).
  """
  n_top, n_samples = earlier.top_values.shape[1], earlier.sample_values.shape[1]
  kept = lambda s: jnp.where(s.top_tokens >= 0, s.top_values, -jnp.inf)
  top_values, top_tokens, top_windows = _merge_top(
      kept(earlier), earlier.top_tokens, earlier.top_windows,
      kept(later), later.top_tokens, later.top_windows, n_top)
  all_prio = jnp.concatenate([earlier.sample_priority, later.sample_priority], axis=1)
  order = jax.lax.top_k(-all_prio, n_samples)[1]  # the lower index (earlier) first on ties
  take = lambda a, b: jnp.take_along_axis(
      jnp.concatenate([a, b], axis=1), order if a.ndim == 2 else order[..., None], axis=1)
  return LatentStats(
      top_values=jnp.where(jnp.isfinite(top_values), top_values, 0.0), top_tokens=top_tokens,
      top_windows=top_windows,
      sample_priority=take(earlier.sample_priority, later.sample_priority),
      sample_values=take(earlier.sample_values, later.sample_values),
      sample_tokens=take(earlier.sample_tokens, later.sample_tokens),
      sample_windows=take(earlier.sample_windows, later.sample_windows),
      hist_counts=earlier.hist_counts + later.hist_counts,
      fire_count=earlier.fire_count + later.fire_count,
      max_value=jnp.maximum(earlier.max_value, later.max_value),
      sum_value=earlier.sum_value + later.sum_value,
      tokens_seen=earlier.tokens_seen + later.tokens_seen)


__all__ = ["LatentStats", "hist_edges", "histogram_bins", "init", "merge", "priority",
           "update"]
