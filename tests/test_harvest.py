"""Harvesting LM activations into shards: rows equal direct captures, resume is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsae import harvest as harvest_lib
from jsae.data import shards as shards_lib
from jsae.data.text import TokenContexts
from jsae.lm import gemma

SITES = ["resid_post.1", "attn_z.0"]


@pytest.fixture(scope="module")
def tiny_lm():
  config = gemma.get_config("tiny_gemma2")
  return gemma.init_params(jax.random.key(0), config), config


def _contexts(config, n=7, seq=16):
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, config.vocab_size, (n, seq)).astype(np.int32)
  tokens[:, 0] = 2
  mask = np.ones_like(tokens, bool)
  mask[:, 0] = False  # BOS
  tokens[-1, 9:] = 0
  mask[-1, 9:] = False  # padding
  return TokenContexts(tokens, mask)


def _read_all(directory):
  m = shards_lib.load_manifest(directory)
  rows = [np.fromfile(directory / s.file, np.float32).reshape(-1, m.d_in) for s in m.shards]
  return m, np.concatenate(rows)


def test_rows_equal_direct_capture_without_special_tokens(tiny_lm, tmp_path):
  params, config = tiny_lm
  ctx = _contexts(config)
  result = harvest_lib.harvest(params, config, ctx, sites=SITES, out_dir=tmp_path, batch_size=3,
                               rows_per_shard=20, provenance=dict(tokenizer="test"),
                               progress=False)
  _, acts = gemma.forward(params, jnp.asarray(ctx.tokens), config, capture=tuple(SITES))
  for site in SITES:
    m, rows = _read_all(result.directories[site])
    expected = np.asarray(acts[site])[ctx.mask]
    assert rows.shape == expected.shape == (ctx.n_tokens, expected.shape[-1])
    np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-5)
    assert m.complete and m.provenance.hook_site == site.split(".")[0]
    assert m.provenance.layer == int(site.split(".")[1]) and m.provenance.tokenizer == "test"
    assert m.norm_scale == pytest.approx(np.sqrt(np.mean(np.sum(expected.astype(np.float64) ** 2, 1))),
                                         rel=1e-5)
  again = harvest_lib.harvest(params, config, ctx, sites=SITES, out_dir=tmp_path, progress=False)
  assert sorted(again.reused) == sorted(SITES)


def test_interrupted_harvest_resumes_to_identical_shards(tiny_lm, tmp_path, monkeypatch):
  params, config = tiny_lm
  ctx = _contexts(config)
  harvest_lib.harvest(params, config, ctx, sites=SITES, out_dir=tmp_path / "straight",
                      batch_size=2, rows_per_shard=17, progress=False)
  calls = {"n": 0}
  original = shards_lib.ShardWriter.write

  def flaky_write(self, rows):
    calls["n"] += 1
    if calls["n"] == 9:  # mid-way, after some shards of some sites are committed
      raise KeyboardInterrupt("simulated crash")
    return original(self, rows)

  monkeypatch.setattr(shards_lib.ShardWriter, "write", flaky_write)
  with pytest.raises(KeyboardInterrupt):
    harvest_lib.harvest(params, config, ctx, sites=SITES, out_dir=tmp_path / "resumed",
                        batch_size=2, rows_per_shard=17, progress=False)
  monkeypatch.setattr(shards_lib.ShardWriter, "write", original)
  partial = shards_lib.load_manifest(tmp_path / "resumed" / SITES[0])
  assert not partial.complete
  harvest_lib.harvest(params, config, ctx, sites=SITES, out_dir=tmp_path / "resumed",
                      batch_size=2, rows_per_shard=17, progress=False)
  for site in SITES:
    m1, rows1 = _read_all(tmp_path / "straight" / site)
    m2, rows2 = _read_all(tmp_path / "resumed" / site)
    np.testing.assert_array_equal(rows1, rows2)
    assert m1.fingerprint() == m2.fingerprint()


def test_bad_sites_and_empty_corpus(tiny_lm, tmp_path):
  params, config = tiny_lm
  ctx = _contexts(config)
  with pytest.raises(ValueError, match="resid_post"):
    harvest_lib.harvest(params, config, ctx, sites=["resid_post.99"], out_dir=tmp_path)
  with pytest.raises(ValueError, match="unknown hook site"):
    harvest_lib.harvest(params, config, ctx, sites=["mlp.1"], out_dir=tmp_path)
  empty = TokenContexts(ctx.tokens, np.zeros_like(ctx.mask))
  with pytest.raises(ValueError, match="no tokens to harvest"):
    harvest_lib.harvest(params, config, empty, sites=SITES, out_dir=tmp_path)


def _files(directory):
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("count", [2, 3])
def test_parts_of_n_processes_merge_into_the_single_process_dataset(tiny_lm, tmp_path, count):
  """Each 'process' writes its shard-aligned row range (one batch boundary cuts a context);
  the merge is byte for byte the single-process dataset: files, manifest, fingerprint."""
  params, config = tiny_lm
  ctx = _contexts(config)
  kw = dict(sites=SITES, batch_size=2, rows_per_shard=17, progress=False)
  harvest_lib.harvest(params, config, ctx, out_dir=tmp_path / "one", **kw)
  for k in range(count):
    harvest_lib.harvest(params, config, ctx, out_dir=tmp_path / "many", process_index=k,
                        process_count=count, **kw)
  assert not (tmp_path / "many" / SITES[0] / "manifest.json").exists()  # parts only, so far
  harvest_lib.finish_parts(tmp_path / "many", SITES, count)
  for site in SITES:
    assert _files(tmp_path / "one" / site) == _files(tmp_path / "many" / site)
    assert sorted(p.name for p in (tmp_path / "many" / site).iterdir() if p.is_dir()) == []
  again = harvest_lib.harvest(params, config, ctx, out_dir=tmp_path / "many", **kw)
  assert sorted(again.reused) == sorted(SITES)


def test_parts_resume_after_a_crash_and_refuse_another_process_count(tiny_lm, tmp_path,
                                                                     monkeypatch):
  params, config = tiny_lm
  ctx = _contexts(config)
  kw = dict(sites=SITES[:1], batch_size=2, rows_per_shard=17, progress=False)
  harvest_lib.harvest(params, config, ctx, out_dir=tmp_path / "one", **kw)
  original = shards_lib.ShardWriter.write
  calls = {"n": 0}

  def flaky_write(self, rows):
    calls["n"] += 1
    if calls["n"] == 3:
      raise KeyboardInterrupt("simulated crash")
    return original(self, rows)

  harvest_lib.harvest(params, config, ctx, out_dir=tmp_path / "many", process_index=0,
                      process_count=2, **kw)
  monkeypatch.setattr(shards_lib.ShardWriter, "write", flaky_write)
  with pytest.raises(KeyboardInterrupt):
    harvest_lib.harvest(params, config, ctx, out_dir=tmp_path / "many", process_index=1,
                        process_count=2, **kw)
  monkeypatch.setattr(shards_lib.ShardWriter, "write", original)
  with pytest.raises(shards_lib.ShardError, match="2-process harvest.*3 process"):
    harvest_lib.harvest(params, config, ctx, out_dir=tmp_path / "many", process_index=0,
                        process_count=3, **kw)
  with pytest.raises(shards_lib.ShardError, match="2-process harvest"):
    harvest_lib.harvest(params, config, ctx, out_dir=tmp_path / "many", **kw)
  with pytest.raises(shards_lib.ShardError, match="complete part"):
    harvest_lib.finish_parts(tmp_path / "many", SITES[:1], 2)  # part 1 is unfinished
  harvest_lib.harvest(params, config, ctx, out_dir=tmp_path / "many", process_index=1,
                      process_count=2, **kw)
  harvest_lib.finish_parts(tmp_path / "many", SITES[:1], 2)
  assert _files(tmp_path / "one" / SITES[0]) == _files(tmp_path / "many" / SITES[0])


def test_an_interrupted_merge_finishes_on_rerun(tiny_lm, tmp_path, monkeypatch):
  from jsae.data import parts
  params, config = tiny_lm
  ctx = _contexts(config)
  kw = dict(sites=SITES[:1], batch_size=2, rows_per_shard=17, progress=False)
  harvest_lib.harvest(params, config, ctx, out_dir=tmp_path / "one", **kw)
  for k in range(2):
    harvest_lib.harvest(params, config, ctx, out_dir=tmp_path / "many", process_index=k,
                        process_count=2, **kw)
  moves = {"n": 0}
  real_replace = parts.os.replace

  def crashing_replace(a, b):
    moves["n"] += 1
    if moves["n"] == 3:
      raise KeyboardInterrupt("crash mid-merge")
    return real_replace(a, b)

  monkeypatch.setattr(parts.os, "replace", crashing_replace)
  with pytest.raises(KeyboardInterrupt):
    harvest_lib.finish_parts(tmp_path / "many", SITES[:1], 2)
  monkeypatch.setattr(parts.os, "replace", real_replace)
  assert not harvest_lib.is_complete(tmp_path / "many" / SITES[0])
  harvest_lib.finish_parts(tmp_path / "many", SITES[:1], 2)
  assert _files(tmp_path / "one" / SITES[0]) == _files(tmp_path / "many" / SITES[0])


def test_row_ranges_are_shard_aligned_and_complete():
  from jsae.data import parts
  for total, rps, n in [(100, 17, 2), (100, 17, 3), (10, 17, 4), (0, 5, 2), (85, 17, 5)]:
    ranges = parts.row_ranges(total, rps, n)
    assert ranges[0][0] == 0 and ranges[-1][1] == total and len(ranges) == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(lo % rps == 0 or lo == total for lo, _ in ranges)
