"""The sparse fold of a batch into `LatentStats`: the same result as `accumulate.update`,
at a cost that grows with the batch's active (token, latent) pairs, not with
tokens x latents.

A trained SAE fires a few tens of its thousands of latents per token, yet the dense
update sorts, hashes and bins every (latent, token) cell of the batch: with 16k
latents and 2k tokens that is 33M cells per statistic and dominates the browse pass
on a CPU. Here the batch is first cut down to its active entries, and the entries
are then cut down to those that can still enter a latent's top examples or sample:

  1. `active_entries`: each token's active activations as (value, row, position)
     entries, by a ragged top_k in tiers (most tokens fire a few tens of latents, a
     few fire thousands; `plan_tiers` sizes the tiers from a batch's counts);
     `complete` says whether every token's active latents fit, or the caller must plan
     again. It also counts the entries that beat the kept top examples' smallest
     value or the kept sample's largest priority.
  2. three jitted folds: counts, sums, maxima and the histogram by scatters over the
     entries; then, for the top examples and for the sample, the entries that beat
     the kept bar are compacted (their count, rounded up to a power of two, is a
     static capacity), sorted stably by (row, -value) or (row, priority), ranked
     within their row, and merged with the kept ones as the dense update merges (ties
     to the kept, earlier, token): a candidate's place is its rank plus a binary
     search among the kept. Windows are gathered for the candidates alone.

The windows are the accumulators' bulk (`[d_sae, n_samples, window]`); they stay in
place, and a small `Slots` index says which slot holds each rank's window, so a batch
writes only the windows of its entries that get in (`finalize` sorts them once at
the end). `fold` runs the steps with the host choosing the sizes between them (one
small device-to-host read per batch) and carrying them to the next batch (`Room`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jsae.browse import accumulate

# Chunk sizes are powers of two from this one up to `_CHUNK`, so a stream compiles few
# shapes.
_MIN_CAPACITY = 256


def _power_of_two_at_least(n: int, floor: int = _MIN_CAPACITY) -> int:
  return max(floor, 1 << max(int(n) - 1, 0).bit_length())


def _kept_bars(stats: accumulate.LatentStats) -> tuple[jax.Array, jax.Array]:
  """`[n_rows]` each row's bar for a new entry: its smallest kept top value (0 while its
  top list has room) and its largest kept sample priority (2^24 while the sample has
  room). A new entry must beat the bar strictly: on a tie the kept, earlier, token wins."""
  top_bar = jnp.where(stats.top_tokens[:, -1] >= 0, stats.top_values[:, -1], 0.0)
  return top_bar, stats.sample_priority[:, -1]


Tiers = tuple  # ((n_tokens or 0 for all, width), ...): see `active_entries`


@struct.dataclass
class Entries:
  """A batch's active (token, row) pairs, `[M]` each.

  Attributes:
    values: float32 activations (0 where inactive).
    rows: int32 rows, `n_rows` where inactive.
    positions: int32 token positions in the batch.
    priority: float32 sample priorities (`accumulate.priority`).
    top_ordinal: int32 index among the entries that beat their row's kept top bar when
      the batch began (-1 for the others): the top candidates, taken in chunks.
    sample_ordinal: likewise for the sample.
  """

  values: jax.Array
  rows: jax.Array
  positions: jax.Array
  priority: jax.Array
  top_ordinal: jax.Array
  sample_ordinal: jax.Array


@functools.partial(jax.jit, static_argnames=("tiers", "seed"))
def active_entries(stats: accumulate.LatentStats, acts: jax.Array, valid: jax.Array,
                   first_token: jax.Array, latents: jax.Array | None = None, *,
                   tiers: Tiers, seed: int):
  """Every valid token's active latents as flat entries, by a ragged top_k.

  Most tokens fire a few tens of latents, a few (Gemma's massive-norm tokens) fire
  thousands. Tier 0 takes each token's `width_0` largest activations; the tokens that
  fill all of them (their smallest kept value is still active) go on to tier 1, the
  first `n_tokens_1` of them, which takes their `width_1` largest; and so on. A token's
  entries come from the last tier it reaches.

  Args:
    stats: the accumulators (one row per column of `acts`).
    acts: `[P, n_rows]` SAE activations of the accumulated latents (`P` = batch x seq).
    valid: `[P]` bool, False at BOS / pad.
    first_token: `[]` int32 global index of the batch's first token.
    latents: optional `[n_rows]` int32 latent ids of the columns (hash input).
    tiers: ((0, width_0), (n_tokens_1, width_1), ...) (static; `plan_tiers`).
    seed: the sample's seed (static).

  Returns:
    (entries, complete, n_top_candidates, n_sample_candidates): `Entries`; complete is a
    `[]` bool, False when some token's active latents did not fit (the caller plans
    again); the counts are `[]` int32.
  """
  n_pos, n_rows = acts.shape
  parts, complete, reaching = [], jnp.bool_(True), valid  # reaching: tokens in this tier
  for i, (n_tokens, width) in enumerate(tiers):
    width = min(width, n_rows)
    if i == 0:
      idx, present, tier_acts = jnp.arange(n_pos, dtype=jnp.int32), valid, acts
    else:
      complete &= reaching.sum() <= n_tokens
      idx = jnp.nonzero(reaching, size=n_tokens, fill_value=n_pos)[0].astype(jnp.int32)
      present = idx < n_pos
      tier_acts = acts[jnp.minimum(idx, n_pos - 1)]
    values, rows = jax.lax.top_k(tier_acts, width)  # [n_tokens, width]
    # Full, and so maybe cut short: its smallest kept value is still active. (The min,
    # not values[:, -1]: XLA:CPU turns a top_k whose last column is sliced into a sort.)
    full = present & (values.min(axis=1) > 0) if width < n_rows else jnp.zeros_like(present)
    reaching = jnp.zeros(n_pos, bool).at[idx].set(full, mode="drop")
    owned = present & ~full
    parts.append((values, rows, idx, owned))
  complete &= ~jnp.any(reaching)

  values = jnp.concatenate([v.astype(jnp.float32).reshape(-1) for v, _, _, _ in parts])
  positions = jnp.concatenate([jnp.repeat(idx, v.shape[1]) for v, _, idx, _ in parts])
  owned = jnp.concatenate([jnp.repeat(o, v.shape[1]) for v, _, _, o in parts])
  active = (values > 0) & owned
  rows = jnp.where(active, jnp.concatenate([r.reshape(-1) for _, r, _, _ in parts]), n_rows)
  rows = rows.astype(jnp.int32)
  positions = jnp.minimum(positions, n_pos - 1)
  latent_ids = rows if latents is None else jnp.append(latents.astype(jnp.int32), 0)[rows]
  prio = accumulate.priority(seed, first_token + positions, latent_ids)
  top_bar, sample_bar = _kept_bars(stats)
  safe_rows = jnp.minimum(rows, n_rows - 1)
  ordinal = lambda c: jnp.where(c, jnp.cumsum(c, dtype=jnp.int32) - 1, -1)
  top_candidate = active & (values > top_bar[safe_rows])
  sample_candidate = active & (prio < sample_bar[safe_rows])
  return (Entries(values, rows, positions, prio, ordinal(top_candidate),
                  ordinal(sample_candidate)),
          complete, top_candidate.sum(dtype=jnp.int32), sample_candidate.sum(dtype=jnp.int32))


@jax.jit
def _active_counts(acts: jax.Array, valid: jax.Array) -> jax.Array:
  """`[P]` int32 active latents of each valid token (0 at the others)."""
  return jnp.where(valid, (acts > 0).sum(axis=1, dtype=jnp.int32), 0)


def plan_tiers(counts, n_rows: int, *, first_quantile: float = 0.9, growth: int = 8,
               headroom: int = 2) -> Tiers:
  """Tiers for `active_entries` from the active counts of a batch's tokens.

  Tier 0's width holds `first_quantile` of the tokens; each next tier is `growth` times
  wider, with room for `headroom` times the tokens that overflow the one before, until a
  width holds every token (or is every row); one tier of every row if that is smaller.

  Args:
    counts: `[P]` active latents per token (`_active_counts`).
    n_rows: the latents accumulated.
  """
  counts = np.asarray(counts)
  width = min(n_rows, _power_of_two_at_least(int(np.quantile(counts, first_quantile)), 16))
  tiers = [(0, width)]
  while width < n_rows and (counts > width).any():
    n_over = int((counts > width).sum())
    width = min(n_rows, width * growth)
    tiers.append((min(len(counts), _power_of_two_at_least(headroom * n_over, 8)), width))
  if _entries_size(tiers, len(counts)) >= len(counts) * n_rows:  # one tier of every row
    return ((0, n_rows),)
  return tuple(tiers)


def _entries_size(tiers: Tiers, n_pos: int) -> int:
  return sum((n or n_pos) * w for n, w in tiers)


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


def _candidates(key, tokens, payload, ordinal, chunk, rows, capacity: int, n_rows: int,
                k: int):
  """Each row's first `k` candidates of a chunk by `key`, ties to the earlier token, with
  their rank in the row.

  Args:
    key: `[M]` sort key after the row, e.g. -value.
    tokens: `[M]` global token indices (the tie-break).
    payload: `[M]` arrays carried along.
    ordinal: `[M]` int32 candidate index (-1: not a candidate).
    chunk: `[]` int32: candidates `chunk * capacity` ... `(chunk + 1) * capacity - 1`.
    rows: `[M]` int32 rows (`n_rows` for entries of no row).
    capacity: static candidates per chunk.

  Returns:
    (rows, ranks, payload) of `[capacity]` entries, grouped by row in key order; rows is
    `n_rows` for room left over and for entries past their row's first `k`.
  """
  in_chunk = (ordinal >= 0) & (ordinal // capacity == chunk)
  idx = jnp.nonzero(in_chunk, size=capacity, fill_value=rows.shape[0])[0]
  pick = lambda a, fill=0: jnp.append(a, jnp.asarray(fill, a.dtype))[idx]
  rows, _, _, order = jax.lax.sort(
      (pick(rows, n_rows), pick(key), pick(tokens), jnp.arange(capacity, dtype=jnp.int32)),
      num_keys=3)
  rank = jnp.arange(capacity, dtype=jnp.int32) - jnp.searchsorted(rows, rows, side="left")
  payload = tuple(pick(a)[order] for a in payload)
  return jnp.where(rank < k, rows, n_rows), rank, payload


def _count_prefix(kept: tuple, rows: jax.Array, beats) -> jax.Array:
  """`[C]` for each entry c, how many of row `rows[c]`'s kept entries come before it:
  `beats(*kept entry's fields)` holds on a prefix of each row (the kept are in order).
  A binary search, log2(k) gathers per entry.

  Args:
    kept: `[n_rows, k]` arrays, the fields `beats` takes.
    rows: `[C]` int32.
  """
  n_rows, k = kept[0].shape
  safe = jnp.minimum(rows, n_rows - 1)
  lo, hi = jnp.zeros_like(rows), jnp.full_like(rows, k)
  for _ in range(k.bit_length()):
    mid = (lo + hi) // 2
    at = jnp.minimum(mid, k - 1)
    ok = (mid < hi) & beats(*(a[safe, at] for a in kept))
    lo, hi = jnp.where(ok, mid + 1, lo), jnp.where(ok, hi, mid)
  return lo


def _merge_sorted(kept: tuple, slots: jax.Array, new: tuple, rows, ranks, positions):
  """Merges each row's new entries into its kept, sorted ones; the windows stay put.

  Args:
    kept: `[n_rows, k]` arrays in rank order (the first is the order key).
    slots: `[n_rows, k]` int32 window slot of each kept rank.
    new: `[C]` arrays of the candidates, matching `kept`.
    rows, ranks: `[C]` the candidates' rows (`n_rows`: none) and ranks among their row's.
    positions: `[C]` their places in the merged rows (rank + the kept that come before).

  Returns:
    (merged, slots, (rows, slot)): the merged `[n_rows, k]` arrays and slots, and each
    candidate's row and window slot (row `n_rows` for those that did not get in). The
    candidates that get in are a prefix of their row's ranks and take, in order, the
    slots of the kept entries they push out, which are a suffix of the kept ranks.
  """
  n_rows, k = slots.shape
  enter = (rows < n_rows) & (positions < k)
  rows = jnp.where(enter, rows, n_rows)
  taken = jnp.zeros((n_rows, k), bool).at[rows, positions].set(True, mode="drop")
  n_in = taken.sum(axis=1, dtype=jnp.int32)  # [n_rows] candidates that got in
  # A free place holds the kept entry whose rank is the number of free places before it.
  kept_rank = jnp.clip(jnp.cumsum(~taken, axis=1, dtype=jnp.int32) - 1, 0, k - 1)
  merged = tuple(
      jnp.where(taken, jnp.zeros((n_rows, k), a.dtype).at[rows, positions].set(b, mode="drop"),
                jnp.take_along_axis(a, kept_rank, axis=1))
      for a, b in zip(kept, new))
  safe = jnp.minimum(rows, n_rows - 1)
  new_slot = slots[safe, jnp.clip(k - n_in[safe] + ranks, 0, k - 1)]
  merged_slots = jnp.where(
      taken, jnp.zeros((n_rows, k), jnp.int32).at[rows, positions].set(new_slot, mode="drop"),
      jnp.take_along_axis(slots, kept_rank, axis=1))
  return merged, merged_slots, (rows, new_slot)


@struct.dataclass
class Slots:
  """Where the sparse fold keeps each rank's window: `windows[l, slots[l, i]]` is the
  window of rank i, so a merge moves small indices and writes only the windows of the
  entries that get in. `finalize` puts the windows in rank order.

  Attributes:
    top: `[n_rows, n_top]` int32.
    sample: `[n_rows, n_samples]` int32.
  """

  top: jax.Array
  sample: jax.Array


def init_slots(stats: accumulate.LatentStats) -> Slots:
  """Slots of accumulators whose windows are in rank order (rank i in slot i)."""
  ranks = lambda a: jnp.broadcast_to(jnp.arange(a.shape[1], dtype=jnp.int32), a.shape[:2])
  return Slots(top=ranks(stats.top_values), sample=ranks(stats.sample_values))


@jax.jit
def finalize(stats: accumulate.LatentStats, slots: Slots) -> accumulate.LatentStats:
  """`stats` with the windows in rank order, as the dense update keeps them."""
  order = lambda w, s: jnp.take_along_axis(w, s[..., None], axis=1)
  return stats.replace(top_windows=order(stats.top_windows, slots.top),
                       sample_windows=order(stats.sample_windows, slots.sample))


# The three folds below read and write disjoint fields of the stats (donated, so the
# windows are written in place) and depend on nothing of each other: dispatched one
# after another, they run side by side.
_COUNTS = ("hist_counts", "fire_count", "max_value", "sum_value", "tokens_seen")
_TOP = ("top_values", "top_tokens", "top_windows")
_SAMPLE = ("sample_priority", "sample_values", "sample_tokens", "sample_windows")


@functools.partial(jax.jit, donate_argnums=0)
def _fold_counts(counts: tuple, valid: jax.Array, edges: jax.Array, entries: Entries) -> tuple:
  """Counts, sums, maxima and the histogram (`accumulate.histogram_bins`, as in the dense
  update) of the entries, and the valid tokens: the `_COUNTS` fields."""
  hist_counts, fire_count, max_value, sum_value, tokens_seen = counts
  values, rows = entries.values, entries.rows
  n_rows, n_bins = hist_counts.shape
  active = rows < n_rows

  def per_row(op, x, init):
    return getattr(jnp.full(n_rows + 1, init, x.dtype).at[rows], op)(x)[:-1]

  bins, in_range = accumulate.histogram_bins(values, edges)
  flat = jnp.where(active & in_range, rows * n_bins + bins, n_rows * n_bins)
  hist = jnp.zeros(n_rows * n_bins + 1, jnp.int32).at[flat].add(1)[:-1].reshape(n_rows, n_bins)
  return (hist_counts + hist, fire_count + per_row("add", active.astype(jnp.int32), 0),
          jnp.maximum(max_value, per_row("max", values, 0.0)),
          sum_value + per_row("add", values, 0.0), tokens_seen + valid.sum(dtype=jnp.int32))


_WINDOW_ARGS = ("seq_len", "left", "right", "capacity")


@functools.partial(jax.jit, static_argnames=_WINDOW_ARGS, donate_argnums=(0, 1))
def _fold_top(top: tuple, slots: jax.Array, acts, valid, first_token, entries: Entries,
              chunk, *, seq_len: int, left: int, right: int, capacity: int) -> tuple:
  """One chunk of top candidates into the top examples (the `_TOP` fields and their
  slots): larger values first, ties to the earlier token. Returns (fields, slots)."""
  top_values, top_tokens, top_windows = top
  n_rows, n_top = top_values.shape
  tokens = first_token + entries.positions
  r, rank, (v, t, p) = _candidates(
      -entries.values, tokens, (entries.values, tokens, entries.positions),
      entries.top_ordinal, chunk, entries.rows, capacity, n_rows, n_top)
  kept_values = jnp.where(top_tokens >= 0, top_values, -jnp.inf)
  place = rank + _count_prefix((kept_values, top_tokens), r,
                               lambda kv, kt: (kv > v) | ((kv == v) & (kt < t)))
  (top_values, top_tokens), slots, (wr, ws) = _merge_sorted(
      (kept_values, top_tokens), slots, (v, t), r, rank, place)
  windows = _entry_windows(acts, valid, p, wr, seq_len, left, right)
  return (jnp.where(jnp.isfinite(top_values), top_values, 0.0), top_tokens,
          top_windows.at[wr, ws].set(windows, mode="drop")), slots


@functools.partial(jax.jit, static_argnames=_WINDOW_ARGS, donate_argnums=(0, 1))
def _fold_sample(sample: tuple, slots: jax.Array, acts, valid, first_token, entries: Entries,
                 chunk, *, seq_len: int, left: int, right: int, capacity: int) -> tuple:
  """One chunk of sample candidates into the uniform sample (the `_SAMPLE` fields and
  their slots): smaller priorities first, ties to the earlier token. Returns (fields,
  slots)."""
  priority, sample_values, sample_tokens, sample_windows = sample
  n_rows, n_samples = sample_values.shape
  tokens = first_token + entries.positions
  r, rank, (q, v, t, p) = _candidates(
      entries.priority, tokens, (entries.priority, entries.values, tokens, entries.positions),
      entries.sample_ordinal, chunk, entries.rows, capacity, n_rows, n_samples)
  place = rank + _count_prefix((priority, sample_tokens), r,
                               lambda kq, kt: (kq < q) | ((kq == q) & (kt < t)))
  (priority, sample_values, sample_tokens), slots, (wr, ws) = _merge_sorted(
      (priority, sample_values, sample_tokens), slots, (q, v, t), r, rank, place)
  windows = _entry_windows(acts, valid, p, wr, seq_len, left, right)
  return (priority, sample_values, sample_tokens,
          sample_windows.at[wr, ws].set(windows, mode="drop")), slots


@dataclasses.dataclass(frozen=True)
class Room:
  """The host's sizes for the sparse fold, carried from batch to batch.

  Attributes:
    tiers: `active_entries`' tiers (None: plan them from the next batch's counts).
    top, sample: candidates per chunk for the top examples / the sample (0: not chosen).
  """

  tiers: Tiers | None = None
  top: int = 0
  sample: int = 0


# Candidates per chunk at most: a batch with more folds them in several chunks, so the
# shapes compiled stay few and a chunk's sort stays short.
_CHUNK = 1 << 15


def _chunk_size(need: int, previous: int) -> int:
  """Candidates per chunk for `need` of them: the previous size while it is at most 8x
  too large (each new size compiles again), else the next power of two, at most `_CHUNK`."""
  need = min(max(need, 1), _CHUNK)
  if need <= previous <= 8 * max(need, _MIN_CAPACITY):
    return previous
  return min(_power_of_two_at_least(need), _CHUNK)


def fold(stats: accumulate.LatentStats, slots: Slots, acts: jax.Array, valid: jax.Array,
         first_token: jax.Array, edges: jax.Array, latents: jax.Array | None = None, *,
         seq_len: int, left: int, right: int, seed: int, room: Room,
         max_entries_fraction: float = 0.25
         ) -> tuple[accumulate.LatentStats, Slots, Room | None]:
  """`accumulate.update`'s result by the sparse path (windows in `slots` order).

  Args:
    stats, valid, first_token, edges, latents, seq_len, left, right, seed: as for
      `accumulate.update` (`stats` is consumed: use the returned one).
    slots: where `stats` keeps each rank's window (`init_slots` for fresh accumulators).
    acts: `[P, d_sae]` activations of the batch.
    room: the sizes to try (the previous batch's; `Room()` at first). Tiers that do not
      hold this batch's active latents are planned again from its counts.
    max_entries_fraction: the largest entry count worth folding sparsely, as a fraction
      of the batch's (token, latent) cells; past it the dense update is cheaper.

  Returns:
    (stats, slots, room): the new stats and slots and the sizes used, or the inputs
    unchanged and None when the batch needs more entries than that: the caller must
    `finalize` and use the dense update.
  """
  if latents is not None:
    acts = _columns(acts, latents)
  n_pos, n_rows = acts.shape
  tiers = room.tiers
  while True:  # at most twice: tiers planned from this batch's counts hold it
    if tiers is None:
      tiers = plan_tiers(_active_counts(acts, valid), n_rows)
      if _entries_size(tiers, n_pos) > max_entries_fraction * n_pos * n_rows:
        return stats, slots, None
    entries, complete, n_top, n_sample = active_entries(
        stats, acts, valid, first_token, latents, tiers=tiers, seed=seed)
    if bool(complete):
      break
    tiers = None
  n_top, n_sample = int(n_top), int(n_sample)
  room = Room(tiers, _chunk_size(n_top, room.top), _chunk_size(n_sample, room.sample))
  window = dict(seq_len=seq_len, left=left, right=right)
  fields = lambda names: tuple(getattr(stats, n) for n in names)
  counts = _fold_counts(fields(_COUNTS), valid, edges, entries)
  top, top_slots = fields(_TOP), slots.top
  for chunk in range(-(-n_top // room.top)):
    top, top_slots = _fold_top(top, top_slots, acts, valid, first_token, entries,
                               jnp.int32(chunk), capacity=room.top, **window)
  sample, sample_slots = fields(_SAMPLE), slots.sample
  for chunk in range(-(-n_sample // room.sample)):
    sample, sample_slots = _fold_sample(sample, sample_slots, acts, valid, first_token, entries,
                                        jnp.int32(chunk), capacity=room.sample, **window)
  stats = accumulate.LatentStats(**dict(zip(_COUNTS + _TOP + _SAMPLE, counts + top + sample)))
  return stats, Slots(top_slots, sample_slots), room


@jax.jit
def _columns(acts, latents):
  return acts[:, latents]


__all__ = ["Room", "Slots", "active_entries", "finalize", "fold", "init_slots", "plan_tiers"]
