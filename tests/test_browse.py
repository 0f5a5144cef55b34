"""The browse pass against brute force: top-N per latent (ties, silent latents), the
uniform sample, histograms, logit effects, latent sharding, and the site in Chromium."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsae
from jsae import saes
from jsae.browse import accumulate, logits, sparse, stream
from jsae.data.text import TokenContexts
from jsae.lm import gemma

SITE = "resid_post.1"
D_SAE = 48


@pytest.fixture(scope="module")
def tiny_lm():
  config = gemma.get_config("tiny_gemma2")
  return gemma.init_params(jax.random.key(0), config), config


def _sae(d_in, d_sae=D_SAE, seed=0):
  family = saes.get("jumprelu")
  params = family.init(jax.random.key(seed), d_in=d_in, d_sae=d_sae, init_threshold=0.05)
  # A few latents never fire (threshold far above any pre-activation).
  params = params.replace(threshold=params.threshold.at[:3].set(1e6))
  return jsae.SAE.from_training(params, norm_scale=1.0)


def _contexts(vocab, n=9, seq=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (n, seq)).astype(np.int32)
  tokens[:, 0] = 2
  mask = np.ones_like(tokens, bool)
  mask[:, 0] = False
  tokens[-1, 10:] = 0
  mask[-1, 10:] = False
  return TokenContexts(tokens, mask)


def _all_acts(sae, params, config, ctx):
  """`[n * seq, d_sae]` activations, 0 at masked positions: the brute-force reference."""
  _, cap = gemma.forward(params, jnp.asarray(ctx.tokens), config, capture=(SITE,))
  f = np.asarray(sae.encode(cap[SITE].reshape(-1, config.d_model)))
  return np.where(ctx.mask.reshape(-1)[:, None], f, 0.0)


SETTINGS = stream.BrowseSettings(n_top=5, n_samples=7, window_left=3, window_right=2,
                                 batch_size=2, seed=11)


# Both folds of a batch into the accumulators: the sparse path is made to keep room for
# every latent (on this tiny SAE most latents fire on most tokens, past its default limit).
FOLDS = {"dense": dict(sparse_fold=False),
         "sparse": dict(sparse_fold=True, max_entries_fraction=1.0)}


@pytest.fixture(scope="module", params=sorted(FOLDS))
def fold(request):
  """The fold under test: `stream`'s keyword arguments choosing it."""
  return FOLDS[request.param]


@pytest.fixture(scope="module")
def streamed(tiny_lm, fold):
  params, config = tiny_lm
  sae, ctx = _sae(config.d_model), _contexts(config.vocab_size)
  edges = accumulate.hist_edges(1e-3, 1e3, 10)
  stats = stream.stream(sae, params, config, SITE, ctx, SETTINGS, edges=edges, progress=False,
                        **fold)
  return sae, ctx, edges, jax.tree.map(np.asarray, stats), _all_acts(sae, params, config, ctx)


def _window(acts, g, latent, seq):
  c, p = divmod(g, seq)
  out = np.zeros(SETTINGS.window)
  for j, o in enumerate(range(-SETTINGS.window_left, SETTINGS.window_right + 1)):
    if 0 <= p + o < seq:
      out[j] = acts[c * seq + p + o, latent]
  return out


def test_top_examples_equal_brute_force_including_silent_latents(streamed):
  sae, ctx, _, s, acts = streamed
  seq = ctx.seq_len
  assert (s.fire_count[:3] == 0).all() and (s.top_tokens[:3] == -1).all()
  checked = 0
  for l in range(D_SAE):
    col = acts[:, l]
    order = sorted(np.flatnonzero(col > 0), key=lambda g: (-col[g], g))[:SETTINGS.n_top]
    got = [t for t in s.top_tokens[l] if t >= 0]
    assert got == [int(g) for g in order], l
    np.testing.assert_allclose(s.top_values[l][:len(got)], col[order], rtol=1e-5)
    for j, g in enumerate(order):
      np.testing.assert_allclose(s.top_windows[l, j], _window(acts, g, l, seq), rtol=1e-5,
                                 atol=1e-6)
    checked += len(got)
  assert checked > 3 * D_SAE  # most latents fire on this text


def _fold(path, stats, *args, **kw):
  if path == "dense":
    return accumulate.update(stats, *args, **kw)
  stats, slots, room = sparse.fold(stats, sparse.init_slots(stats), *args,
                                   room=sparse.Room(), max_entries_fraction=1.0, **kw)
  assert room  # folded sparsely, not handed back
  return sparse.finalize(stats, slots)


@pytest.mark.parametrize("path", sorted(FOLDS))
def test_ties_go_to_the_earlier_token(path):
  acts = np.zeros((2 * 8, 2), np.float32)
  acts[[3, 5, 9, 12], 0] = 2.0  # four tied tokens across two batches
  acts[7, 0] = 1.0
  stats = accumulate.init(2, n_top=3, n_samples=2, window=1, n_bins=4)
  edges = jnp.asarray(accumulate.hist_edges(0.1, 10, 2), jnp.float32)
  for b in range(2):
    stats = _fold(path, stats, jnp.asarray(acts[b * 8:(b + 1) * 8]), jnp.ones(8, bool),
                  jnp.int32(b * 8), edges, seq_len=8, left=0, right=0, seed=0)
  assert list(np.asarray(stats.top_tokens[0])) == [3, 5, 9]
  assert list(np.asarray(stats.top_tokens[1])) == [-1, -1, -1]


@pytest.mark.parametrize("latents,chunk", [(None, None), ([7, 0, 33, 12, 5], None), (None, 16)])
def test_sparse_fold_equals_the_dense_update_batch_by_batch(latents, chunk, monkeypatch):
  """Random sparse activations with planted ties, four batches of two contexts: after
  every batch the sparse fold's accumulators equal the dense update's, also when the
  candidates are folded in many chunks (16 each), out of token order."""
  if chunk:
    monkeypatch.setattr(sparse, "_CHUNK", chunk)
    monkeypatch.setattr(sparse, "_MIN_CAPACITY", chunk)
  rng = np.random.default_rng(3)
  n_batches, seq, d = 4, 16, 40
  acts = np.where(rng.random((n_batches * 2 * seq, d)) < 0.15,
                  rng.choice([0.5, 1.0, 2.0, 3.0], (n_batches * 2 * seq, d)), 0.0)
  acts[5::2 * seq] = rng.choice([0.5, 1.0, 2.0], (n_batches, d))  # one busy token a batch
  acts = (acts * rng.choice([1.0, 1.0001], acts.shape)).astype(np.float32)  # ties and near-ties
  valid = np.ones(len(acts), bool)
  valid[::seq] = False  # BOS
  edges = jnp.asarray(accumulate.hist_edges(0.1, 10, 4), jnp.float32)
  n_rows = d if latents is None else len(latents)
  chosen = None if latents is None else jnp.asarray(latents, jnp.int32)
  dense = folded = accumulate.init(n_rows, n_top=6, n_samples=5, window=4, n_bins=len(edges) - 1)
  slots, room = sparse.init_slots(folded), sparse.Room(tiers=((0, 2), (4, 4)))  # too small
  for b in range(n_batches):
    rows = slice(b * 2 * seq, (b + 1) * 2 * seq)
    args = (jnp.asarray(acts[rows]), jnp.asarray(valid[rows]), jnp.int32(b * 2 * seq), edges,
            chosen)
    kw = dict(seq_len=seq, left=2, right=1, seed=5)
    dense = accumulate.update(dense, *args, **kw)
    folded, slots, room = sparse.fold(folded, slots, *args, room=room, max_entries_fraction=1.0,
                                      **kw)
    if latents is None:  # planned again, with a tier for the busy token
      assert len(room.tiers) >= 2, room.tiers
    in_rank_order = sparse.finalize(folded, slots)
    for name in dense.__dataclass_fields__:
      a, c = np.asarray(getattr(dense, name)), np.asarray(getattr(in_rank_order, name))
      if name == "sum_value":  # summed in another order
        np.testing.assert_allclose(c, a, rtol=1e-6, err_msg=name)
      else:
        np.testing.assert_array_equal(c, a, err_msg=f"{name} after batch {b}")


def test_the_sparse_fold_is_the_default_only_where_it_was_measured_faster():
  assert jax.default_backend() == "cpu"
  assert stream.uses_sparse_fold(stream.SPARSE_MIN_LATENTS)
  assert not stream.uses_sparse_fold(stream.SPARSE_MIN_LATENTS - 1)  # the demo's 4096
  assert not stream.uses_sparse_fold(2 * stream.SPARSE_MIN_LATENTS, stats_sharding=object())


def test_tiers_planned_from_counts_by_hand():
  counts = np.array([1] * 90 + [20] * 9 + [500])
  # Tier 0 holds 90% of the tokens (q90 = 2.9, at least 16 wide); 10 tokens fire more
  # than 16: room for twice as many, 8x wider; 1 fires more than 128: every row.
  assert sparse.plan_tiers(counts, 1000) == ((0, 16), (32, 128), (8, 1000))
  assert sparse.plan_tiers(np.full(10, 3), 1000) == ((0, 16),)
  assert sparse.plan_tiers(np.array([1] * 19 + [30]), 40) == ((0, 16), (8, 40))
  assert sparse.plan_tiers(np.array([20] * 9 + [39]), 40) == ((0, 40),)  # fewer entries


def test_sparse_fold_hands_a_too_dense_batch_back():
  acts = jnp.ones((8, 16), jnp.float32)  # every latent fires on every token
  stats = accumulate.init(16, n_top=2, n_samples=2, window=1, n_bins=4)
  edges = jnp.asarray(accumulate.hist_edges(0.1, 10, 2), jnp.float32)
  slots = sparse.init_slots(stats)
  same, same_slots, room = sparse.fold(stats, slots, acts, jnp.ones(8, bool), jnp.int32(0),
                                       edges, seq_len=8, left=0, right=0, seed=0,
                                       room=sparse.Room())
  assert room is None and same is stats and same_slots is slots


def test_uniform_sample_is_the_bottom_k_priorities(streamed):
  sae, ctx, _, s, acts = streamed
  for l in range(D_SAE):
    active = np.flatnonzero(acts[:, l] > 0)
    prio = accumulate.priority(SETTINGS.seed, active, np.full_like(active, l))
    expected = active[np.argsort(prio, kind="stable")][:SETTINGS.n_samples]
    got = s.sample_tokens[l][s.sample_tokens[l] >= 0]
    assert sorted(got) == sorted(expected), l
    np.testing.assert_allclose(np.sort(s.sample_values[l][s.sample_tokens[l] >= 0]),
                               np.sort(acts[expected, l]), rtol=1e-4, atol=1e-5)


def test_histograms_and_counts_equal_numpy(streamed):
  sae, ctx, edges, s, acts = streamed
  for l in range(D_SAE):
    col = acts[:, l]
    np.testing.assert_array_equal(s.hist_counts[l], np.histogram(col[col > 0], bins=edges)[0])
    assert s.fire_count[l] == (col > 0).sum()
    np.testing.assert_allclose(s.max_value[l], col.max(), rtol=1e-6)
  assert s.tokens_seen == ctx.n_tokens


def test_logit_effects_equal_a_direct_matmul(tiny_lm):
  params, config = tiny_lm
  sae = _sae(config.d_model)
  eff = logits.logit_effects(sae.params.W_dec, params, config, SITE, k=4, chunk=20)
  full = (np.asarray(sae.params.W_dec) * (1 + np.asarray(params["final_norm"]))) @ np.asarray(
      params["embed"]).T
  np.testing.assert_array_equal(eff.top_tokens, np.argsort(-full, axis=1, kind="stable")[:, :4])
  np.testing.assert_allclose(eff.top_values, -np.sort(-full, axis=1)[:, :4], rtol=1e-5)
  np.testing.assert_allclose(eff.bottom_values, np.sort(full, axis=1)[:, :4], rtol=1e-5)
  assert (eff.hist_heights.sum(1) == config.vocab_size).all()


def test_latent_sharded_pass_equals_one_device(tiny_lm, streamed):
  params, config = tiny_lm
  sae, ctx, edges, single, _ = streamed
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(1, 2), ("data", "model"))
  sharded_sae = sae.shard(mesh)
  specs = jax.tree.map(lambda a: jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("model") if a.ndim else jax.sharding.PartitionSpec()),
      accumulate.init(D_SAE, n_top=1, n_samples=1, window=1, n_bins=1))
  stats = stream.stream(sharded_sae, params, config, SITE, ctx, SETTINGS, edges=edges,
                        stats_sharding=specs, progress=False)
  assert stats.top_values.sharding.spec == jax.sharding.PartitionSpec("model")
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(stats)):
    np.testing.assert_allclose(a, np.asarray(b), rtol=1e-5, atol=1e-6)


def test_shares_of_processes_merged_in_order_equal_one_pass(tiny_lm, streamed, fold, count=3):
  """What `jsae browse` on `count` processes does: each streams its contiguous share of
  the contexts (on the 2x4 LM mesh here), and the shares merge in process order."""
  from jsae.lm import mesh as lm_mesh  # pylint: disable=import-outside-toplevel
  params, config = tiny_lm
  sae, ctx, edges, single, _ = streamed
  wide = dataclasses.replace(config, n_heads=8, n_kv_heads=4)  # so 4 model devices divide it
  params = gemma.init_params(jax.random.key(0), wide)
  single = stream.stream(sae, params, wide, SITE, ctx, SETTINGS, edges=edges, progress=False,
                         **fold)
  placed = lm_mesh.place(params, lm_mesh.make_mesh(2, 4))
  shares = [stream.stream(sae, placed, wide, SITE, ctx, SETTINGS, edges=edges, progress=False,
                          context_range=stream.process_range(ctx.n_contexts, p, count), **fold)
            for p in range(count)]
  for n, processes in ((9, count), (2, 3)):  # contiguous, in order, covering every context
    ranges = [stream.process_range(n, p, processes) for p in range(processes)]
    assert [c for lo, hi in ranges for c in range(lo, hi)] == list(range(n))
  assert stream.process_range(2, 0, 3) == (0, 0)  # more processes than contexts: empty shares
  merged = shares[0]
  for share in shares[1:]:
    merged = accumulate.merge(merged, share)
  for name, a in vars(jax.device_get(single)).items():
    b = np.asarray(getattr(merged, name))
    if name == "sum_value":  # summed in another order
      np.testing.assert_allclose(b, a, rtol=1e-6)
    elif name.endswith(("values", "windows", "value")):  # the LM split 4 ways: float32 noise
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=name)
    else:
      np.testing.assert_array_equal(b, a, err_msg=name)
  assert int(merged.tokens_seen) == ctx.n_tokens


def test_stream_and_logit_effects_of_chosen_latents_equal_their_rows_of_the_full_pass(
    tiny_lm, streamed, fold):
  params, config = tiny_lm
  sae, ctx, edges, full, _ = streamed
  ids = [40, 1, 17, 5]  # any order; 1 never fires
  stats = stream.stream(sae, params, config, SITE, ctx, SETTINGS, edges=edges, progress=False,
                        latents=ids, **fold)
  assert stats.fire_count.shape == (len(ids),)
  for name, a, b in zip(full.__dataclass_fields__, jax.tree.leaves(full),
                        jax.tree.leaves(stats)):
    np.testing.assert_array_equal(np.asarray(b), a if a.ndim == 0 else a[ids], err_msg=name)
  whole = logits.logit_effects(sae.params.W_dec, params, config, SITE, k=4, chunk=20)
  some = logits.logit_effects(sae.params.W_dec[np.array(ids)], params, config, SITE, k=4,
                              chunk=20)
  for a, b in zip(dataclasses.astuple(whole), dataclasses.astuple(some)):
    np.testing.assert_array_equal(b, a[ids])


@pytest.mark.parametrize("latents,words", [
    (None, "all 4,096 latents"),
    ([3, 17, 200], "3 of 4,096 latents: 3, 17, 200"),
    (list(range(1000)), "1,000 of 4,096 latents: 0-999"),
    ([0, 1, 2, 7, 9, 10], "6 of 4,096 latents: 0-2, 7, 9-10"),
    (list(range(0, 100, 2)), "50 of 4,096 latents: 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22,"
                             " ... (38 more)"),
])
def test_coverage_names_the_chosen_latents(latents, words):
  from jsae.browse import run
  assert run.coverage(latents, 4096) == words


@pytest.mark.parametrize("ids", [[40, 1, 17, 5], [2, 30, 47]])  # the model axis (2) divides 4
def test_chosen_latents_of_a_latent_sharded_sae_equal_the_one_device_pass(tiny_lm, streamed,
                                                                          ids):
  from jsae.browse import run
  params, config = tiny_lm
  sae, ctx, edges, full, _ = streamed
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(1, 2), ("data", "model"))
  sharded_sae = sae.shard(mesh)
  specs = run._stats_sharding(sharded_sae, len(ids))
  assert (specs is None) == (len(ids) % 2 == 1)
  stats = stream.stream(sharded_sae, params, config, SITE, ctx, SETTINGS, edges=edges,
                        stats_sharding=specs, latents=ids, progress=False)
  if specs is not None:
    assert stats.top_values.sharding.spec == jax.sharding.PartitionSpec("model")
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(stats)):
    np.testing.assert_allclose(np.asarray(b), a if a.ndim == 0 else a[ids], rtol=1e-5,
                               atol=1e-6)
