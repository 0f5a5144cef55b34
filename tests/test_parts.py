"""The multi-process row plan and merge (`jsae.data.parts`), without an LM: synthetic rows
written by `ShardWriter` as N parts merge into the bytes one writer produces, for every
split size around the shard and process boundaries."""

import os

import numpy as np
import pytest

from jsae.data import parts
from jsae.data import shards

RPS, D_IN = 4, 3  # rows per shard, row width: tiny, so every layout is cheap to write


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch):
  """These tests check layouts, not durability: skipping fsync makes ~60 datasets cheap."""
  monkeypatch.setattr(os, "fsync", lambda fd: None)


def _rows(total):
  """`[total, D_IN]` float32 rows, each distinct (row i holds i, i + .1, i + .2)."""
  return np.arange(total, dtype=np.float32)[:, None] + np.float32(0.1) * np.arange(D_IN)


def _write(directory, rows):
  writer = shards.ShardWriter(directory, d_in=D_IN, rows_per_shard=RPS,
                              provenance=dict(model="synthetic"))
  if len(rows):
    writer.write(rows)
  return writer.finalize()


def _files(directory):
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# Splits smaller than a shard, smaller than one shard per process, exact multiples and
# uneven sizes, for 2, 3 and 4 processes.
CASES = [(total, count) for count in (2, 3, 4) for total in range(1, (count + 2) * RPS + 2)]


def test_parts_of_every_split_size_merge_into_the_single_process_bytes(tmp_path):
  for total, count in CASES:
    rows = _rows(total)
    one, many = tmp_path / f"one-{total}-{count}", tmp_path / f"many-{total}-{count}"
    _write(one, rows)
    for k, (lo, hi) in enumerate(parts.row_ranges(total, RPS, count)):
      assert lo % RPS == 0 or lo == hi == total  # shard-aligned; empty after the last row
      _write(parts.part_directory(many, k, count), rows[lo:hi])
    merged = parts.merge(many, count)
    assert merged.num_rows == total, (total, count)
    assert _files(one) == _files(many), (total, count)
    assert shards.load_manifest(many).fingerprint() == shards.load_manifest(one).fingerprint()


def test_merge_refuses_parts_that_do_not_follow_the_row_plan(tmp_path):
  rows = _rows(10)
  # 10 rows on 2 processes: the plan is 0..8 and 8..10; these parts split at 4 instead.
  _write(parts.part_directory(tmp_path, 0, 2), rows[:4])
  _write(parts.part_directory(tmp_path, 1, 2), rows[4:])
  with pytest.raises(shards.ShardError, match=r"part-00000-of-00002: holds 4 rows.*rows 0\.\.8"
                                              r".*Delete"):
    parts.merge(tmp_path, 2)
  assert not shards.manifest_path(tmp_path).exists()  # nothing half-merged
