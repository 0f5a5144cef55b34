"""One shard dataset written by N processes: the row plan, the part directories, the merge.

A multi-process harvest splits the dataset's global rows (in the order a
single process would write them) into N contiguous ranges whose boundaries
are multiples of `rows_per_shard`. Process k writes its range as an ordinary,
resumable shard directory

    SITE_DIR/part-0000k-of-0000N/manifest.json, shard-000000.bin, ...

so its shards are exactly the single-process shards k*S ... (k+1)*S - 1. Only
the part holding the last row may end on a partial shard; when there are fewer
shards than processes, the parts after it are empty (a 1,023-row split on two
processes: part 0 holds one partial shard, part 1 nothing). When every part is
complete, process 0 merges: each part's shard files are renamed
into SITE_DIR under their global names, and one `manifest.json` listing them
all is written atomically, last. The result is byte for byte the dataset one
process would have written (same files, checksums, C and fingerprint), so
`ShardLoader`, `jsae shards info/verify`, training and evaluation read it as one.

The merge is idempotent: a crash during it leaves renamed files and part
manifests that a rerun finishes from. A restart with another process count
finds part directories of the old count and is refused (the rows would not line up).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

from jsae.data import shards

_PART = re.compile(r"^part-(\d{5})-of-(\d{5})$")


def row_ranges(total_rows: int, rows_per_shard: int, process_count: int
               ) -> list[tuple[int, int]]:
  """[(lo, hi)] global rows of each process: contiguous, shard-aligned, together complete.

  Every process gets ceil(shards / processes) shards, in order, so each `lo` is a
  multiple of `rows_per_shard`; the range ending at `total_rows` may hold a
  partial shard, and the ranges after it are empty (lo == hi == total_rows).
  """
  shards_each = math.ceil(math.ceil(total_rows / rows_per_shard) / process_count)
  span = shards_each * rows_per_shard
  return [(min(k * span, total_rows), min((k + 1) * span, total_rows))
          for k in range(process_count)]


def part_directory(site_dir: str | os.PathLike, process_index: int, process_count: int) -> Path:
  """Where process `process_index` of `process_count` writes its part of `site_dir`."""
  return Path(site_dir) / f"part-{process_index:05d}-of-{process_count:05d}"


def existing_parts(site_dir: str | os.PathLike) -> dict[int, list[Path]]:
  """{process count: part directories} found under `site_dir`."""
  found: dict[int, list[Path]] = {}
  directory = Path(site_dir)
  if directory.is_dir():
    for p in sorted(directory.iterdir()):
      m = _PART.match(p.name)
      if m and p.is_dir():
        found.setdefault(int(m.group(2)), []).append(p)
  return found


def check_layout(site_dir: str | os.PathLike, process_count: int) -> None:
  """Raises ShardError when `site_dir` holds an unfinished write of another process count."""
  site_dir = Path(site_dir)
  if shards.manifest_path(site_dir).exists() and shards.load_manifest(site_dir).complete:
    return  # finished: any process count reads it
  other = sorted(n for n in existing_parts(site_dir) if n != process_count)
  if other:
    raise shards.ShardError(
        f"{site_dir} holds the unfinished parts of a {other[0]}-process harvest; this one"
        f" runs {process_count} process(es). Restart it with {other[0]} processes to"
        " finish it, or delete the directory to harvest it again.")
  if process_count > 1 and shards.manifest_path(site_dir).exists():
    raise shards.ShardError(
        f"{site_dir} holds an unfinished single-process harvest; restart it with one"
        " process to finish it, or delete the directory to harvest it again.")


def merge(site_dir: str | os.PathLike, process_count: int) -> shards.Manifest:
  """Joins the complete parts of `site_dir` into one dataset (see the module docstring)."""
  site_dir = Path(site_dir)
  if shards.manifest_path(site_dir).exists():
    done = shards.load_manifest(site_dir)
    if done.complete:
      _remove_parts(site_dir, process_count)
      return done
  parts = [shards.load_manifest(part_directory(site_dir, k, process_count))
           for k in range(process_count)]
  first = parts[0]
  for k, m in enumerate(parts):
    where = part_directory(site_dir, k, process_count)
    if not m.complete:
      raise shards.ShardError(f"{where}: expected a complete part to merge, found"
                              f" {m.num_rows} rows and complete=false; rerun the harvest.")
    for key in ("d_in", "dtype", "rows_per_shard", "provenance"):
      if getattr(m, key) != getattr(first, key):
        raise shards.ShardError(f"{where}: {key} differs from part 0's; the parts are"
                                " not one dataset (delete the directory and harvest again).")
  check_part_rows([m.num_rows for m in parts], first.rows_per_shard, site_dir)
  entries = []
  for k, m in enumerate(parts):
    for s in m.shards:
      target = shards.shard_file_name(len(entries))
      source = part_directory(site_dir, k, process_count) / s.file
      if source.exists():
        os.replace(source, site_dir / target)
      elif not (site_dir / target).exists():
        raise shards.ShardError(f"{source}: missing, and not merged into {site_dir / target}"
                                " either; delete the directory and harvest again.")
      entries.append(shards.ShardEntry(file=target, rows=s.rows, crc32=s.crc32,
                                       sum_sq_norm=s.sum_sq_norm))
  merged = shards.Manifest(d_in=first.d_in, dtype=first.dtype,
                           rows_per_shard=first.rows_per_shard, shards=entries, complete=True,
                           provenance=first.provenance)
  shards.write_manifest(site_dir, merged)
  _remove_parts(site_dir, process_count)
  return merged


def check_part_rows(part_rows: list[int], rows_per_shard: int, site_dir: str | os.PathLike
                    ) -> None:
  """Raises ShardError unless part k holds exactly the rows `row_ranges` gives process k.

  Args:
    part_rows: `[process_count]` rows in each complete part.
    rows_per_shard: the parts' shard size.
    site_dir: the dataset being merged (named in the error).

  The plan is recomputed from the parts' total, so parts written under another
  plan (another rows_per_shard or jsae version) are refused instead of merged
  into a dataset whose shards do not line up.
  """
  total, count = sum(part_rows), len(part_rows)
  for k, (rows, (lo, hi)) in enumerate(zip(part_rows, row_ranges(total, rows_per_shard, count))):
    if rows != hi - lo:
      raise shards.ShardError(
          f"{part_directory(site_dir, k, count)}: holds {rows} rows, but a {count}-process"
          f" harvest of {total} rows in shards of {rows_per_shard} gives process {k} rows"
          f" {lo}..{hi} ({hi - lo} rows); the parts do not form one dataset. Delete"
          f" {site_dir} and harvest it again.")


def _remove_parts(site_dir: Path, process_count: int) -> None:
  for k in range(process_count):
    shutil.rmtree(part_directory(site_dir, k, process_count), ignore_errors=True)


__all__ = ["check_layout", "check_part_rows", "existing_parts", "merge", "part_directory",
           "row_ranges"]
