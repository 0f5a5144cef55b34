"""The sparse fold of a batch into `LatentStats`: the same result as `accumulate.update`,
at a cost that grows with the batch's active (token, latent) pairs, not with
tokens x latents.

A trained SAE fires a few tens of its thousands of latents per token, yet the dense
update sorts, hashes and bins every (latent, token) cell of the batch: with 16k
latents and 2k tokens that is 33M cells per statistic and dominates the browse pass
on a CPU. Here the batch is first cut down to its active entries, and the entries
are then cut down to those that can still enter a latent's top examples or sample:

  1. `active_entries`: each token's `per_token` largest activations (one top_k over
     the batch) as (value, row, position) entries; `complete` says whether every
     token's active latents fit (its `per_token`-th value is 0), or the caller must
     retry with more room. It also counts the entries that beat the kept top
     examples' smallest value or the kept sample's largest priority.
  2. `fold_entries`: counts, sums, maxima and the histogram by scatters over the
     entries; the candidates for the top examples and the sample are compacted
     (their counts, rounded up to a power of two, are static capacities), sorted by
     (row, -value, token) and (row, priority, token), ranked within their row, and
     merged with the kept ones exactly as the dense update merges (ties to the kept,
     earlier, token). Windows are gathered for the candidates alone.

`fold` runs the two steps with the host choosing the capacities between them (one
small device-to-host read per batch).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jsae.browse import accumulate

# Capacities are powers of two from this one up, so a stream compiles a few shapes.
_MIN_CAPACITY = 256


def _power_of_two_at_least(n: int, floor: int = _MIN_CAPACITY) -> int:
  return max(floor, 1 << max(int(n) - 1, 0).bit_length())


def _kept_bars(stats: accumulate.LatentStats) -> tuple[jax.Array, jax.Array]:
  """`[n_rows]` each row's bar for a new entry: its smallest kept top value (0 while its
  top list has room) and its largest kept sample priority (2^24 while the sample has
  room). A new entry must beat the bar strictly: on a tie the kept, earlier, token wins."""
  top_bar = jnp.where(stats.top_tokens[:, -1] >= 0, stats.top_values[:, -1], 0.0)
  return top_bar, stats.sample_priority[:, -1]


@functools.partial(jax.jit, static_argnames=("per_token", "seed"))
def active_entries(stats: accumulate.LatentStats, acts: jax.Array, valid: jax.Array,
                   first_token: jax.Array, latents: jax.Array | None = None, *,
                   per_token: int, seed: int):
  """Each valid token's `per_token` largest activations as flat entries.

  Args:
    stats: the accumulators (one row per column of `acts`).
    acts: `[P, n_rows]` SAE activations of the accumulated latents (`P` = batch x seq).
    valid: `[P]` bool, False at BOS / pad.
    first_token: `[]` int32 global index of the batch's first token.
    latents: optional `[n_rows]` int32 latent ids of the columns (hash input).
    per_token: entries kept per token (static).
    seed: the sample's seed (static).

  Returns:
    (entries, complete, n_top_candidates, n_sample_candidates): entries is a tuple of
    `[P * per_token]` arrays (value float32, row int32 with `n_rows` where inactive,
    position int32, priority float32); complete is a `[]` bool; the counts are `[]` int32.
  """
  n_pos, n_rows = acts.shape
  values, rows = jax.lax.top_k(acts, per_token)  # [P, per_token]
  # Room for every row is always enough; else the last kept value must be silent.
  complete = (jnp.bool_(True) if per_token >= n_rows
              else ~jnp.any(valid & (values[:, -1] > 0)))
  values = values.astype(jnp.float32).reshape(-1)
  positions = jnp.repeat(jnp.arange(n_pos, dtype=jnp.int32), per_token)
  active = (values > 0) & valid[positions]
  rows = jnp.where(active, rows.reshape(-1).astype(jnp.int32), n_rows)
  latent_ids = rows if latents is None else jnp.append(latents.astype(jnp.int32), 0)[rows]
  prio = accumulate.priority(seed, first_token + positions, latent_ids)
  top_bar, sample_bar = _kept_bars(stats)
  safe_rows = jnp.minimum(rows, n_rows - 1)
  top_candidate = active & (values > top_bar[safe_rows])
  sample_candidate = active & (prio < sample_bar[safe_rows])
  return ((values, rows, positions, prio), complete, top_candidate.sum(dtype=jnp.int32),
          sample_candidate.sum(dtype=jnp.int32))


def _entry_windows(acts, valid, positions, rows, seq_len: int, left: int, right: int):
  """`[S, window]` activations of row rows[s] around positions[s] within its context (0
  outside it, at invalid tokens, and for entries with an out-of-range row)."""
  n_pos, n_rows = acts.shape
  pos = positions[:, None] + jnp.arange(-left, right + 1)
  inside = (pos >= 0) & (pos < n_pos) & (pos // seq_len == positions[:, None] // seq_len)
  safe = jnp.clip(pos, 0, n_pos - 1)
  values = acts[safe, jnp.minimum(rows, n_rows - 1)[:, None]].astype(jnp.float32)
  keep = inside & valid[safe] & (rows < n_rows)[:, None]
  return jnp.where(keep, values, 0.0)


def _best_per_row(keys, payload, candidate, capacity: int, n_rows: int, k: int):
  """The `k` first entries of each row in the order of `keys` among the candidates.

  Args:
    keys: sort keys after the row, e.g. (-value, token), each `[M]`.
    payload: `[M]` arrays carried along.
    candidate: `[M]` bool; at most `capacity` are True.
    capacity: static room for the candidates.

  Returns:
    (rows, ranks, payload) of `[capacity]` entries; rows is `n_rows` for entries that are
    not among their row's first `k` (scatters drop them).
  """
  rows = payload[0]
  idx = jnp.nonzero(candidate, size=capacity, fill_value=rows.shape[0])[0]
  pick = lambda a, fill: jnp.append(a, jnp.asarray(fill, a.dtype))[idx]
  rows = pick(rows, n_rows)
  sorted_ = jax.lax.sort((rows,) + tuple(pick(a, 0) for a in keys)
                         + tuple(pick(a, 0) for a in payload[1:]), num_keys=1 + len(keys))
  rows, rest = sorted_[0], sorted_[1 + len(keys):]
  rank = jnp.arange(capacity, dtype=jnp.int32) - jnp.searchsorted(rows, rows, side="left")
  rows = jnp.where(rank < k, rows, n_rows)
  return rows, rank, rest


def _merge(kept, new, order_key_kept, order_key_new, k: int):
  """Row-wise merge of kept `[n_rows, k, ...]` and new `[n_rows, k, ...]` arrays: the `k`
  best by the order keys (larger first; ties to the kept, which come first)."""
  order = jax.lax.top_k(jnp.concatenate([order_key_kept, order_key_new], axis=1), k)[1]
  def take(a, b):
    both = jnp.concatenate([a, b], axis=1)
    return jnp.take_along_axis(both, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)
  return [take(a, b) for a, b in zip(kept, new)]


@functools.partial(jax.jit, static_argnames=("seq_len", "left", "right", "top_capacity",
                                             "sample_capacity"))
def fold_entries(stats: accumulate.LatentStats, acts: jax.Array, valid: jax.Array,
                 first_token: jax.Array, edges: jax.Array, entries, *, seq_len: int, left: int,
                 right: int, top_capacity: int, sample_capacity: int) -> accumulate.LatentStats:
  """Folds a batch's entries (`active_entries`) into `stats`: `accumulate.update`'s result.

  Args:
    stats, acts, valid, first_token: as for `active_entries`.
    edges: `[n_bins + 1]` float32 histogram edges.
    entries: `active_entries`' entries (every active (token, row) pair of the batch).
    seq_len, left, right: context length and window (static).
    top_capacity, sample_capacity: static room for the top / sample candidates, at least
      their counts from `active_entries`.
  """
  values, rows, positions, prio = entries
  n_rows, n_top = stats.top_values.shape
  n_samples, window = stats.sample_values.shape[1], stats.top_windows.shape[2]
  tokens = first_token + positions
  active = rows < n_rows

  def per_row(op, x, init):
    return getattr(jnp.full(n_rows + 1, init, x.dtype).at[rows], op)(x)[:-1]

  # Histogram: numpy.histogram's bins, as in the dense update.
  n_bins = edges.shape[0] - 1
  log_lo, log_hi = jnp.log(edges[0]), jnp.log(edges[-1])
  guess = jnp.floor((jnp.log(jnp.maximum(values, 1e-30)) - log_lo) / (log_hi - log_lo) * n_bins)
  bins = jnp.clip(guess.astype(jnp.int32), 0, n_bins - 1)
  bins = bins - (values < edges[bins]) + ((values >= edges[bins + 1]) & (bins < n_bins - 1))
  in_range = active & (values >= edges[0]) & (values <= edges[-1])
  flat = jnp.where(in_range, rows * n_bins + bins, n_rows * n_bins)
  hist = jnp.zeros(n_rows * n_bins + 1, jnp.int32).at[flat].add(1)[:-1].reshape(n_rows, n_bins)

  # Top examples: the candidates' best n_top per row, then the merge with the kept.
  top_bar, sample_bar = _kept_bars(stats)
  safe_rows = jnp.minimum(rows, n_rows - 1)
  r, rank, (v, t, p) = _best_per_row(
      (-values, tokens), (rows, values, tokens, positions),
      active & (values > top_bar[safe_rows]), top_capacity, n_rows, n_top)
  new_values = jnp.full((n_rows, n_top), -jnp.inf).at[r, rank].set(v, mode="drop")
  new_tokens = jnp.full((n_rows, n_top), accumulate._EMPTY, jnp.int32).at[r, rank].set(
      t, mode="drop")
  new_windows = jnp.zeros((n_rows, n_top, window)).at[r, rank].set(
      _entry_windows(acts, valid, p, r, seq_len, left, right), mode="drop")
  kept_values = jnp.where(stats.top_tokens >= 0, stats.top_values, -jnp.inf)
  top_values, top_tokens, top_windows = _merge(
      (kept_values, stats.top_tokens, stats.top_windows), (new_values, new_tokens, new_windows),
      kept_values, new_values, n_top)
  top_values = jnp.where(jnp.isfinite(top_values), top_values, 0.0)

  # Sample: the candidates' smallest n_samples priorities per row, then the merge.
  r, rank, (q, v, t, p) = _best_per_row(
      (prio, tokens), (rows, prio, values, tokens, positions),
      active & (prio < sample_bar[safe_rows]), sample_capacity, n_rows, n_samples)
  new_prio = jnp.full((n_rows, n_samples), accumulate._NO_PRIORITY).at[r, rank].set(
      q, mode="drop")
  new_svalues = jnp.zeros((n_rows, n_samples)).at[r, rank].set(v, mode="drop")
  new_stokens = jnp.full((n_rows, n_samples), accumulate._EMPTY, jnp.int32).at[r, rank].set(
      t, mode="drop")
  new_swindows = jnp.zeros((n_rows, n_samples, window)).at[r, rank].set(
      _entry_windows(acts, valid, p, r, seq_len, left, right), mode="drop")
  sample_priority, sample_values, sample_tokens, sample_windows = _merge(
      (stats.sample_priority, stats.sample_values, stats.sample_tokens, stats.sample_windows),
      (new_prio, new_svalues, new_stokens, new_swindows), -stats.sample_priority, -new_prio,
      n_samples)

  return accumulate.LatentStats(
      top_values=top_values, top_tokens=top_tokens, top_windows=top_windows,
      sample_priority=sample_priority, sample_values=sample_values,
      sample_tokens=sample_tokens, sample_windows=sample_windows,
      hist_counts=stats.hist_counts + hist,
      fire_count=stats.fire_count + per_row("add", active.astype(jnp.int32), 0),
      max_value=jnp.maximum(stats.max_value, per_row("max", values, 0.0)),
      sum_value=stats.sum_value + per_row("add", values, 0.0),
      tokens_seen=stats.tokens_seen + valid.sum(dtype=jnp.int32))


def fold(stats: accumulate.LatentStats, acts: jax.Array, valid: jax.Array,
         first_token: jax.Array, edges: jax.Array, latents: jax.Array | None = None, *,
         seq_len: int, left: int, right: int, seed: int, per_token: int,
         max_per_token: int | None = None) -> tuple[accumulate.LatentStats, int]:
  """`accumulate.update`'s result by the sparse path, for a batch whose tokens each have
  at most `per_token` active latents, retried with twice the room while they do not.

  Args:
    stats, valid, first_token, edges, latents, seq_len, left, right, seed: as for
      `accumulate.update`.
    acts: `[P, d_sae]` activations of the batch.
    per_token: the room to try first (the previous batch's is a good guess).
    max_per_token: the most room worth trying (default: a quarter of the rows; past it
      the entries cost more than the dense update's cells).

  Returns:
    (stats, per_token): the new stats and the room that sufficed, or (stats unchanged, 0)
    when some token has more than `max_per_token` active latents: the caller must use
    the dense update.
  """
  if latents is not None:
    acts = _columns(acts, latents)
  n_rows = acts.shape[1]
  limit = min(n_rows, max(n_rows // 4, 1) if max_per_token is None else max_per_token)
  per_token = min(per_token, limit)
  while True:
    entries, complete, n_top, n_sample = active_entries(
        stats, acts, valid, first_token, latents, per_token=per_token, seed=seed)
    if bool(complete):
      break
    if per_token >= limit:
      return stats, 0
    per_token = min(2 * per_token, limit)
  stats = fold_entries(stats, acts, valid, first_token, edges, entries, seq_len=seq_len,
                       left=left, right=right,
                       top_capacity=_power_of_two_at_least(int(n_top)),
                       sample_capacity=_power_of_two_at_least(int(n_sample)))
  return stats, per_token


@jax.jit
def _columns(acts, latents):
  return acts[:, latents]


__all__ = ["active_entries", "fold", "fold_entries"]
