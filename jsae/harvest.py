"""Harvest LM activations into shard directories: LM -> `jsae.data.shards`.

One jitted forward per batch of contexts captures every requested site (and
stops after the last layer needed); rows at BOS/EOS/pad positions are dropped;
each site's rows go to its own shard directory (`OUT/<site>/`). Contexts are
processed in a fixed order, so an interrupted harvest resumes: each site's
writer knows how many rows it committed, and the harvester skips exactly those
rows (per site, since a crash can fall between two sites' shard commits). A
finished directory is reused as it is.

On N processes (`jax.distributed`), every process holds all the contexts and
writes a contiguous, shard-aligned range of the global rows as its own part;
process 0 then merges the parts into the dataset one process would have
written (`jsae.data.parts`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from jsae import sharding
from jsae.data import parts as parts_lib
from jsae.data import shards as shards_lib
from jsae.data.text import TokenContexts
from jsae.lm import gemma
from jsae.lm import mesh as lm_mesh


@dataclasses.dataclass
class HarvestResult:
  """What `harvest` did: one shard directory per site.

  Attributes:
    directories: {site: shard directory}.
    reused: sites whose directory was already complete (nothing recomputed).
    tokens_per_s: harvested rows per second of this call (0 if all reused).
    forward_s, write_s: time in the LM forward (incl. device->host) and in writing.
  """

  directories: dict[str, Path]
  reused: list[str]
  tokens_per_s: float = 0.0
  forward_s: float = 0.0
  write_s: float = 0.0


def site_directory(out_dir: str | os.PathLike, site: str) -> Path:
  """The shard directory of `site` under `out_dir`."""
  return Path(out_dir) / site


@functools.lru_cache(maxsize=8)  # one compile per (model, sites), shared by train/eval harvests
def capture_fn(lm_config: gemma.GemmaConfig, sites: tuple[str, ...]):
  """A jitted (params, tokens [b, s]) -> {site: activations} that stops after the last site."""
  last = max(gemma.parse_site(s, lm_config)[1] for s in sites)
  fn = functools.partial(gemma.forward, config=lm_config, capture=sites, stop_at_layer=last + 1)
  return jax.jit(lambda params, tokens: fn(params, tokens)[1])


def _rows_before(contexts: TokenContexts) -> np.ndarray:
  """`[n_contexts + 1]` cumulative count of kept rows before each context."""
  return np.concatenate([[0], np.cumsum(contexts.mask.sum(axis=1))])


def harvest(lm_params, lm_config: gemma.GemmaConfig, contexts: TokenContexts, *,
            sites: list[str] | tuple[str, ...], out_dir: str | os.PathLike,
            batch_size: int = 4, rows_per_shard: int = 65536, dtype: str = "float32",
            provenance: dict | None = None, progress: bool = True,
            process_index: int | None = None, process_count: int | None = None,
            extra: dict | None = None) -> HarvestResult:
  """Runs the LM over `contexts` and writes each site's activations to shards.

  Args:
    lm_params, lm_config: the LM (params passed to jit as arguments). Params placed on
      an LM mesh (`jsae.lm.mesh.place`) run every forward on all its devices: the
      batch is split over its data axis (`batch_size` rounded up to a multiple of it)
      and the weights over its model axis.
    contexts: packed token contexts (all of them, on every process); `mask`
      False rows are not written.
    sites: hook sites, e.g. ["resid_post.9", "mlp_out.9"].
    out_dir: parent directory; site s goes to `out_dir/s/`.
    batch_size: contexts per forward (the last batch is padded, not recompiled).
    rows_per_shard: rows per shard file.
    dtype: stored dtype, 'float32' or 'bfloat16'.
    provenance: fields of `shards.Provenance` shared by all sites (model,
      tokenizer, text_source, ...); hook site, layer, context length and the
      excluded tokens are filled in here.
    progress: show a progress bar.
    process_index, process_count: this process's part of a multi-process
      harvest (default: JAX's); with a count above 1 this call writes its
      part, and the merge into one dataset happens when every process has
      finished (after a barrier, by process 0) when JAX runs that many
      processes, or through `finish_parts` otherwise.
    extra: {site: dict} added to that site's provenance `extra` (e.g. its
      stage definition).
  """
  sites = tuple(sites)
  if not sites:
    raise ValueError("harvest needs at least one hook site (e.g. resid_post.9).")
  for s in sites:
    gemma.parse_site(s, lm_config)  # validates name and layer
  if contexts.n_tokens == 0:
    raise ValueError("no tokens to harvest: every context position is masked (empty corpus?).")
  if contexts.seq_len > lm_config.max_seq_len:
    raise ValueError(f"context length {contexts.seq_len} exceeds {lm_config.name}'s"
                     f" maximum {lm_config.max_seq_len}; use a shorter text.seq_len.")
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count

  directories = {s: site_directory(out_dir, s) for s in sites}
  reused = [s for s, d in directories.items() if is_complete(d)]
  todo = [s for s in sites if s not in reused]
  if not todo:
    return HarvestResult(directories, reused)
  for s in todo:
    parts_lib.check_layout(directories[s], count)
  before = _rows_before(contexts)
  lo, hi = parts_lib.row_ranges(int(before[-1]), rows_per_shard, count)[index]
  targets = {s: parts_lib.part_directory(directories[s], index, count) if count > 1
             else directories[s] for s in todo}
  result = HarvestResult(directories, reused)
  writing = [s for s in todo if not is_complete(targets[s])]
  if writing:
    result = _write_rows(lm_params, lm_config, contexts, before, (lo, hi), writing, targets,
                         batch_size=batch_size, rows_per_shard=rows_per_shard, dtype=dtype,
                         provenance=provenance, progress=progress, extra=extra)
    result.directories, result.reused = directories, reused
  if count > 1 and jax.process_count() == count:
    sharding.barrier("jsae_harvest_parts_written")
    if index == 0:
      finish_parts(out_dir, todo, count)
    sharding.barrier("jsae_harvest_parts_merged")
  return result


def finish_parts(out_dir: str | os.PathLike, sites, process_count: int) -> None:
  """Merges each site's `process_count` complete parts into one dataset (process 0)."""
  for s in sites:
    parts_lib.merge(site_directory(out_dir, s), process_count)


def _write_rows(lm_params, lm_config, contexts: TokenContexts, before: np.ndarray,
                row_range: tuple[int, int], sites: list[str], targets: dict, *,
                batch_size: int, rows_per_shard: int, dtype: str, provenance: dict | None,
                progress: bool, extra: dict | None = None) -> HarvestResult:
  """Writes global rows [lo, hi) of each site to its target directory, resuming."""
  lo, hi = row_range
  writers = {}
  for s in sites:
    kind, layer = gemma.parse_site(s, lm_config)
    prov = dict(provenance or {})
    prov.update(hook_site=kind, layer=layer, context_length=contexts.seq_len,
                excluded_tokens=["<bos>", "<eos>", "<pad>"])
    prov.setdefault("model", lm_config.name)
    prov["extra"] = {**prov.get("extra", {}), **(extra or {}).get(s, {})}
    width = lm_config.n_heads * lm_config.head_dim if kind == "attn_z" else lm_config.d_model
    writers[s] = shards_lib.ShardWriter(targets[s], d_in=width, rows_per_shard=rows_per_shard,
                                        dtype=dtype, provenance=prov)

  written = {s: lo + writers[s].rows_committed for s in sites}  # global rows done
  first = int(np.searchsorted(before, min(written.values()), side="right") - 1)
  end = int(np.searchsorted(before, hi, side="left"))  # contexts starting before hi
  capture = capture_fn(lm_config, tuple(sites))
  batch_size = lm_mesh.round_batch(batch_size, lm_params)  # every data device gets contexts
  n = contexts.n_contexts
  bar = tqdm(total=hi - lo, initial=min(written.values()) - lo, unit="tok", desc="harvest",
             disable=not progress, dynamic_ncols=True, mininterval=1.0)
  t_start, t_forward, t_write, done_rows = time.perf_counter(), 0.0, 0.0, 0
  try:
    for start in range(first, end, batch_size):
      idx = np.arange(start, start + batch_size)
      real = idx < end
      t = time.perf_counter()
      acts = capture(lm_params, lm_mesh.put_batch(lm_params, contexts.tokens[np.minimum(idx, n - 1)]))
      acts = {s: np.asarray(jax.device_get(a), np.float32) for s, a in acts.items()}
      t_forward += time.perf_counter() - t
      t = time.perf_counter()
      batch_rows = 0
      for j, c in enumerate(idx[real]):
        a, b = max(lo, int(before[c])), min(hi, int(before[c + 1]))  # this range's rows of c
        batch_rows += max(0, b - a)
        for s in sites:
          begin = max(a, written[s])  # rows this site already has are skipped
          if begin < b:
            rows = acts[s][j][contexts.mask[c]]
            writers[s].write(rows[begin - int(before[c]):b - int(before[c])])
            written[s] = b
      t_write += time.perf_counter() - t
      done_rows += batch_rows
      bar.update(batch_rows)
      bar.set_postfix(tok_s=f"{done_rows / (time.perf_counter() - t_start):.0f}", refresh=False)
    for w in writers.values():
      w.finalize()
  except BaseException:
    for w in writers.values():
      w.abort()  # keeps every committed shard; the next call resumes
    raise
  finally:
    bar.close()
  elapsed = time.perf_counter() - t_start
  return HarvestResult(dict(targets), [], tokens_per_s=done_rows / max(elapsed, 1e-9),
                       forward_s=t_forward, write_s=t_write)


def is_complete(directory: str | os.PathLike) -> bool:
  """Whether `directory` holds a finished (finalized) shard set."""
  path = shards_lib.manifest_path(Path(directory))
  return path.exists() and shards_lib.load_manifest(Path(directory)).complete
