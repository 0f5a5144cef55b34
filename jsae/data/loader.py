"""Training batches from activation shards: batch = f(seed, step).

Shuffle: a global, seeded permutation of all N rows per epoch. Row position
p = step * batch_size + j of the endless row stream belongs to epoch e = p // N
and reads row pi_{seed, e}(p mod N), where pi is a keyed 6-round Feistel
network on [0, 2^bits) (N <= 2^bits < 2N) restricted to [0, N) by cycle
walking. So

  * every row is served exactly once per epoch, and any batch is computed
    directly from (seed, step) in O(batch) time and O(1) memory: no permutation
    array (8 GiB of int64 for 1B tokens), no iterator state to checkpoint, and a
    restart at step t continues the exact sequence;
  * the shuffle is global (a pseudo-random permutation of the whole dataset,
    not of a buffer): a batch mixes rows from all shards (hence all documents
    and positions), unlike the shard-order + shuffle-buffer scheme, whose
    batches come from the few shards in the buffer (Gemma Scope's ~1M-row
    buckets) and whose buffer state must be checkpointed for an exact resume.

The cost is random row reads. Rows are >= 1 KiB (d_in >= 256 float32), and the
batch's rows are read in sorted order per shard; on page-cached shards this
serves 1.5-3 GiB/s from one core on the 2-core dev machine, about 0.2-0.3 of a
sequential read of the same files (bench/loader.py). Local NVMe handles such
reads well too (MADV_RANDOM stops readahead of unused neighbours); on network
or spinning storage larger than RAM, a shard-order reader would be the better
trade.

Per host: the global batch of step t is split into `process_count` contiguous
slices; process i computes and reads only slice i. A background thread keeps
`prefetch` batches ready for the steps after the last one asked for.
"""

from __future__ import annotations

import mmap
import os
import queue
import resource
import threading
from pathlib import Path

import numpy as np

from jsae.data import shards as shards_lib
from jsae.data.shards import ShardError

_MASK64 = (1 << 64) - 1
_ROUNDS = 6  # >= 4 rounds make a Feistel network a strong pseudo-random permutation


# ----------------------------------------------------------------------------- shuffle


def _mix64(z: int) -> int:
  """splitmix64 finaliser on a Python int (for deriving keys)."""
  z = (z + 0x9E3779B97F4A7C15) & _MASK64
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
  return z ^ (z >> 31)


def round_keys(seed: int, epoch: int) -> tuple[int, ...]:
  """The Feistel round keys of the permutation for (seed, epoch)."""
  k = _mix64(_mix64(seed & _MASK64) ^ (epoch & _MASK64))
  keys = []
  for r in range(_ROUNDS):
    k = _mix64(k + r)
    keys.append(k)
  return tuple(keys)


def _round_fn(x: np.ndarray, key: int, mask: np.uint64) -> np.ndarray:
  """A keyed pseudo-random function of uint64 `x`, truncated to `mask`."""
  z = x + np.uint64(key)  # uint64 arrays wrap silently
  z ^= z >> np.uint64(30)
  z *= np.uint64(0xBF58476D1CE4E5B9)
  z ^= z >> np.uint64(27)
  z *= np.uint64(0x94D049BB133111EB)
  z ^= z >> np.uint64(31)
  return z & mask


def _feistel(x: np.ndarray, keys: tuple[int, ...], bits: int) -> np.ndarray:
  """A bijection of [0, 2^bits) on uint64 `x` (an unbalanced Feistel network).

  x = L * 2^wr + R with |L| = bits // 2 bits; each round maps (L, R) to
  (R, L xor F_k(R)) (invertible whatever F), swapping the widths; an even
  number of rounds restores them.
  """
  wl, wr = bits // 2, bits - bits // 2
  left, right = x >> np.uint64(wr), x & np.uint64((1 << wr) - 1)
  for k in keys:
    left, right = right, left ^ _round_fn(right, k, np.uint64((1 << wl) - 1))
    wl, wr = wr, wl
  return (left << np.uint64(wr)) | right


def permute(i: np.ndarray, n: int, keys: tuple[int, ...]) -> np.ndarray:
  """`pi(i)` for `i [m]` in [0, n): a keyed bijection of [0, n); int64 `[m]`.

  Cycle walking: apply the Feistel bijection of [0, 2^bits) (2^bits < 2n) until
  the value lands in [0, n); the result is a bijection of [0, n). Expected
  walks per value are < 2.
  """
  if n <= 1:
    return np.zeros_like(i, dtype=np.int64)
  bits = max(2, (n - 1).bit_length())
  x = np.asarray(i, dtype=np.uint64).copy()
  todo = np.arange(x.size)
  while todo.size:
    x[todo] = _feistel(x[todo], keys, bits)
    todo = todo[x[todo] >= np.uint64(n)]
  return x.astype(np.int64)


def row_indices(step: int, *, num_rows: int, batch_size: int, seed: int,
                process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """Global row ids process `process_index` reads for `step`; int64 `[batch_size // process_count]`.

  The global batch of `step` is positions [step * B, (step + 1) * B) of the row
  stream; this process gets the `process_index`-th contiguous slice.
  """
  local = batch_size // process_count
  start = step * batch_size + process_index * local
  pos = np.arange(start, start + local, dtype=np.int64)
  epoch, within = np.divmod(pos, num_rows)
  out = np.empty_like(pos)
  for e in np.unique(epoch):  # one epoch, or two where the batch straddles a boundary
    sel = epoch == e
    out[sel] = permute(within[sel], num_rows, round_keys(seed, int(e)))
  return out


# ----------------------------------------------------------------------------- prefetch


class _Prefetcher:
  """A thread computing `fn(step)` for step = start, start + 1, ... into a bounded queue."""

  def __init__(self, fn, start: int, depth: int):
    self.next_step = start  # the step the next `get()` returns
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(fn, start), daemon=True,
                                    name="ShardLoader-prefetch")
    self._thread.start()

  def _run(self, fn, step: int) -> None:
    while not self._stop.is_set():
      try:
        item = (step, fn(step), None)
      except BaseException as e:  # handed to the consumer, which re-raises it
        item = (step, None, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if item[2] is not None:
        return
      step += 1

  def get(self) -> np.ndarray:
    """The batch for `next_step` (blocking); re-raises the thread's error."""
    while True:
      try:
        step, batch, err = self._queue.get(timeout=1.0)
        break
      except queue.Empty:
        if not self._thread.is_alive():
          raise RuntimeError("ShardLoader prefetch thread died without a result.") from None
    assert step == self.next_step, (step, self.next_step)
    self.next_step += 1
    if err is not None:
      raise err
    return batch

  def stop(self) -> None:
    """Stops the thread and drops what it prepared."""
    self._stop.set()
    while self._thread.is_alive():
      try:
        self._queue.get_nowait()
      except queue.Empty:
        pass
      self._thread.join(timeout=0.05)


# ----------------------------------------------------------------------------- loader


class ShardLoader:
  """An `ActivationSource` reading a shard directory (see the module docstring).

  Args:
    directory: a complete shard directory (manifest.json + shards).
    batch_size: rows per global batch (all processes together).
    seed: the shuffle seed; batch(t) is a pure function of (seed, t).
    expected_d_in, expected_dtype: what the config expects; a mismatch is a
      `ShardError` at construction.
    process_index, process_count: this process's slice of each global batch
      (default: from `jax`).
    prefetch: batches prepared ahead by a background thread (0: none).
    verify: "first_open" checks a shard's CRC-32 the first time a batch reads
      from it (with the global shuffle that is every shard within the first
      batches, so it costs one read of the dataset at start, ~3.7 GiB/s);
      "all" checks every shard in the constructor; "none" checks sizes only
      (for datasets too large to re-read at every start: run
      `jsae shards verify` once instead).
    start_step: if given, prefetching starts there at construction; otherwise
      at the first `batch()` call.
    allow_incomplete: read a dataset whose writer has not finished.

  Attributes:
    d_in, batch_size, norm_scale: the `ActivationSource` contract.
    num_rows: N, rows in the dataset.
    local_batch_size: rows `batch()` returns (batch_size // process_count).
    manifest: the parsed manifest.
    fingerprint: `Manifest.fingerprint()`, to store with checkpoints.
  """

  def __init__(self, directory: str | os.PathLike, *, batch_size: int, seed: int,
               expected_d_in: int | None = None, expected_dtype: str | None = None,
               process_index: int | None = None, process_count: int | None = None,
               prefetch: int = 4, verify: str = "first_open",
               start_step: int | None = None, allow_incomplete: bool = False):
    self.directory = Path(directory)
    m = self.manifest = shards_lib.load_manifest(self.directory)
    mpath = shards_lib.manifest_path(self.directory)
    if not m.complete and not allow_incomplete:
      raise ShardError(
          f"{mpath}: expected a complete dataset, found complete=false ({m.num_rows} rows"
          " committed; leftover writer files:"
          f" {shards_lib.stray_files(self.directory, m) or 'none'}). The writer crashed or"
          " is still running: resume it to finish (it removes the leftovers).")
    if m.num_rows == 0:
      raise ShardError(f"{mpath}: expected rows to train on, found 0 rows.")
    if expected_d_in is not None and m.d_in != expected_d_in:
      raise ShardError(f"{mpath}: expected d_in {expected_d_in} (config.sae.d_in), found"
                       f" {m.d_in}; set --config.sae.d_in={m.d_in} or use other shards.")
    if expected_dtype is not None and m.dtype != str(np.dtype(expected_dtype)):
      raise ShardError(f"{mpath}: expected dtype {np.dtype(expected_dtype)} (config), found"
                       f" {m.dtype}.")
    if verify not in ("first_open", "all", "none"):
      raise ValueError(f"ShardLoader: verify must be 'first_open', 'all' or 'none'; got"
                       f" {verify!r}.")
    if process_index is None or process_count is None:
      import jax
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if batch_size <= 0 or batch_size % process_count:
      raise ValueError(f"ShardLoader: batch_size {batch_size} must be a positive multiple"
                       f" of the {process_count} processes.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"ShardLoader: process_index {process_index} not in"
                       f" [0, {process_count}).")

    self.d_in, self.batch_size, self.seed = m.d_in, batch_size, seed
    self.norm_scale = m.norm_scale
    self.fingerprint = m.fingerprint()
    self.num_rows = m.num_rows
    self.dtype = shards_lib.storage_dtype(m.dtype)
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size = batch_size // process_count
    self._starts = m.shard_starts()
    self._verify = verify
    self._maps: list[np.memmap | None] = [None] * len(m.shards)
    self._lock = threading.Lock()

    # Missing or truncated files fail here, before training starts.
    problems = [p for i in range(len(m.shards))
                if (p := shards_lib.check_shard_file(self.directory, m, i, checksum=False))]
    if problems:
      more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
      raise ShardError(problems[0] + more)
    _raise_fd_limit(len(m.shards) + 64)  # each open memmap holds a file descriptor
    if verify == "all":
      for i in range(len(m.shards)):
        self._open(i)

    self._depth = prefetch
    self._prefetcher: _Prefetcher | None = None
    self._closed = False
    if start_step is not None and prefetch > 0:
      self._prefetcher = _Prefetcher(self.read, start_step, prefetch)

  @property
  def steps_per_epoch(self) -> float:
    """N / batch_size (an epoch need not end on a step boundary)."""
    return self.num_rows / self.batch_size

  def _open(self, index: int) -> np.memmap:
    """The memmap of shard `index`, checksummed at first open if verify != 'none'."""
    mm = self._maps[index]
    if mm is not None:
      return mm
    with self._lock:
      if self._maps[index] is None:
        m = self.manifest
        if self._verify != "none":
          p = shards_lib.check_shard_file(self.directory, m, index, checksum=True)
          if p:
            raise ShardError(p)
        s = m.shards[index]
        mm = np.memmap(self.directory / s.file, dtype=self.dtype, mode="r",
                       shape=(s.rows, m.d_in))
        # Batches touch rows at random: readahead would fetch unused neighbours.
        if getattr(mm, "_mmap", None) is not None and hasattr(mmap, "MADV_RANDOM"):
          mm._mmap.madvise(mmap.MADV_RANDOM)
        self._maps[index] = mm
      return self._maps[index]

  def read(self, step: int) -> np.ndarray:
    """This process's rows of the global batch of `step`, read now (no prefetch).

    Returns:
      `[local_batch_size, d_in]` rows in the storage dtype, in the permuted order.
    """
    rows = row_indices(step, num_rows=self.num_rows, batch_size=self.batch_size,
                       seed=self.seed, process_index=self.process_index,
                       process_count=self.process_count)
    # Sorted reads go through each shard front to back (friendlier to the page
    # cache and disk); `order` puts the rows back in the permuted order.
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    bounds = np.searchsorted(sorted_rows, self._starts)
    out = np.empty((rows.size, self.d_in), self.dtype)
    for s in np.flatnonzero(bounds[1:] > bounds[:-1]):
      a, z = bounds[s], bounds[s + 1]
      out[order[a:z]] = self._open(s)[sorted_rows[a:z] - self._starts[s]]
    return out

  def batch(self, step: int) -> np.ndarray:
    """`[batch_size // process_count, d_in]` raw rows of step `step` (not divided by C).

    In-order calls are served by the prefetch thread; any other step is read
    directly (same result) and prefetching restarts after it.
    """
    if self._closed:
      raise RuntimeError("ShardLoader.batch() after close().")
    pf = self._prefetcher
    if pf is not None and pf.next_step == step:
      try:
        return pf.get()
      except BaseException:
        pf.stop()  # the thread ended with this error; the next call starts afresh
        self._prefetcher = None
        raise
    if pf is not None:
      pf.stop()
      self._prefetcher = None
    if self._depth > 0:
      self._prefetcher = _Prefetcher(self.read, step + 1, self._depth)
    return self.read(step)

  def close(self) -> None:
    """Stops the prefetch thread and unmaps the shards."""
    self._closed = True
    if self._prefetcher is not None:
      self._prefetcher.stop()
      self._prefetcher = None
    self._maps = [None] * len(self._maps)

  def __enter__(self) -> "ShardLoader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _raise_fd_limit(needed: int) -> None:
  """Raises the soft open-file limit towards `needed` (up to the hard limit)."""
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  if soft != resource.RLIM_INFINITY and soft < needed:
    new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
