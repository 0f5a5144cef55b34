"""Gemma 2/3 forward vs a loop-based NumPy reference; hooks, splices, masks, errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsae.lm import gemma

# ------------------------------------------------------------- NumPy reference
# Written independently of jsae.lm.gemma: float64, explicit loops over heads,
# queries and keys, RoPE as explicit (i, i + h/2) pair rotations.


def _np_rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + w)


def _np_rope(vec, pos, base, scale):
  """vec: [h]; rotates the pair (i, i + h/2) by pos / scale / base^(2i/h)."""
  h = vec.shape[0]
  out = vec.copy()
  for i in range(h // 2):
    theta = (pos / scale) / base ** (2.0 * i / h)
    a, b = vec[i], vec[i + h // 2]
    out[i] = a * np.cos(theta) - b * np.sin(theta)
    out[i + h // 2] = b * np.cos(theta) + a * np.sin(theta)
  return out


def _np_gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def np_forward(params, tokens, cfg, valid=None):
  """One sequence. tokens: [s]; valid: [s] bool. Returns (logits [s, V], resid [L, s, d])."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  s = len(tokens)
  valid = np.ones(s, bool) if valid is None else np.asarray(valid, bool)
  pos = np.maximum(np.cumsum(valid) - 1, 0)
  H, K, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  x = p["embed"][np.asarray(tokens)] * np.sqrt(cfg.d_model)
  resids = []
  for layer, lp in enumerate(p["layers"]):
    is_global = cfg.attention_types[layer] == "global"
    base = cfg.rope_base_global if is_global else cfg.rope_base_local
    scale = cfg.rope_scale_global if is_global else 1.0
    y = _np_rms(x, lp["attn_norm"], cfg.rms_eps)
    q = np.einsum("sd,dnh->snh", y, lp["q"])
    k = np.einsum("sd,dkh->skh", y, lp["k"])
    v = np.einsum("sd,dkh->skh", y, lp["v"])
    if cfg.qk_norm:
      q = _np_rms(q, lp["q_norm"], cfg.rms_eps)
      k = _np_rms(k, lp["k_norm"], cfg.rms_eps)
    z = np.zeros((s, H, h))
    for n in range(H):
      kvh = n // (H // K)
      for i in range(s):
        qi = _np_rope(q[i, n], pos[i], base, scale) * cfg.query_scale
        logits, vals = [], []
        for j in range(s):
          visible = j <= i and valid[j]
          if not is_global:
            visible = visible and pos[i] - pos[j] < cfg.sliding_window
          if not visible:
            continue
          logit = float(qi @ _np_rope(k[j, kvh], pos[j], base, scale))
          if cfg.attn_logit_softcap is not None:
            logit = cfg.attn_logit_softcap * np.tanh(logit / cfg.attn_logit_softcap)
          logits.append(logit)
          vals.append(v[j, kvh])
        if not logits:  # a padded query before any real token: output unused
          continue
        w = np.exp(np.array(logits) - max(logits))
        z[i, n] = (w / w.sum()) @ np.array(vals)
    attn = np.einsum("snh,nhd->sd", z, lp["o"])
    x = x + _np_rms(attn, lp["post_attn_norm"], cfg.rms_eps)
    y = _np_rms(x, lp["mlp_norm"], cfg.rms_eps)
    mlp = (_np_gelu_tanh(y @ lp["gate"]) * (y @ lp["up"])) @ lp["down"]
    x = x + _np_rms(mlp, lp["post_mlp_norm"], cfg.rms_eps)
    resids.append(x)
  x = _np_rms(x, p["final_norm"], cfg.rms_eps)
  logits = x @ p["embed"].T
  if cfg.final_logit_softcap is not None:
    logits = cfg.final_logit_softcap * np.tanh(logits / cfg.final_logit_softcap)
  return logits, np.stack(resids)


# --------------------------------------------------------------------- fixtures

SEQ = 20  # longer than the tiny configs' sliding window of 8


@pytest.fixture(scope="module", params=["tiny_gemma2", "tiny_gemma3"])
def model(request):
  cfg = gemma.get_config(request.param)
  params = gemma.init_params(jax.random.key(0), cfg)
  return cfg, params


def _tokens(batch=2, seq=SEQ, seed=1, vocab=256):
  # Tests share the [2, SEQ] shape so eager op compilations are reused.
  return jnp.asarray(np.random.default_rng(seed).integers(3, vocab, (batch, seq)), jnp.int32)


def _close(a, b, rtol=2e-4):
  """Max |a - b| relative to max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err = np.max(np.abs(a - b)) / np.max(np.abs(b))
  assert err < rtol, f"relative error {err:.2e} >= {rtol}"


# ------------------------------------------------------------------------ tests

def test_shapes_and_dtypes(model):
  cfg, params = model
  tokens = _tokens()
  sites = ("resid_post.0", "mlp_out.1", "attn_z.2")
  logits, cap = gemma.forward(params, tokens, cfg, capture=sites)
  assert logits.shape == (2, SEQ, cfg.vocab_size) and logits.dtype == jnp.float32
  assert cap["resid_post.0"].shape == (2, SEQ, cfg.d_model)
  assert cap["mlp_out.1"].shape == (2, SEQ, cfg.d_model)
  assert cap["attn_z.2"].shape == (2, SEQ, cfg.n_heads * cfg.head_dim)
  assert set(cap) == set(sites)


def test_matches_numpy_reference(model):
  cfg, params = model
  tokens = _tokens()
  sites = tuple(f"resid_post.{i}" for i in range(cfg.n_layers))
  logits, cap = jax.jit(functools.partial(gemma.forward, config=cfg, capture=sites))(
      params, tokens)
  for b in range(2):
    ref_logits, ref_resid = np_forward(params, np.asarray(tokens[b]), cfg)
    _close(logits[b], ref_logits)
    _close(np.stack([cap[s][b] for s in sites]), ref_resid)


def test_sliding_window_and_global_layers_matter(model):
  cfg, params = model
  tokens = _tokens()
  wide = dataclasses.replace(cfg, sliding_window=10_000)
  all_global = dataclasses.replace(cfg, attention_types=("global",) * cfg.n_layers)
  base = gemma.forward(params, tokens, cfg)[0]
  out = gemma.forward(params, tokens, wide)[0]
  w = cfg.sliding_window
  # Only queries at least a window past the first token see a difference.
  _close(out[:, :w], base[:, :w], rtol=1e-5)
  assert np.max(np.abs(out[:, w:] - base[:, w:])) > 1e-3
  _close(out[0], np_forward(params, np.asarray(tokens[0]), wide)[0])
  assert np.max(np.abs(gemma.forward(params, tokens, all_global)[0] - base)) > 1e-3


def test_softcaps_against_reference(model):
  cfg, params = model
  # Caps small enough to bind on random weights, so tanh really matters.
  capped = dataclasses.replace(cfg, attn_logit_softcap=0.5, final_logit_softcap=0.3)
  tokens = _tokens()
  logits = gemma.forward(params, tokens, capped)[0]
  _close(logits[0], np_forward(params, np.asarray(tokens[0]), capped)[0])
  assert float(jnp.max(jnp.abs(logits))) <= 0.3 + 1e-6
  uncapped = dataclasses.replace(cfg, attn_logit_softcap=None, final_logit_softcap=None)
  assert np.max(np.abs(gemma.forward(params, tokens, uncapped)[0] - logits)) > 1e-2


def test_causal(model):
  cfg, params = model
  tokens = _tokens()
  changed = tokens.at[0, 12].set((tokens[0, 12] + 1) % cfg.vocab_size)
  a = gemma.forward(params, tokens, cfg)[0]
  b = gemma.forward(params, changed, cfg)[0]
  np.testing.assert_array_equal(a[:, :12], b[:, :12])
  assert np.max(np.abs(a[:, 12:] - b[:, 12:])) > 1e-4


def test_padding_mask_left_and_right(model):
  cfg, params = model
  n, pad = 14, 6
  real = _tokens(seq=n)[0]
  alone = gemma.forward(params, jnp.stack([real, real]), cfg)[0][0]
  filler = _tokens(seq=pad, seed=9)[0]  # arbitrary ids: they must not matter
  right = jnp.concatenate([real, filler])[None]
  left = jnp.concatenate([filler, real])[None]
  tokens = jnp.concatenate([right, left])
  mask = jnp.asarray([[1] * n + [0] * pad, [0] * pad + [1] * n], bool)
  logits = gemma.forward(params, tokens, cfg, mask=mask)[0]
  _close(logits[0, :n], alone, rtol=1e-5)
  _close(logits[1, pad:], alone, rtol=1e-5)
  assert np.all(np.isfinite(logits))  # padded queries see no key: still finite
  ref = np_forward(params, np.asarray(tokens[1]), cfg, valid=np.asarray(mask[1]))[0]
  _close(logits[1, pad:], ref[pad:])


def test_identity_and_zero_splices(model):
  cfg, params = model
  tokens = _tokens()
  base = gemma.forward(params, tokens, cfg)[0]
  for site in ("resid_post.1", "mlp_out.0", "attn_z.2"):
    same = gemma.forward(params, tokens, cfg, splice={site: lambda x: x})[0]
    np.testing.assert_array_equal(same, base)
    zeroed = gemma.forward(params, tokens, cfg, splice={site: jnp.zeros_like})[0]
    assert np.max(np.abs(zeroed - base)) > 1e-3, site


def test_zero_splices_equal_zeroed_weights(model):
  cfg, params = model
  tokens = _tokens()
  for site, weight in (("mlp_out.1", "down"), ("attn_z.2", "o")):
    layer = gemma.parse_site(site)[1]
    p = jax.tree.map(lambda a: a, params)
    p["layers"][layer] = dict(p["layers"][layer], **{weight: jnp.zeros_like(p["layers"][layer][weight])})
    spliced, cap = gemma.forward(params, tokens, cfg, splice={site: jnp.zeros_like},
                                 capture=(site,))
    _close(spliced, gemma.forward(p, tokens, cfg)[0], rtol=1e-6)
    # Captured values are the site's own activation, from before the splice.
    assert np.max(np.abs(cap[site])) > 0


def test_splice_changes_only_downstream(model):
  cfg, params = model
  tokens = _tokens()
  sites = ("resid_post.0", "resid_post.1", "resid_post.2")
  _, base = gemma.forward(params, tokens, cfg, capture=sites)
  _, out = gemma.forward(params, tokens, cfg, capture=sites,
                         splice={"resid_post.1": lambda x: 2 * x})
  np.testing.assert_array_equal(out["resid_post.0"], base["resid_post.0"])
  np.testing.assert_array_equal(out["resid_post.1"], base["resid_post.1"])
  assert np.max(np.abs(out["resid_post.2"] - base["resid_post.2"])) > 1e-3


def test_spliced_under_jit_with_traced_params(model):
  cfg, params = model
  tokens = _tokens()

  @jax.jit
  def run(params, scale, tokens):
    return gemma.forward(params, tokens, cfg, splice={"resid_post.1": lambda x: x * scale})[0]

  _close(run(params, 1.0, tokens), gemma.forward(params, tokens, cfg)[0], rtol=1e-5)
  with pytest.raises(ValueError, match="must return the site's shape"):
    gemma.forward(params, tokens, cfg, splice={"resid_post.1": lambda x: x[:, :1]})


def test_stop_at_layer_matches_full_forward(model):
  cfg, params = model
  tokens = _tokens()
  sites = ("resid_post.1", "mlp_out.1", "attn_z.0")
  _, full = gemma.forward(params, tokens, cfg, capture=sites)
  run = jax.jit(functools.partial(gemma.forward, config=cfg, capture=sites, stop_at_layer=2))
  logits, part = run(params, tokens)
  assert logits is None
  for s in sites:
    _close(part[s], full[s], rtol=1e-5)
  logits, part = gemma.make_forward(cfg, capture="resid_post.1", stop_at_layer=2)(params, tokens)
  assert logits is None
  _close(part["resid_post.1"], full["resid_post.1"], rtol=1e-5)


def test_bfloat16_close_to_float32(model):
  cfg, params = model
  tokens = _tokens()
  f32 = gemma.forward(params, tokens, cfg)[0]
  bf = dataclasses.replace(cfg, dtype="bfloat16")
  out, cap = gemma.forward(gemma.cast_params(params, jnp.bfloat16), tokens, bf,
                           capture=("resid_post.0",))
  assert out.dtype == jnp.float32 and cap["resid_post.0"].dtype == jnp.bfloat16
  _close(out, f32, rtol=5e-2)


def test_nll_and_loss_mask():
  logits = jnp.log(jnp.asarray([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3] * 3]]))
  tokens = jnp.asarray([[0, 1, 2]])
  nll, w = gemma.token_nll(logits, tokens)
  np.testing.assert_allclose(nll, [[-np.log(0.25), -np.log(0.1)]], rtol=1e-6)
  np.testing.assert_array_equal(w, [[1, 1]])
  masked = jnp.asarray([[True, True, False]])  # last target excluded
  np.testing.assert_allclose(gemma.mean_nll(logits, tokens, masked), -np.log(0.25), rtol=1e-6)


def test_named_configs():
  for name in gemma.list_configs():
    cfg = gemma.get_config(name)
    assert len(cfg.attention_types) == cfg.n_layers
    assert gemma.GemmaConfig.from_dict(cfg.to_dict()) == cfg
    hash(cfg)
  c = gemma.get_config("gemma3_270m")
  assert (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff) == (
      640, 18, 4, 1, 256, 2048)
  assert [i for i in range(18) if c.is_global(i)] == [5, 11, 17]
  g2 = gemma.get_config("gemma2_2b")
  assert g2.attention_types[:2] == ("local", "global") and g2.final_logit_softcap == 30.0
  assert gemma.get_config("gemma2_27b").query_scale == pytest.approx(144 ** -0.5)
  with pytest.raises(ValueError, match="unknown Gemma config 'gemma9'.*gemma2_2b"):
    gemma.get_config("gemma9")


def test_errors():
  cfg = gemma.get_config("tiny_gemma3")
  params = gemma.init_params(jax.random.key(0), cfg)
  tokens = _tokens()
  assert gemma.parse_site("attn_z.3") == ("attn_z", 3)
  with pytest.raises(ValueError, match=r"unknown hook site 'foo.3'; valid: resid_post.L, "
                     r"mlp_in.L, mlp_out.L, attn_z.L with 0 <= L < 4"):
    gemma.forward(params, tokens, cfg, capture=("foo.3",))
  with pytest.raises(ValueError, match="unknown hook site 'resid_post.4'"):
    gemma.forward(params, tokens, cfg, capture=("resid_post.4",))
  with pytest.raises(ValueError, match="unknown hook site 'mlp_out.9'"):
    gemma.forward(params, tokens, cfg, splice={"mlp_out.9": lambda x: x})
  with pytest.raises(ValueError, match="at or after stop_at_layer=2"):
    gemma.forward(params, tokens, cfg, capture=("resid_post.2",), stop_at_layer=2)
  with pytest.raises(ValueError, match="stop_at_layer=5 is out of range"):
    gemma.make_forward(cfg, stop_at_layer=5)
  with pytest.raises(ValueError, match="stop_at_layer=0 is out of range"):
    gemma.forward(params, tokens, cfg, stop_at_layer=0)
  with pytest.raises(ValueError, match="exceeds 'tiny_gemma3'.s max_seq_len=64"):
    gemma.forward(params, _tokens(seq=65), cfg)
  with pytest.raises(ValueError, match=r"\[batch, seq\]"):
    gemma.forward(params, tokens[0], cfg)
  with pytest.raises(ValueError, match="mask has shape"):
    gemma.forward(params, tokens, cfg, mask=jnp.ones((2, 7), bool))
  bad = dict(params, embed=params["embed"][:, :10])
  with pytest.raises(ValueError, match=r"embed has shape \(256, 10\), expected \(256, 64\)"):
    gemma.check_params(bad, cfg)
  with pytest.raises(ValueError, match="attention_types has 3 entries"):
    dataclasses.replace(cfg, attention_types=("local",) * 3)
