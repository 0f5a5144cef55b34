"""A transcoder's data: two row-aligned shard sets, served as [x, y] pairs.

A transcoder reads one site (x, e.g. `mlp_in.6`) and predicts another (y,
`mlp_out.6`). `jsae harvest` writes both sites from the same forward passes, so
row r of one directory and row r of the other belong to the same token: the
same number of rows in the same shards, in the same order. `PairLoader` checks
that when it opens them (row counts, shard layout, and the provenance that
defines the rows: model, weights, text, contexts) and serves each step's batch
as `[rows, d_in + d_out]`, x then y, both read under one permutation of the
rows, each side with its own normalisation constant.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from jsae.data import shards as shards_lib
from jsae.data.loader import ShardLoader
from jsae.data.shards import ShardError

# Provenance fields that must agree for the rows to be the same tokens (the site and
# the layer may differ: that is the point).
_ROW_DEFINING = ("model", "revision", "tokenizer", "context_length", "excluded_tokens",
                 "text_source")
# In a harvest's recorded stage definition, the fields that may differ between sites.
_SITE_FIELDS = ("site",)


def target_directory(shards_dir: str | os.PathLike, target_site: str) -> Path:
  """Where `jsae harvest` writes the target site beside `shards_dir`: its sibling
  directory named after the site (`activations/train/mlp_in.6` -> `.../mlp_out.6`)."""
  return Path(shards_dir).parent / target_site


def check_aligned(x_dir: str | os.PathLike, y_dir: str | os.PathLike) -> None:
  """Raises ShardError unless the two shard directories hold the same tokens' rows in
  the same order (the message names both directories, what differs and the fix)."""
  mx, my = shards_lib.load_manifest(x_dir), shards_lib.load_manifest(y_dir)
  fix = (" Harvest both sites in one `jsae harvest` (config.lm.site and"
         " config.sae.target_site), which writes them row-aligned.")
  where = f"{x_dir} and {y_dir}"
  if mx.num_rows != my.num_rows or [s.rows for s in mx.shards] != [s.rows for s in my.shards]:
    raise ShardError(f"{where} are not row-aligned: {mx.num_rows:,} rows in"
                     f" {len(mx.shards)} shards against {my.num_rows:,} in {len(my.shards)}."
                     + fix)
  px, py = mx.provenance.to_dict(), my.provenance.to_dict()
  differ = [f"{k}: {px[k]!r} vs {py[k]!r}" for k in _ROW_DEFINING if px[k] != py[k]]
  sx, sy = px["extra"].get("stage"), py["extra"].get("stage")
  if isinstance(sx, dict) and isinstance(sy, dict):
    keys = sorted((set(sx) | set(sy)) - set(_SITE_FIELDS))
    differ += [f"stage.{k}: {sx.get(k)!r} vs {sy.get(k)!r}" for k in keys
               if sx.get(k) != sy.get(k)]
  if differ:
    raise ShardError(f"{where} were written from different inputs ({'; '.join(differ)}),"
                     " so their rows are not the same tokens." + fix)


class PairLoader:
  """A transcoder's `ActivationSource`: [x, y] rows of two aligned shard directories.

  Args:
    x_dir, y_dir: the input site's and the target site's shard directories.
    batch_size, seed, process_index, process_count, prefetch, verify: as for
      `ShardLoader` (both sides use the same seed, so the same rows).
    expected_d_in, expected_d_out: what the config expects (a mismatch is a ShardError).

  Attributes:
    d_in, d_out: the two widths; `batch` rows are `d_in + d_out` wide.
    norm_scale, target_norm_scale: C of x and of y.
    fingerprint: both sides' fingerprints in one.
  """

  def __init__(self, x_dir: str | os.PathLike, y_dir: str | os.PathLike, *, batch_size: int,
               seed: int, expected_d_in: int | None = None,
               expected_d_out: int | None = None, **loader_options):
    check_aligned(x_dir, y_dir)
    self._x = ShardLoader(x_dir, batch_size=batch_size, seed=seed,
                          expected_d_in=expected_d_in, **loader_options)
    try:
      self._y = ShardLoader(y_dir, batch_size=batch_size, seed=seed, **loader_options)
    except BaseException:
      self._x.close()
      raise
    if expected_d_out is not None and self._y.d_in != expected_d_out:
      self.close()
      raise ShardError(f"{shards_lib.manifest_path(y_dir)}: expected the target's width"
                       f" {expected_d_out} (config.sae.d_out), found {self._y.d_in}; set"
                       f" --config.sae.d_out={self._y.d_in}.")
    self.d_in, self.d_out = self._x.d_in, self._y.d_in
    self.batch_size = batch_size
    self.norm_scale, self.target_norm_scale = self._x.norm_scale, self._y.norm_scale
    self.num_rows = self._x.num_rows
    pair = f"{self._x.fingerprint}:{self._y.fingerprint}"
    self.fingerprint = f"{zlib.crc32(pair.encode()):08x}"

  def batch(self, step: int) -> np.ndarray:
    """`[batch_size // process_count, d_in + d_out]` raw rows [x, y] of step `step`."""
    x, y = self._x.batch(step), self._y.batch(step)
    return np.concatenate([x, y.astype(x.dtype, copy=False)], axis=-1)

  def close(self) -> None:
    """Closes both loaders."""
    self._x.close()
    if hasattr(self, "_y"):
      self._y.close()


__all__ = ["PairLoader", "check_aligned", "target_directory"]
