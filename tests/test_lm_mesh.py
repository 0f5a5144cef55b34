"""The LM on a device mesh (8 fake CPU devices): every parameter sharded as its spec says,
forwards, losses, harvests and evaluations equal to one device, clear errors for meshes
that do not fit."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jsae
from jsae import evals, saes
from jsae import harvest as harvest_lib
from jsae import sharding
from jsae.data import shards as shards_lib
from jsae.data.text import TokenContexts
from jsae.lm import gemma, next_token
from jsae.lm import mesh as lm_mesh

MESHES = [(2, 4), (1, 8), (8, 1)]


def _wide(name: str) -> gemma.GemmaConfig:
  """A tiny test model with 8 query heads (and 2 or 1 KV heads), so that every mesh of
  8 devices divides it."""
  c = gemma.get_config(name)
  return dataclasses.replace(c, name=f"{name}_8h", n_heads=8,
                             n_kv_heads=2 if c.family == "gemma2" else 1)


@pytest.fixture(scope="module", params=["tiny_gemma2", "tiny_gemma3"])
def lm(request):
  config = _wide(request.param)
  return gemma.init_params(jax.random.key(0), config), config


def _contexts(config, n=6, seq=24):
  rng = np.random.default_rng(1)
  tokens = rng.integers(3, config.vocab_size, (n, seq)).astype(np.int32)
  tokens[:, 0] = 2
  mask = np.ones_like(tokens, bool)
  mask[:, 0] = False  # BOS
  tokens[-1, 13:] = 0
  mask[-1, 13:] = False  # padding
  return TokenContexts(tokens, mask)


def _read_all(directory):
  m = shards_lib.load_manifest(directory)
  return np.concatenate([np.fromfile(directory / s.file, np.float32).reshape(-1, m.d_in)
                         for s in m.shards])


def _close(a, b, rtol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def test_every_parameter_has_a_spec_and_an_unknown_one_is_an_error():
  for name in ("gemma2_9b", "gemma3_270m", "tiny_gemma3"):
    config = gemma.get_config(name)
    specs = lm_mesh.param_specs(config, 4)
    shapes = gemma.param_shapes(config)
    assert jax.tree.structure(specs, is_leaf=lambda s: isinstance(s, P)) == jax.tree.structure(
        shapes, is_leaf=lambda s: isinstance(s, tuple))
  with pytest.raises(ValueError, match="no sharding for the LM parameter 'mystery'"):
    lm_mesh._spec("mystery", {}, 4)  # pylint: disable=protected-access


@pytest.mark.parametrize("data,model", [(2, 4), (4, 2)])
def test_placed_parameters_are_sharded_as_their_spec_says(lm, data, model):
  params, config = lm
  placed = lm_mesh.place(params, lm_mesh.make_mesh(data, model))
  specs = lm_mesh.param_specs(config, model)
  flat = jax.tree_util.tree_leaves_with_path(placed)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
  split = 0
  for (path, array), spec in zip(flat, spec_leaves):
    assert array.sharding.spec == spec, jax.tree_util.keystr(path)
    expected = tuple(n // model if i < len(spec) and spec[i] == "model" else n
                     for i, n in enumerate(array.shape))
    for shard in array.addressable_shards:  # a replicated copy fails here
      assert shard.data.shape == expected, jax.tree_util.keystr(path)
    split += "model" in tuple(spec)
  # q, o, gate, up, down per layer (k and v too where the KV heads divide) and the embedding
  kv = 2 if config.n_kv_heads % model == 0 else 0
  assert split == 1 + config.n_layers * (5 + kv)
  assert placed["embed"].sharding.spec == P("model", None)


@pytest.mark.parametrize("data,model", MESHES)
def test_sharded_logits_and_next_token_losses_equal_one_device(lm, data, model):
  params, config = lm
  placed = lm_mesh.place(params, lm_mesh.make_mesh(data, model))
  ctx = _contexts(config, n=8)
  site = "resid_post.1"

  def run(p, tokens, mask):
    logits, acts = gemma.forward(p, tokens, config, capture=(site,))
    nll, _ = gemma.token_nll(logits, tokens, mask)
    h, _ = gemma.forward(p, tokens, config, logits=False)
    zeroed, _ = gemma.forward(p, tokens, config, logits=False,
                              splice={site: jnp.zeros_like})
    sums = next_token.loss_sums(p, config, h, zeroed[None], tokens, mask, chunk=16)
    return logits, nll, acts[site], sums

  fn = jax.jit(run)
  want = fn(params, jnp.asarray(ctx.tokens), jnp.asarray(ctx.mask))
  got = fn(placed, lm_mesh.put_batch(placed, ctx.tokens), lm_mesh.put_batch(placed, ctx.mask))
  if model > 1:  # the logits stay split over the vocabulary
    assert got[0].sharding.spec[-1] == "model"
  for g, w in zip(got, want):
    _close(g, w)


def test_the_sharded_program_never_gathers_the_embedding_or_the_logits():
  config = _wide("tiny_gemma2")
  placed = lm_mesh.place(gemma.init_params(jax.random.key(0), config), lm_mesh.make_mesh(2, 4))
  tokens = lm_mesh.put_batch(placed, _contexts(config, n=2).tokens)
  hlo = jax.jit(lambda p, t: gemma.mean_nll(gemma.forward(p, t, config)[0], t)).lower(
      placed, tokens).compile().as_text()
  assert "all-gather" not in hlo  # vocabulary-parallel: reductions, never a full copy
  assert "all-reduce" in hlo


@pytest.mark.parametrize("data,model", MESHES)
def test_harvest_on_a_mesh_writes_the_one_device_rows(lm, data, model, tmp_path):
  params, config = lm
  ctx = _contexts(config, n=7)
  sites = ["resid_post.2", "attn_z.1"]
  kw = dict(sites=sites, batch_size=3, rows_per_shard=40, progress=False)
  one = harvest_lib.harvest(params, config, ctx, out_dir=tmp_path / "one", **kw)
  placed = lm_mesh.place(params, lm_mesh.make_mesh(data, model))
  many = harvest_lib.harvest(placed, config, ctx, out_dir=tmp_path / "mesh", **kw)
  for s in sites:
    a, b = (_read_all(r.directories[s]) for r in (one, many))
    assert len(a) == len(b) == ctx.n_tokens
    _close(b, a)


def test_evaluation_on_a_mesh_equals_one_device(lm):
  params, config = lm
  ctx = _contexts(config, n=5, seq=24)
  site = "resid_post.1"
  sae = jsae.SAE.from_training(
      saes.get("jumprelu").init(jax.random.key(3), d_in=config.d_model, d_sae=48), 3.0)
  kw = dict(site=site, contexts=ctx, batch_size=2, progress=False, zero_every_position=True)
  want = evals.evaluate_many(params, config, {"a": sae}, **kw)["a"]
  placed = lm_mesh.place(params, lm_mesh.make_mesh(2, 4))
  got = evals.evaluate_many(placed, config, {"a": sae}, **kw)["a"]
  assert got["lm_batch_size"] == 2 and got["lm_targets"] == want["lm_targets"]
  for key in ("delta_lm_loss", "delta_lm_loss_zero", "kl_div", "fvu", "l0", "ce_clean",
              "ce_zero_ablation_every_position"):
    assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_meshes_that_do_not_fit_are_refused_with_the_sizes_that_work():
  config = gemma.get_config("gemma3_270m")  # 4 heads, 1 KV head, d_ff 2048
  with pytest.raises(lm_mesh.LMMeshError, match=r"model=8 does not divide .*n_heads=4.*\[1, 2, 4\]"):
    lm_mesh.check_mesh(config, 1, 8, 8)
  with pytest.raises(lm_mesh.LMMeshError, match=r"needs 16 devices, but this process has 8"):
    lm_mesh.check_mesh(config, 4, 4, 8)
  with pytest.raises(lm_mesh.LMMeshError, match=r"vocab_size=250.*\[1, 2\]"):
    lm_mesh.check_mesh(dataclasses.replace(_wide("tiny_gemma2"), vocab_size=250), 1, 4, 8)
  cpu = jax.local_devices()
  assert lm_mesh.resolve_shape({"data": 0, "model": 0}, config, cpu) == (1, 1)  # auto on CPU
  assert lm_mesh.resolve_shape({"data": -1, "model": 2}, config, cpu) == (4, 2)
  assert lm_mesh.resolve_shape({"data": 2, "model": 4}, config, cpu) == (2, 4)


def test_gemma2_9b_on_four_model_devices_by_hand():
  config = gemma.get_config("gemma2_9b")
  d, f, v, h, layers = 3584, 14336, 256_000, 256, 42
  per_layer = (d * 16 * h * 2          # q and o: 16 heads, a quarter each
               + d * 8 * h * 2         # k and v: 8 KV heads, a quarter each
               + d * f * 3) // 4       # gate, up, down
  by_hand = (v * d // 4 + layers * per_layer) * 2 + (1 + 4 * layers) * d * 4  # norms f32
  assert lm_mesh.per_device_param_bytes(config, 4, "bfloat16") == by_hand
  # The same from jax.eval_shape and the specs, the way the SAE dry run counts.
  abstract = jax.eval_shape(lambda: gemma.init_params(jax.random.key(0), config))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      a.shape, jnp.float32 if a.ndim == 1 else jnp.bfloat16), abstract)
  assert sharding.per_device_bytes(abstract, lm_mesh.param_specs(config, 4),
                                   {"model": 4}) == by_hand
  assert by_hand < 16 * 2**30 < lm_mesh.per_device_param_bytes(config, 1, "bfloat16")
  assert math.isclose(by_hand / 2**30, 4.3, abs_tol=0.05)


def test_a_browse_pass_refuses_an_sae_and_an_lm_on_different_devices(lm):
  from jsae.browse import accumulate, stream  # pylint: disable=import-outside-toplevel
  params, config = lm
  placed = lm_mesh.place(params, lm_mesh.make_mesh(2, 4))
  sae_mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(1, 2), ("data", "model"))
  sae = jsae.SAE.from_training(
      saes.get("jumprelu").init(jax.random.key(3), d_in=config.d_model, d_sae=48), 3.0)
  specs = jax.tree.map(lambda a: jax.sharding.NamedSharding(sae_mesh, P("model") if a.ndim
                                                            else P()),
                       accumulate.init(48, n_top=1, n_samples=1, window=1, n_bins=1))
  with pytest.raises(ValueError, match="the SAE is sharded over 2 devices but the LM's mesh"):
    stream.stream(sae.shard(sae_mesh), placed, config, "resid_post.1", _contexts(config),
                  stream.BrowseSettings(), edges=accumulate.hist_edges(), stats_sharding=specs,
                  progress=False)
