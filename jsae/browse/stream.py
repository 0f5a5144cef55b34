"""The browse pass: text -> LM (stopped at the SAE's site) -> SAE -> `LatentStats`,
then per-latent records with decoded text windows.

One jitted LM prefix per batch of contexts (as in harvest), one jitted encode, then the
batch is folded into the accumulators: by the sparse path (`sparse.fold`, work in
proportion to the active (token, latent) pairs) on the backends where it was measured
faster, else by the dense update (`accumulate.update`). Both give the same statistics;
nothing per latent runs in Python until the records are built.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jsae import harvest
from jsae.browse import accumulate, sparse
from jsae.data.text import TokenContexts
from jsae.lm import gemma
from jsae.lm import mesh as lm_mesh


@dataclasses.dataclass(frozen=True)
class BrowseSettings:
  """What the pass keeps per latent.

  Attributes:
    n_top: top-activating examples.
    n_samples: size of the seeded uniform sample the quantile bands draw from.
    n_bands: quantile bands (equal splits of [0, max activation], as SAEDashboard).
    per_band: examples shown per band.
    window_left, window_right: tokens of context before / after an example's token.
    batch_size: contexts per LM forward.
    seed: the uniform sample's seed.
  """

  n_top: int = 20
  n_samples: int = 64
  n_bands: int = 5
  per_band: int = 5
  window_left: int = 12
  window_right: int = 4
  batch_size: int = 4
  seed: int = 0

  @property
  def window(self) -> int:
    """Tokens per example window."""
    return self.window_left + 1 + self.window_right


# Backends whose browse pass folds batches by the sparse path by default: measured on
# XLA:CPU (bench/browse.py, docs/performance.md); the others keep the dense update until
# the benchmark has been run there.
SPARSE_BACKENDS = ("cpu",)
# The fewest latents accumulated for which the sparse path is the default. Measured on
# the 2-core CPU machine: 16,384 latents, 0.76 of the harvest's speed against 0.57 dense;
# the demo's 4,096 latents over 30k tokens, 47 s against 41 s cold (its compilations
# outweigh the smaller dense update), 38 s against 41 s compiled.
SPARSE_MIN_LATENTS = 8192


def uses_sparse_fold(n_rows: int, stats_sharding=None) -> bool:
  """Whether `stream` folds `n_rows` latents' accumulators by the sparse path by default:
  on a backend where it was measured, for at least `SPARSE_MIN_LATENTS` latents, on one
  device (latent-sharded accumulators keep the dense update, whose arrays stay sharded
  with their latents)."""
  return (jax.default_backend() in SPARSE_BACKENDS and n_rows >= SPARSE_MIN_LATENTS
          and stats_sharding is None)


def process_range(n_contexts: int, index: int, count: int) -> tuple[int, int]:
  """Process `index` of `count`'s contiguous share [first, end) of `n_contexts` contexts
  (earlier processes take earlier contexts, so their shares merge in process order)."""
  return index * n_contexts // count, (index + 1) * n_contexts // count


def merge_over_processes(stats: accumulate.LatentStats) -> accumulate.LatentStats:
  """Every JAX process's `stats` of its `process_range` merged in process order: on each
  process, the accumulators of one stream of all the contexts (as it is on one)."""
  if jax.process_count() == 1:
    return stats
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  gathered = multihost_utils.process_allgather(jax.device_get(stats))  # leaves [processes, ...]
  merged = jax.tree.map(lambda a: jnp.asarray(a[0]), gathered)
  for p in range(1, jax.process_count()):
    merged = accumulate.merge(merged, jax.tree.map(lambda a, p=p: jnp.asarray(a[p]), gathered))
  return merged


def _check_same_devices(lm_params, stats_sharding) -> None:
  """A latent-sharded SAE's accumulators and an LM on a mesh must share their devices."""
  mesh = lm_mesh.mesh_of(lm_params)
  sae_devices = jax.tree.leaves(stats_sharding)[0].device_set
  if mesh is not None and set(mesh.devices.flat) != set(sae_devices):
    raise ValueError(
        f"the SAE is sharded over {len(sae_devices)} devices but the LM's mesh"
        f" ({dict(mesh.shape)}) covers {mesh.size} others or more: one pass needs both on the"
        " same devices. Shard the SAE on a mesh of the LM's devices (sae.shard(mesh) with"
        " mesh = jsae.lm.mesh.mesh_of(lm_params)), or pass it unsharded.")


def stream(sae, lm_params, lm_config: gemma.GemmaConfig, site: str, contexts: TokenContexts,
           settings: BrowseSettings, *, edges: np.ndarray, stats_sharding=None,
           latents=None, progress: bool = True, sparse_fold: bool | None = None,
           max_entries_fraction: float = 0.25,
           context_range: tuple[int, int] | None = None) -> accumulate.LatentStats:
  """Streams `contexts` through the LM to `site` and `sae`, accumulating per-latent stats.

  Args:
    sae: a `jsae.SAE` whose d_in is the site's width (its arrays may be sharded).
    lm_params, lm_config: the LM.
    site: hook site, e.g. 'resid_post.6'.
    contexts: packed contexts; masked positions (BOS, pad) are never counted.
    settings: what to keep.
    edges: histogram edges (`accumulate.hist_edges()`).
    stats_sharding: optional pytree of shardings for the accumulators (latent-sharded SAEs).
    latents: optional ids of the latents to accumulate, `n` of them: the stats then have
      `n` rows in this order (the SAE still encodes every latent: TopK-style SAEs choose
      among all of them). None: every latent.
    sparse_fold: fold batches by the sparse path (None: `uses_sparse_fold`). A batch whose
      active (token, latent) entries need more than `max_entries_fraction` of its cells
      switches the rest of the pass to the dense update.
    max_entries_fraction: see `sparse_fold`.
    context_range: (first, end): stream only contexts [first, end), their tokens still
      named by their index among all the contexts (one process's share, `process_range`;
      `accumulate.merge` joins the shares). None: every context.

  Returns:
    `LatentStats` with `d_sae` rows, or one row per id of `latents`.
  """
  capture = harvest.capture_fn(lm_config, (site,))
  n_rows = sae.d_sae if latents is None else len(latents)
  chosen = None if latents is None else jnp.asarray(latents, jnp.int32)
  stats = accumulate.init(n_rows, n_top=settings.n_top, n_samples=settings.n_samples,
                          window=settings.window, n_bins=len(edges) - 1)
  if stats_sharding is not None:
    _check_same_devices(lm_params, stats_sharding)
    stats = jax.device_put(stats, stats_sharding)
  else:  # on the LM's devices (its mesh, when it has one), whole on each
    sae, stats = lm_mesh.replicate(lm_params, (sae, stats))
  batch_size = lm_mesh.round_batch(settings.batch_size, lm_params)  # every data device works
  encode = jax.jit(lambda model, x: model.encode(x))
  edges32 = jnp.asarray(edges, jnp.float32)
  sparse_fold = uses_sparse_fold(n_rows, stats_sharding) if sparse_fold is None else sparse_fold
  room = sparse.Room() if sparse_fold else None  # the sparse path's sizes; None: dense
  slots = None if room is None else sparse.init_slots(stats)
  seq = contexts.seq_len
  first, n = (0, contexts.n_contexts) if context_range is None else context_range
  bar = tqdm(total=int(contexts.mask[first:n].sum()), unit="tok", desc="browse", disable=not progress,
             dynamic_ncols=True, mininterval=1.0)
  window = dict(seq_len=seq, left=settings.window_left, right=settings.window_right,
                seed=settings.seed)

  def lm_and_sae(start):  # dispatched without waiting: the LM runs while a batch folds
    idx = np.arange(start, start + batch_size)
    rows = np.minimum(idx, n - 1)
    x = capture(lm_params, lm_mesh.put_batch(lm_params, contexts.tokens[rows]))[site]
    valid = (contexts.mask[rows] & (idx < n)[:, None]).reshape(-1)
    return (encode(sae, x.reshape(-1, x.shape[-1])), jnp.asarray(valid), jnp.int32(start * seq),
            edges32, chosen), int(valid.sum())

  starts = range(first, n, batch_size)
  upcoming = lm_and_sae(starts[0]) if starts else None
  for i in range(len(starts)):
    fold_args, n_valid = upcoming
    if i + 1 < len(starts):  # the next batch's LM forward, before this one's host reads
      upcoming = lm_and_sae(starts[i + 1])
    if room is not None:
      stats, slots, room = sparse.fold(stats, slots, *fold_args, room=room,
                                       max_entries_fraction=max_entries_fraction, **window)
      if room is None:  # too dense a batch to fold sparsely: dense from here on
        stats = sparse.finalize(stats, slots)
    if room is None:
      stats = accumulate.update(stats, *fold_args, **window)
    bar.update(n_valid)
  bar.close()
  return stats if room is None else sparse.finalize(stats, slots)


_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_strings(tokenizer, ids) -> list[str]:
  """Display strings of token ids, one per id (SentencePiece '▁' as a space, byte pieces
  as their character when printable)."""
  out = []
  for i in ids:
    piece = tokenizer.id_to_piece(int(i))
    m = _BYTE.match(piece)
    if m:
      b = int(m.group(1), 16)
      piece = chr(b) if 32 <= b < 127 or b in (9, 10) else piece
    out.append(piece.replace("\u2581", " "))
  return out


def _example(token: int, value: float, window: np.ndarray, contexts: TokenContexts,
             settings: BrowseSettings, strings) -> dict:
  """One example: its text window, the latent's activation per token, where it sits."""
  seq = contexts.seq_len
  c, p = divmod(int(token), seq)
  lo, hi = max(0, p - settings.window_left), min(seq, p + settings.window_right + 1)
  ids = contexts.tokens[c, lo:hi]
  keep = contexts.mask[c, lo:hi] | (np.arange(lo, hi) == p)
  offset = settings.window_left - (p - lo)
  values = window[offset:offset + (hi - lo)]
  ids, values = ids[keep], values[keep]
  return dict(context=c, position=p, value=float(value),
              token_index=int(np.flatnonzero(np.arange(lo, hi)[keep] == p)[0]),
              tokens=strings(ids), token_ids=[int(t) for t in ids],
              values=[float(v) for v in values])


def latent_records(stats: accumulate.LatentStats, contexts: TokenContexts, tokenizer,
                   settings: BrowseSettings, edges: np.ndarray, latents=None) -> list[dict]:
  """Per-latent dicts (id, density, max, mean, histogram, top examples, band samples), one
  per row of `stats`, in row order; `latents` are the rows' latent ids, as passed to
  `stream` (None: row l is latent l).

  Quantile bands split [0, max activation] into `n_bands` equal ranges (highest first);
  each shows up to `per_band` examples drawn, in priority order, from the uniform sample
  and then the top examples that fall in it, with the fraction of all tokens it holds
  estimated from the histogram.
  """
  s = jax.tree.map(np.asarray, jax.device_get(stats))
  tokens_seen = int(s.tokens_seen)
  cache: dict[int, str] = {}

  def strings(ids):
    missing = [int(i) for i in ids if int(i) not in cache]
    cache.update(zip(missing, token_strings(tokenizer, missing)))
    return [cache[int(i)] for i in ids]

  centres = np.sqrt(edges[:-1] * edges[1:])
  records = []
  ids = range(s.fire_count.shape[0]) if latents is None else latents
  for row, latent in enumerate(ids):
    n_fire, vmax = int(s.fire_count[row]), float(s.max_value[row])
    top = [_example(t, v, w, contexts, settings, strings)
           for t, v, w in zip(s.top_tokens[row], s.top_values[row], s.top_windows[row]) if t >= 0]
    pool = [(t, v, w) for t, v, w in zip(s.sample_tokens[row], s.sample_values[row],
                                         s.sample_windows[row]) if t >= 0]
    pool += [(t, v, w) for t, v, w in zip(s.top_tokens[row], s.top_values[row], s.top_windows[row])
             if t >= 0 and t not in {p[0] for p in pool}]
    bands = []
    for b in reversed(range(settings.n_bands)):
      lo, hi = vmax * b / settings.n_bands, vmax * (b + 1) / settings.n_bands
      inside = [p for p in pool if lo < p[1] <= hi or (b == 0 and p[1] <= hi)]
      in_hist = (centres > lo) & (centres <= hi)
      bands.append(dict(min=lo, max=hi,
                        contains=float(s.hist_counts[row][in_hist].sum()) / max(tokens_seen, 1),
                        examples=[_example(t, v, w, contexts, settings, strings)
                                  for t, v, w in inside[:settings.per_band]]))
    records.append(dict(
        id=int(latent), fire_count=n_fire, density=n_fire / max(tokens_seen, 1), max=vmax,
        mean=float(s.sum_value[row]) / max(n_fire, 1),
        hist=[int(c) for c in s.hist_counts[row]], top=top, bands=bands))
  return records


__all__ = ["BrowseSettings", "SPARSE_BACKENDS", "SPARSE_MIN_LATENTS", "latent_records",
           "merge_over_processes", "process_range", "stream", "token_strings",
           "uses_sparse_fold"]
