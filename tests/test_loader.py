"""ShardLoader: batch = f(seed, step), exact epochs, resume, host split, bad input."""

import json

import ml_dtypes
import numpy as np
import pytest

from jsae.data import loader as loader_lib
from jsae.data import shards
from jsae.data.loader import ShardLoader, permute, round_keys, row_indices
from jsae.data.shards import ShardError, ShardWriter
from jsae.data.source import ActivationSource

D_IN = 4
RPS = 128
N = 1000  # 8 shards, the last of 104 rows


def _rows(n: int) -> np.ndarray:
  """Rows whose column 0 is their global index."""
  x = np.random.default_rng(0).standard_normal((n, D_IN), dtype=np.float32)
  x[:, 0] = np.arange(n)
  return x


def _write(directory, n=N, dtype="float32"):
  with ShardWriter(directory, d_in=D_IN, rows_per_shard=RPS, dtype=dtype) as w:
    w.write(_rows(n))
  return w.manifest


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("shards")
  _write(d)
  return d


def _loader(d, **kw):
  kw = dict(dict(batch_size=100, seed=0, process_index=0, process_count=1), **kw)
  return ShardLoader(d, **kw)


def _ids(batch) -> np.ndarray:
  return batch[:, 0].astype(np.int64)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097, 65536])
def test_permute_is_a_bijection(n):
  p = permute(np.arange(n), n, round_keys(3, 1))
  assert np.array_equal(np.sort(p), np.arange(n))
  if n >= 17:
    assert not np.array_equal(p, np.arange(n))
  if n >= 1000:
    # No visible order left: correlation of position and row is ~0 (sd 1/sqrt(n)).
    assert abs(np.corrcoef(np.arange(n), p)[0, 1]) < 0.15


def test_source_contract(data_dir):
  with _loader(data_dir) as ld:
    assert isinstance(ld, ActivationSource)
    assert (ld.d_in, ld.batch_size, ld.num_rows) == (D_IN, 100, N)
    b = ld.batch(0)
    assert b.shape == (100, D_IN) and b.dtype == np.float32
    x = _rows(N).astype(np.float64)
    assert ld.norm_scale == pytest.approx(np.sqrt(np.mean(np.sum(x**2, 1))), rel=1e-12)
    np.testing.assert_array_equal(b, _rows(N)[_ids(b)])  # rows served unchanged


@pytest.mark.parametrize("batch_size", [100, 64])
def test_every_row_once_per_epoch(data_dir, batch_size):
  with _loader(data_dir, batch_size=batch_size) as ld:
    steps = -(-3 * N // batch_size)
    stream = np.concatenate([_ids(ld.batch(t)) for t in range(steps)])
  epochs = [stream[e * N:(e + 1) * N] for e in range(3)]
  for e in epochs:
    assert np.array_equal(np.sort(e), np.arange(N))
  assert not np.array_equal(epochs[0], epochs[1])  # each epoch its own order
  assert not np.array_equal(epochs[1], epochs[2])


def test_batches_mix_shards(data_dir):
  with _loader(data_dir, batch_size=50) as ld:
    for t in range(40):
      shard_of = _ids(ld.batch(t)) // RPS
      assert len(np.unique(shard_of)) >= 4, t


def test_seeds(data_dir):
  a, a2, b = _loader(data_dir, seed=0), _loader(data_dir, seed=0), _loader(data_dir, seed=1)
  for t in range(12):
    assert np.array_equal(a.batch(t), a2.batch(t))
  assert not np.array_equal(_ids(a.batch(3)), _ids(b.batch(3)))
  assert not np.array_equal(np.sort(_ids(a.batch(4))), np.sort(_ids(b.batch(4))))
  for ld in (a, a2, b):
    ld.close()


def test_resume_equals_uninterrupted(data_dir):
  with _loader(data_dir, prefetch=3) as ld:
    ref = [ld.batch(t) for t in range(25)]
  # Restart at step 7: prefetch from the constructor, or from the first call.
  with _loader(data_dir, prefetch=3, start_step=7) as ld:
    for t in range(7, 25):
      assert np.array_equal(ld.batch(t), ref[t]), t
  with _loader(data_dir, prefetch=2) as ld:
    for t in range(7, 25):
      assert np.array_equal(ld.batch(t), ref[t]), t
  # Out of order and repeated steps are still correct; no prefetch is the same too.
  with _loader(data_dir, prefetch=2) as ld, _loader(data_dir, prefetch=0) as direct:
    for t in [3, 9, 9, 2, 3, 4, 20, 0]:
      assert np.array_equal(ld.batch(t), ref[t]), t
      assert np.array_equal(direct.batch(t), ref[t]), t


def test_two_hosts_split_the_global_batch(data_dir):
  single = _loader(data_dir, batch_size=100)
  hosts = [_loader(data_dir, batch_size=100, process_index=i, process_count=2)
           for i in range(2)]
  for t in range(15):
    h0, h1 = hosts[0].batch(t), hosts[1].batch(t)
    assert h0.shape == h1.shape == (50, D_IN)
    assert not set(_ids(h0)) & set(_ids(h1))
    assert np.array_equal(np.concatenate([h0, h1]), single.batch(t))
    assert np.array_equal(_ids(h1), row_indices(t, num_rows=N, batch_size=100, seed=0,
                                                 process_index=1, process_count=2))
  for ld in hosts + [single]:
    ld.close()


def test_bfloat16_rows(tmp_path):
  _write(tmp_path, n=300, dtype="bfloat16")
  with _loader(tmp_path, batch_size=30, expected_dtype=ml_dtypes.bfloat16) as ld:
    ref = _rows(300).astype(ml_dtypes.bfloat16)
    idx = row_indices(2, num_rows=300, batch_size=30, seed=0)
    b = ld.batch(2)
    assert b.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(b, ref[idx])


def test_config_mismatch(data_dir):
  with pytest.raises(ShardError, match=r"manifest.json: expected d_in 16 \(config.sae.d_in\),"
                     r" found 4"):
    _loader(data_dir, expected_d_in=16)
  with pytest.raises(ShardError, match="expected dtype bfloat16 .*found float32"):
    _loader(data_dir, expected_dtype="bfloat16")
  with pytest.raises(ValueError, match="multiple of the 3 processes"):
    _loader(data_dir, batch_size=100, process_index=0, process_count=3)
  _loader(data_dir, expected_d_in=D_IN, expected_dtype="float32").close()


def test_bad_directories(tmp_path):
  with pytest.raises(ShardError, match="expected a shard manifest, found an empty directory"):
    _loader(tmp_path)
  with pytest.raises(ShardError, match="expected a shard directory, found nothing"):
    _loader(tmp_path / "missing")


def test_missing_and_truncated_shards_fail_at_construction(tmp_path):
  m = _write(tmp_path)
  p = tmp_path / m.shards[3].file
  data = p.read_bytes()
  p.write_bytes(data[:-8])
  with pytest.raises(ShardError, match=f"{p}: truncated or wrong-size shard: expected"
                     f" {RPS * D_IN * 4} bytes .* found {RPS * D_IN * 4 - 8}"):
    _loader(tmp_path)
  p.unlink()
  with pytest.raises(ShardError, match=f"{p}: missing shard file"):
    _loader(tmp_path)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_corrupted_shard_detected_at_first_open(tmp_path, prefetch):
  m = _write(tmp_path)
  p = tmp_path / m.shards[5].file
  b = bytearray(p.read_bytes())
  b[77] ^= 0x10
  p.write_bytes(bytes(b))
  with pytest.raises(ShardError, match=f"{p}: corrupted shard: expected crc32"
                     f" {m.shards[5].crc32}"):
    _loader(tmp_path, verify="all")
  ld = _loader(tmp_path, prefetch=prefetch, start_step=0 if prefetch else None)
  with pytest.raises(ShardError, match="corrupted shard"):
    ld.batch(0)  # the first batch touches every shard (global shuffle)
  with pytest.raises(ShardError, match="corrupted shard"):
    ld.batch(1)  # and the error is not swallowed on retry
  ld.close()
  with _loader(tmp_path, verify="none") as ld:  # sizes only: reads the (bad) data
    assert ld.batch(0).shape == (100, D_IN)


def test_incomplete_dataset(tmp_path):
  w = ShardWriter(tmp_path, d_in=D_IN, rows_per_shard=RPS)
  w.write(_rows(300))  # 2 shards committed, a temp file for the third
  with pytest.raises(ShardError, match=r"complete=false \(256 rows committed; leftover"
                     r" writer files: \['shard-000002.bin.tmp'\]\)"):
    _loader(tmp_path)
  with _loader(tmp_path, allow_incomplete=True, batch_size=64) as ld:
    ids = np.concatenate([_ids(ld.batch(t)) for t in range(4)])
    assert np.array_equal(np.sort(ids), np.arange(256))
  w.abort()


def test_manifest_names_are_the_only_names_used(tmp_path):
  """The loader takes file names from the manifest (here not the writer's pattern)."""
  m = _write(tmp_path, n=200)
  d = json.loads((tmp_path / "manifest.json").read_text())
  for i, s in enumerate(d["shards"]):
    (tmp_path / s["file"]).rename(tmp_path / f"part{i}.f32")
    s["file"] = f"part{i}.f32"
  (tmp_path / "manifest.json").write_text(json.dumps(d))
  with _loader(tmp_path, batch_size=200) as ld:
    assert np.array_equal(np.sort(_ids(ld.batch(0))), np.arange(200))
  assert shards.verify(tmp_path, progress=False) == []
  assert m.num_rows == 200


def test_prefetch_thread_stops_on_close(data_dir):
  ld = _loader(data_dir, prefetch=4, start_step=0)
  ld.batch(0)
  thread = ld._prefetcher._thread
  assert thread.is_alive()
  ld.close()
  assert not thread.is_alive()
  with pytest.raises(RuntimeError, match="after close"):
    ld.batch(1)


def test_module_has_no_jax_import_at_load():
  # The loader is usable by non-JAX tools (e.g. `jsae shards`); jax only for defaults.
  assert "jax" not in loader_lib.__dict__
