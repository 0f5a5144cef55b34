"""Shard directory contract: manifest, crash-safe writer, normalisation, verification."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from jsae.data import shards
from jsae.data.shards import Manifest, ShardError, ShardWriter

D_IN = 8
RPS = 128  # rows per shard
N = 1000   # 7 full shards + one of 104 rows


def produce(a: int, b: int, d_in: int = D_IN) -> np.ndarray:
  """Rows a..b-1 of a deterministic producer; column 0 holds the row's global index."""
  x = np.stack([np.random.default_rng(i).standard_normal(d_in, dtype=np.float32)
                for i in range(a, b)]) if b > a else np.zeros((0, d_in), np.float32)
  x[:, 0] = np.arange(a, b)
  return x


PROV = dict(model="test/model", revision="r1", hook_site="resid_post", layer=3,
            tokenizer="tok", context_length=16, excluded_tokens=["<bos>"])


def write(directory, chunk: int = 50, n: int = N, dtype: str = "float32") -> Manifest:
  """An uninterrupted write of rows 0..n-1 in chunks of `chunk`."""
  with ShardWriter(directory, d_in=D_IN, rows_per_shard=RPS, dtype=dtype,
                   provenance=PROV) as w:
    for a in range(0, n, chunk):
      w.write(produce(a, min(a + chunk, n)))
  return w.manifest


def contents(directory) -> dict[str, bytes]:
  """Every file's bytes, by name."""
  return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


def test_write_read_back_and_manifest(tmp_path):
  m = write(tmp_path)
  assert m.complete and m.num_rows == N and len(m.shards) == 8
  assert [s.rows for s in m.shards] == [RPS] * 7 + [N - 7 * RPS]
  rows = np.concatenate([np.fromfile(tmp_path / s.file, np.float32).reshape(-1, D_IN)
                         for s in m.shards])
  np.testing.assert_array_equal(rows, produce(0, N))
  again = shards.load_manifest(tmp_path)
  assert again == m and again.to_json() == m.to_json()
  d = json.loads((tmp_path / "manifest.json").read_text())
  assert d["provenance"]["layer"] == 3 and d["normalization"]["rows"] == N
  assert d["format_version"] == shards.FORMAT_VERSION
  assert shards.verify(tmp_path, progress=False) == []
  other = write(tmp_path / "sub", n=N - 1)
  assert m.fingerprint() != other.fingerprint()
  assert m.fingerprint() == shards.load_manifest(tmp_path).fingerprint()
  text = shards.info(tmp_path)
  assert "test/model" in text and "all shard files present" in text


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_norm_constant_matches_numpy(tmp_path, dtype):
  m = write(tmp_path, chunk=64, dtype=dtype)
  stored = produce(0, N).astype(shards.DTYPES[dtype]).astype(np.float64)
  expected = np.sqrt(np.mean(np.sum(stored**2, axis=1)))
  assert m.norm_scale == pytest.approx(expected, rel=1e-12)
  assert json.loads((tmp_path / "manifest.json").read_text())["normalization"][
      "constant"] == pytest.approx(expected, rel=1e-12)
  if dtype == "bfloat16":
    mm = np.memmap(tmp_path / m.shards[0].file, dtype=ml_dtypes.bfloat16, mode="r",
                   shape=(RPS, D_IN))
    np.testing.assert_array_equal(mm, produce(0, RPS).astype(ml_dtypes.bfloat16))


def test_chunking_does_not_change_content(tmp_path):
  write(tmp_path / "a", chunk=1000)
  write(tmp_path / "b", chunk=7)
  assert contents(tmp_path / "a") == contents(tmp_path / "b")


_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {tests!r})
    from test_shards import PROV, RPS, D_IN, N, produce
    from jsae.data.shards import ShardWriter
    kill_at, external = int(sys.argv[1]), sys.argv[2] == "external"
    w = ShardWriter(sys.argv[3], d_in=D_IN, rows_per_shard=RPS, provenance=PROV)
    a = w.rows_committed
    while a < N:
      b = min(a + 50, N, kill_at) if not external else min(a + 50, N)
      w.write(produce(a, b))
      a = b
      if external:
        print(a, flush=True)
        time.sleep(0.02)
      elif a == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    w.finalize()
""")


@pytest.mark.parametrize("kill_at", [300, 2 * RPS, "external"])
def test_writer_killed_mid_shard_resumes_to_same_content(tmp_path, kill_at):
  write(tmp_path / "ref")
  d = tmp_path / "run"
  script = tmp_path / "child.py"
  script.write_text(_CHILD.format(tests=str(Path(__file__).parent)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if kill_at == "external":
    p = subprocess.Popen([sys.executable, str(script), "0", "external", str(d)],
                         stdout=subprocess.PIPE, text=True, env=env)
    for line in p.stdout:  # kill it while it writes, once past two shards
      if int(line) > 2 * RPS + 20:
        p.send_signal(signal.SIGKILL)
        break
    p.wait()
  else:
    p = subprocess.run([sys.executable, str(script), str(kill_at), "self", str(d)],
                       env=env, capture_output=True, text=True)
  assert p.returncode == -signal.SIGKILL, getattr(p, "stderr", "")

  crashed = shards.load_manifest(d)
  assert not crashed.complete and crashed.num_rows % RPS == 0 and crashed.num_rows < N
  if kill_at == 300:
    assert crashed.num_rows == 2 * RPS
    assert "shard-000002.bin.tmp" in os.listdir(d)  # the half-written shard
  with pytest.raises(ShardError, match="complete=false"):
    from jsae.data.loader import ShardLoader
    ShardLoader(d, batch_size=10, seed=0, process_index=0, process_count=1)
  assert any("writer file not listed" in p or "complete=false" in p
             for p in shards.verify(d, progress=False))

  # Resume with a different chunking: the same final bytes, manifest included.
  with ShardWriter(d, d_in=D_IN, rows_per_shard=RPS, provenance=PROV) as w:
    a = w.rows_committed
    assert a == crashed.num_rows
    assert not shards.stray_files(d, w.manifest)  # leftovers removed on resume
    while a < N:
      w.write(produce(a, min(a + 37, N)))
      a = min(a + 37, N)
  if kill_at == 300:
    assert any("shard-000002.bin.tmp" in n for n in w.notes)
  assert contents(d) == contents(tmp_path / "ref")


def test_crash_between_rename_and_manifest_update(tmp_path):
  """A shard renamed but not yet listed is removed on resume and written again."""
  d = tmp_path / "run"
  with ShardWriter(d, d_in=D_IN, rows_per_shard=RPS, provenance=PROV) as w:
    w.write(produce(0, 2 * RPS + 5))
    w.abort()  # stop resumably: 2 shards committed, the third dropped
  assert sorted(os.listdir(d)) == ["manifest.json", "shard-000000.bin", "shard-000001.bin"]
  (d / "shard-000002.bin").write_bytes(b"\x00" * 100)  # renamed, never listed
  (d / "manifest.json.tmp").write_bytes(b"{")          # half-written manifest
  w = ShardWriter(d, d_in=D_IN, rows_per_shard=RPS)
  assert w.rows_committed == 2 * RPS and len(w.notes) == 2
  assert sorted(os.listdir(d)) == ["manifest.json", "shard-000000.bin", "shard-000001.bin"]
  w.write(produce(2 * RPS, N))
  w.close()
  write(tmp_path / "ref")
  assert contents(d) == contents(tmp_path / "ref")


def test_resume_refuses_mismatch_and_complete(tmp_path):
  with ShardWriter(tmp_path, d_in=D_IN, rows_per_shard=RPS, provenance=PROV) as w:
    w.write(produce(0, RPS))
    w.abort()
  with pytest.raises(ShardError, match=r"expected d_in 9 \(requested\), found 8"):
    ShardWriter(tmp_path, d_in=9, rows_per_shard=RPS)
  with pytest.raises(ShardError, match="rows_per_shard"):
    ShardWriter(tmp_path, d_in=D_IN, rows_per_shard=RPS + 1)
  with pytest.raises(ShardError, match="provenance differs"):
    ShardWriter(tmp_path, d_in=D_IN, rows_per_shard=RPS, provenance=dict(PROV, layer=4))
  with pytest.raises(ShardError, match="resume=False"):
    ShardWriter(tmp_path, d_in=D_IN, rows_per_shard=RPS, resume=False)
  ShardWriter(tmp_path, d_in=D_IN, rows_per_shard=RPS).finalize()
  with pytest.raises(ShardError, match="found a complete one"):
    ShardWriter(tmp_path, d_in=D_IN, rows_per_shard=RPS)


def test_writer_rejects_bad_rows(tmp_path):
  w = ShardWriter(tmp_path, d_in=D_IN, rows_per_shard=RPS)
  with pytest.raises(ValueError, match=r"expected rows of shape \[n, 8\], found \(3, 7\)"):
    w.write(np.zeros((3, 7), np.float32))
  x = produce(0, 5)
  x[3, 2] = np.nan
  with pytest.raises(ValueError, match="row 3"):
    w.write(x)


def test_corruption_is_detected(tmp_path):
  m = write(tmp_path)
  assert shards.verify(tmp_path, progress=False) == []
  # Flipped byte.
  p2 = tmp_path / m.shards[2].file
  b = bytearray(p2.read_bytes())
  b[1234] ^= 0x01
  p2.write_bytes(bytes(b))
  # Truncated file.
  p4 = tmp_path / m.shards[4].file
  p4.write_bytes(p4.read_bytes()[:-3])
  # Deleted shard.
  (tmp_path / m.shards[6].file).unlink()
  problems = shards.verify(tmp_path, progress=False)
  assert len(problems) == 3, problems
  assert f"{p2}: corrupted shard: expected crc32 {m.shards[2].crc32}" in problems[0]
  nbytes = RPS * D_IN * 4
  assert f"{p4}: truncated or wrong-size shard: expected {nbytes} bytes" in problems[1]
  assert f"found {nbytes - 3}" in problems[1]
  assert "shard-000006.bin: missing shard file" in problems[2]
  text = shards.info(tmp_path)
  assert "2 problem(s)" in text and "missing shard file" in text


def test_empty_and_missing_directory(tmp_path):
  with pytest.raises(ShardError, match="expected a shard manifest, found an empty directory"):
    shards.load_manifest(tmp_path)
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(ShardError, match=r"found only \['notes.txt'\]"):
    shards.load_manifest(tmp_path)
  with pytest.raises(ShardError, match="expected a shard directory, found nothing"):
    shards.load_manifest(tmp_path / "nope")
  assert "expected a shard manifest" in shards.verify(tmp_path, progress=False)[0]
  assert "INVALID" in shards.info(tmp_path)


def test_manifest_validation_errors(tmp_path):
  m = write(tmp_path)
  good = json.loads(m.to_json())
  bad_cases = [
      (dict(good, dtype="float16"), "expected dtype one of"),
      (dict(good, format_version=99), "expected format_version 1, found 99"),
      (dict(good, format="other"), "not a jsae shard manifest"),
      ({k: v for k, v in good.items() if k != "d_in"}, "expected field 'd_in'"),
      (dict(good, d_in="8"), "expected 'd_in' to be an integer"),
      (dict(good, num_rows=5), "expected num_rows"),
      (dict(good, shards=[dict(good["shards"][0], rows=5)] + good["shards"][1:]),
       "expected rows_per_shard = 128 rows"),
      (dict(good, shards=[dict(good["shards"][0], file="../x")] + good["shards"][1:]),
       "plain file name"),
      (dict(good, shards=[dict(good["shards"][0], crc32="xyz")] + good["shards"][1:]),
       "8 lowercase hex"),
      (dict(good, provenance=dict(good["provenance"], modle="x")), "unknown provenance"),
      (dict(good, normalization=dict(good["normalization"], constant=1.0)),
       "expected normalization.constant"),
  ]
  for d, msg in bad_cases:
    with pytest.raises(ShardError, match=msg):
      Manifest.from_json(json.dumps(d), source="x/manifest.json")
  with pytest.raises(ShardError, match="x/manifest.json: expected JSON"):
    Manifest.from_json("{", source="x/manifest.json")


def test_writer_refuses_unknown_shards_without_manifest(tmp_path):
  (tmp_path / "shard-000000.bin").write_bytes(b"")
  with pytest.raises(ShardError, match="found no manifest"):
    ShardWriter(tmp_path, d_in=D_IN, rows_per_shard=RPS)


def test_file_crc32_matches_zlib(tmp_path):
  import zlib
  data = os.urandom(100_000)
  (tmp_path / "f").write_bytes(data)
  assert shards.file_crc32(tmp_path / "f") == f"{zlib.crc32(data):08x}"
  shutil.rmtree(tmp_path / "f", ignore_errors=True)
