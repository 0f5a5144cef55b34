"""Transcoders: every family reads x and predicts y (with an optional affine skip), against
closed forms, finite differences and planted truth; sweeps, sharding, resume and the sparse
step unchanged; the LM splice in place of the MLP; paired shard sets; bad input."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsae
from configs import tiny
from jsae import config as config_lib
from jsae import data, evals, optim, saes, sharding, sweep, train
from jsae.data import pairs
from jsae.data.shards import ShardError, ShardWriter
from jsae.data.text import TokenContexts
from jsae.lm import gemma

FAMILIES = ["jumprelu", "relu", "topk", "batchtopk", "matryoshka", "gated"]
D_IN, D_OUT, D_SAE = 6, 4, 10


def _hparams(family):
  return {k: jnp.asarray(v) for k, v in dict(
      jumprelu=dict(sparsity_coeff=0.01, bandwidth=0.05, target_l0=3.0),
      relu=dict(sparsity_coeff=0.01), gated=dict(sparsity_coeff=0.01),
      topk=dict(k=3), batchtopk=dict(k=3), matryoshka=dict(k=3))[family].items()}


def _settings(family):
  c = tiny.get_config(f"family={family}")
  c.sae.d_in, c.sae.d_sae = D_IN, D_SAE
  if "group_sizes" in c.sae:
    c.sae.group_sizes = (4, 6)
  if "k_aux" in c.sae:
    c.sae.k_aux = 4
  if "sparse_capacity" in c.sae:
    c.sae.sparse_capacity = 0
  return saes.get(family).settings(c)


def _params(family, seed=0):
  fam = saes.get(family)
  kw = {"group_sizes": (4, 6)} if family == "matryoshka" else {}
  if family in ("topk", "batchtopk", "matryoshka"):
    kw["k"] = 3
  p = fam.init(jax.random.key(seed), d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, skip=True,
               pre_encoder_bias=False, **kw)
  k = jax.random.split(jax.random.key(seed + 1), 3)
  return p.replace(W_skip=0.3 * jax.random.normal(k[0], (D_IN, D_OUT)),
                   b_dec=0.1 * jax.random.normal(k[1], (D_OUT,)))


def _data(seed=2, n=16):
  k = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k[0], (n, D_IN)), jax.random.normal(k[1], (n, D_OUT))


def _loss(family, params, x, y):
  fam = saes.get(family)
  settings = _settings(family)
  state = fam.init_state(D_SAE, settings)
  return fam.loss(params, state, x, settings=settings, hparams=_hparams(family),
                  dead=jnp.zeros(D_SAE, bool), step=jnp.int32(10**6), target=y)


@pytest.mark.parametrize("family", FAMILIES)
def test_transcoder_loss_closed_form_and_finite_difference_gradients(family):
  """y_hat = f W_dec + b_dec + x W_skip against numpy; the reconstruction term is
  ||y - y_hat||^2; d loss / d (W_skip, W_dec, b_dec) against central differences
  (those leave every latent's value unchanged, so the loss is smooth in them)."""
  params, (x, y) = _params(family), _data()
  loss, out = _loss(family, params, x, y)
  f = np.asarray(out.f, np.float64)
  y_hat = (f @ np.asarray(params.W_dec, np.float64) + np.asarray(params.b_dec, np.float64)
           + np.asarray(x, np.float64) @ np.asarray(params.W_skip, np.float64))
  np.testing.assert_allclose(out.x_hat, y_hat, rtol=1e-5, atol=1e-5)
  rec = np.mean(np.sum((np.asarray(y, np.float64) - y_hat) ** 2, -1))
  assert float(out.parts["reconstruction"]) == pytest.approx(rec, rel=1e-5)
  assert (f != 0).any()
  # The skip changes the prediction; without a target the loss reconstructs x.
  no_skip = out.x_hat - np.asarray(x) @ np.asarray(params.W_skip)
  assert np.abs(no_skip - out.x_hat).max() > 0.1

  grads = jax.grad(lambda p: _loss(family, p, x, y)[0])(params)
  rng = np.random.default_rng(0)
  for name in ("W_skip", "W_dec", "b_dec"):
    direction = jnp.asarray(rng.standard_normal(getattr(params, name).shape), jnp.float32)
    eps = 1e-2
    plus = _loss(family, params.replace(**{name: getattr(params, name) + eps * direction}),
                 x, y)[0]
    minus = _loss(family, params.replace(**{name: getattr(params, name) - eps * direction}),
                  x, y)[0]
    numeric = (float(plus) - float(minus)) / (2 * eps)
    analytic = float(jnp.sum(getattr(grads, name) * direction))
    assert analytic == pytest.approx(numeric, rel=2e-2, abs=1e-3), name


def _transcoder_config(family, *, skip=False, steps=3000, batch=256, d_out=48, lr_scale=1.0):
  c = importlib.import_module(f"configs.tiny_{family}").get_config()
  c.optim.lr *= lr_scale
  c.mesh.data = c.mesh.model = 1
  c.sae.target_site, c.sae.d_out, c.sae.skip = "y", d_out, skip
  c.sae.pre_encoder_bias = False
  c.data.synthetic.skip_scale = 1.0 if skip else 0.0
  c.data.batch_size = batch
  c.train.num_tokens = steps * batch
  c.ckpt.every_steps = steps
  c.optim.decay = "cosine"
  if family == "jumprelu":
    c.loss.sparsity_coeff = 0.005  # the output's scale, not the input's, is normalised
  if "sparsity_warmup_steps" in c.loss:
    c.loss.sparsity_warmup_steps = steps // 10
  return c


def test_every_family_transcoder_recovers_the_planted_output_dictionary(tmp_path):
  """y = the planted codes of x decoded by a second dictionary (in another space, 48 wide);
  one sweep trains every family's transcoder and each recovers that dictionary. (1800
  steps at 2.5x tiny's learning rate: every family's mean best cosine measured 0.97 to
  0.997, as at 3000 steps at tiny's rate; at 1500 steps and 2x, Matryoshka fell to 0.92.)"""
  short = functools.partial(_transcoder_config, steps=1800, lr_scale=2.5)
  groups = {f: sweep.group(short(f), {}) for f in FAMILIES}
  c = sweep.sweep_config(short("jumprelu"), groups)
  c.sweep.report = False
  result = sweep.sweep(c, tmp_path, progress=False)
  source = data.make_source(result.groups[0].members[0].config)
  for g in result.groups:
    (m,) = g.members
    W = np.asarray(sweep.member_state(result.states[g.name], m, g.family).params.W_dec)
    W = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
    best_cos = (source.output_features @ W.T).max(axis=1).mean()
    print(f"{g.name}: mean best cosine {best_cos:.3f}")
    assert best_cos >= 0.9, g.name


def test_skip_transcoder_recovers_the_planted_linear_map(tmp_path):
  """y = codes decoded + x @ A with A reading x's dense part: the skip learns A (raw units,
  through the export fold), and at the same k predicts y far better than a transcoder
  without one. (A's rows on the sparse directions are 0 but not identifiable: latents and
  skip can trade that part, so only the dense rows are compared.) At 700 steps and 2.5x
  tiny's learning rate: relative error 0.011, FVU 0.12 against 0.45 (1500 steps at tiny's
  rate: 0.008, 0.12 against 0.46)."""
  with_skip = _transcoder_config("topk", skip=True, steps=700, batch=512, lr_scale=2.5)
  train.train(with_skip, tmp_path / "skip", progress=False)
  source = data.make_source(with_skip)
  sae = jsae.runs.read_sae(tmp_path / "skip")
  assert sae.transcoder and sae.d_out == 48
  dense = slice(with_skip.sae.d_in - source.dense_dims, None)
  A = source.linear_map[dense]
  err = np.linalg.norm(np.asarray(sae.params.W_skip)[dense] - A) / np.linalg.norm(A)
  print(f"skip: relative error {err:.4f} on the dense rows")
  assert err <= 0.05
  plain = _transcoder_config("topk", skip=False, steps=700, batch=512, lr_scale=2.5)
  plain.data.synthetic.skip_scale = 1.0  # the same data, no skip to learn A with
  train.train(plain, tmp_path / "plain", progress=False)
  rows = np.concatenate([np.asarray(source.batch(50_000 + i)) for i in range(4)])
  x, y = rows[:, :with_skip.sae.d_in], rows[:, with_skip.sae.d_in:]
  fvu = lambda s: float(np.sum((y - np.asarray(s(x))) ** 2) / np.sum((y - y.mean(0)) ** 2))
  with_fvu, plain_fvu = fvu(sae), fvu(jsae.runs.read_sae(tmp_path / "plain"))
  print(f"FVU with skip {with_fvu:.3f}, without {plain_fvu:.3f}")
  assert with_fvu < 0.5 * plain_fvu


def _short(family, steps=20, **kw):
  c = _transcoder_config(family, skip=True, steps=steps, batch=128, d_out=40)
  c.ckpt.every_steps = 10
  for k, v in kw.items():
    group, field = k.split("__")
    c[group][field] = v
  return c


def _assert_trees_close(a, b, tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    np.testing.assert_allclose(x, y, rtol=0, atol=tol * max(np.abs(y).max(), 1e-30))


def test_a_sweep_of_transcoders_equals_its_single_runs(tmp_path):
  # A window of 0.05 (not recipe 'auto''s, which holds half the pre-activations): the
  # wider the window, the likelier a pre-activation sits within rounding of its edge,
  # where batched and single matmuls disagree (measured with 'auto': one threshold of
  # 256 off by 7e-5 after 20 steps); the recipe's own sweep test is in test_recipe.py.
  hand = dict(sae__init_threshold=0.05, sae__bandwidth=0.05)
  groups = {f: sweep.group(_short(f, **(hand if f == "jumprelu" else {})), {"seed": (0, 1)})
            for f in ("jumprelu", "topk")}
  c = sweep.sweep_config(_short("jumprelu", **hand), groups)
  c.sweep.report = False
  result = sweep.sweep(c, tmp_path / "sweep", progress=False)
  for g in result.groups:
    for m in g.members:
      single = train.train(m.config, tmp_path / m.name, progress=False)
      _assert_trees_close(sweep.member_state(result.states[g.name], m, g.family).params,
                          single.state.params, 1e-5)


def test_transcoder_resume_is_bit_exact(tmp_path):
  c = _short("jumprelu", steps=40)
  straight = train.train(c, tmp_path / "a", progress=False)
  half = _short("jumprelu", steps=40, train__num_tokens=20 * c.data.batch_size)
  train.train(half, tmp_path / "b", progress=False)
  resumed = train.train(c, tmp_path / "b", progress=False)
  for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _step(config, mesh):
  source = data.make_source(config)
  settings = train.StepSettings.from_config(config, source.norm_scale, source.target_norm_scale)
  optimizer = optim.make_optimizer(config.optim, total_steps=100)
  init = functools.partial(train.create_state, config=config, optimizer=optimizer)
  abstract = jax.eval_shape(init, jax.random.key(0))
  state_sharding = sharding.named(mesh, sharding.state_specs(
      abstract, saes.get(config.sae.family)))
  batch_sharding = jax.sharding.NamedSharding(mesh, sharding.BATCH_SPEC)
  state = jax.jit(init, out_shardings=state_sharding)(jax.random.key(0))
  step = jax.jit(functools.partial(train.train_step, hparams=train.hyperparams(config),
                                   settings=settings, optimizer=optimizer),
                 in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None))
  for i in range(5):
    state, metrics = step(state, sharding.global_batch(source.batch(i), batch_sharding,
                                                       config.data.batch_size))
  return jax.device_get(state), metrics


def test_a_2x4_mesh_transcoder_step_equals_one_device():
  c = _short("jumprelu")
  one, m1 = _step(c, sharding.make_mesh(c.mesh))
  c.mesh.data, c.mesh.model = 2, 4
  mesh = sharding.make_mesh(c.mesh)
  assert mesh.shape["data"] == 2 and mesh.shape["model"] == 4
  eight, m8 = _step(c, mesh)
  _assert_trees_close(eight.params, one.params, 1e-5)
  assert float(m8["fvu"]) == pytest.approx(float(m1["fvu"]), rel=1e-5)


def test_the_sparse_step_of_a_transcoder_equals_the_dense_step():
  """JumpReLU's and TopK's sparse steps decode each row's kept latents and add the skip."""
  for family in ("jumprelu", "topk"):
    c = _short(family, sae__sparse_capacity=0)
    dense, _ = _step(c, sharding.make_mesh(c.mesh))
    c = _short(family, sae__sparse_capacity=192 if family == "jumprelu" else c.sae.k)
    assert saes.get(family).step_capacity(saes.get(family).settings(c)) > 0
    sparse, metrics = _step(c, sharding.make_mesh(c.mesh))
    if family == "jumprelu":  # no row overflowed: the sparse path ran, not the dense fallback
      assert float(metrics["max_candidates"]) <= 192
    # Sums in another order: float rounding (W_skip's entries are still ~1e-3 here).
    _assert_trees_close(sparse.params, dense.params, 1e-4)


# ----------------------------------------------------------------------------- the LM


@pytest.fixture(scope="module")
def tiny_lm():
  config = gemma.get_config("tiny_gemma3")
  return gemma.init_params(jax.random.key(0), config), config


def _contexts(config, n=5, seq=16):
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, config.vocab_size, (n, seq)).astype(np.int32)
  tokens[:, 0] = 2
  mask = np.ones_like(tokens, bool)
  mask[:, 0] = False
  mask[-1, 11:] = False
  return TokenContexts(tokens, mask)


class _Oracle:
  """A 'transcoder' whose prediction is a given function of the MLP's input."""

  transcoder = True

  def __init__(self, fn):
    self.fn = fn

  def encode(self, x):
    return jnp.ones(x.shape[:-1] + (2,))

  def predict(self, f, x):
    return self.fn(x)


jax.tree_util.register_pytree_node(_Oracle, lambda o: ((), o.fn), lambda fn, _: _Oracle(fn))


def test_splicing_the_mlps_own_output_is_lossless_and_zeros_are_the_ablation(tiny_lm):
  params, config = tiny_lm
  layer = 1
  lp = params["layers"][layer]
  def own(x):  # the block's own MLP output of its input x: [..., d_model]
    flat = x.reshape(1, -1, x.shape[-1])
    out = gemma._rms_norm(gemma._mlp(lp, flat, config), lp["post_mlp_norm"],  # pylint: disable=protected-access
                          config.rms_eps)
    return out.reshape(x.shape)
  kw = dict(site=f"mlp_in.{layer}", target_site=f"mlp_out.{layer}", contexts=_contexts(config),
            batch_size=3, min_density_tokens=0, progress=False)
  m = evals.evaluate(params, config, _Oracle(own), **kw)
  assert abs(m["delta_lm_loss"]) < 1e-6 and m["fvu"] < 1e-10 and m["kl_div"] < 1e-6
  z = evals.evaluate(params, config, _Oracle(lambda x: jnp.zeros_like(x)), **kw)
  assert z["delta_lm_loss"] == pytest.approx(z["delta_lm_loss_zero"], rel=1e-6)
  assert z["delta_lm_loss_zero"] != 0
  # The MLP is not run in a transcoded forward: its weights do not matter there.
  c = _contexts(config)
  tokens = jnp.asarray(c.tokens)
  layers = list(params["layers"])
  layers[layer] = dict(lp, gate=jnp.full_like(lp["gate"], jnp.nan))
  broken = dict(params, layers=layers)
  spliced, _ = gemma.forward(broken, tokens, config, transcode={f"mlp_out.{layer}": own})
  clean, _ = gemma.forward(params, tokens, config)
  np.testing.assert_allclose(spliced, clean, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="mlp_out.L sites"):
    gemma.forward(params, tokens, config, transcode={f"resid_post.{layer}": own})


def test_harvest_writes_row_aligned_pairs_and_the_loader_serves_them(tiny_lm, tmp_path):
  from jsae import harvest
  params, config = tiny_lm
  sites = ["mlp_in.1", "mlp_out.1"]
  result = harvest.harvest(params, config, _contexts(config), sites=sites, out_dir=tmp_path,
                           batch_size=2, rows_per_shard=16, progress=False)
  x_dir, y_dir = result.directories["mlp_in.1"], result.directories["mlp_out.1"]
  assert pairs.target_directory(x_dir, "mlp_out.1") == y_dir
  loader = pairs.PairLoader(x_dir, y_dir, batch_size=8, seed=3, prefetch=0,
                            process_index=0, process_count=1)
  rows = loader.batch(2)
  assert rows.shape == (8, 2 * config.d_model)
  # Each row pairs a token's MLP input with the same token's MLP output.
  c = _contexts(config)
  _, acts = gemma.forward(params, jnp.asarray(c.tokens), config, capture=sites)
  mlp_in = np.asarray(acts["mlp_in.1"])[c.mask]
  mlp_out = np.asarray(acts["mlp_out.1"])[c.mask]
  for row in rows:
    i = int(np.argmin(np.abs(mlp_in - row[:config.d_model]).sum(-1)))
    np.testing.assert_allclose(row[config.d_model:], mlp_out[i], rtol=1e-5, atol=1e-6)
  assert loader.norm_scale != loader.target_norm_scale
  loader.close()


def _write(directory, rows, rows_per_shard=10, **prov):
  with ShardWriter(directory, d_in=rows.shape[1], rows_per_shard=rows_per_shard,
                   provenance=prov) as w:
    w.write(rows)


def test_misaligned_pairs_are_refused_naming_what_differs(tmp_path):
  rng = np.random.default_rng(0)
  _write(tmp_path / "x", rng.standard_normal((30, 4)).astype(np.float32), model="m",
         text_source="a")
  _write(tmp_path / "rows", rng.standard_normal((31, 4)).astype(np.float32), model="m",
         text_source="a")
  _write(tmp_path / "text", rng.standard_normal((30, 4)).astype(np.float32), model="m",
         text_source="b")
  with pytest.raises(ShardError, match="not row-aligned: 30 rows .* 31"):
    pairs.check_aligned(tmp_path / "x", tmp_path / "rows")
  with pytest.raises(ShardError, match=r"different inputs \(text_source: 'a' vs 'b'\)"):
    pairs.check_aligned(tmp_path / "x", tmp_path / "text")
  c = _transcoder_config("jumprelu")
  c.data.source, c.data.shards_dir = "shards", str(tmp_path / "x")
  c.data.target_shards_dir = str(tmp_path / "x")
  c.sae.d_in, c.sae.d_out = 4, 3
  with pytest.raises(ShardError, match=r"expected the target's width 3 \(config.sae.d_out\)"
                     r", found 4; set --config.sae.d_out=4"):
    data.make_source(c)


@pytest.mark.parametrize("change,message", [
    (dict(skip=True, target_site=""), "sae.skip: an affine skip belongs to a transcoder"),
    (dict(pre_encoder_bias=True), "sae.pre_encoder_bias: a transcoder's b_dec"),
    (dict(d_out=-1), "sae.d_out: must be an integer >= 0"),
    (dict(target_site="", d_out=7, skip=False), "sae.d_out: 7 differs from d_in"),
])
def test_bad_transcoder_configs_are_refused(change, message):
  c = _transcoder_config("jumprelu", skip=True)
  for k, v in change.items():
    c.sae[k] = v
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_the_browser_shows_a_transcoders_input_contexts_and_output_logit_effects(tiny_lm):
  from jsae.browse import logits, run as browse_lib
  params, lm_config = tiny_lm
  config = _transcoder_config("jumprelu")
  config.lm.site, config.sae.target_site = "mlp_in.1", "mlp_out.1"
  d = lm_config.d_model
  fam = saes.get("jumprelu")
  tc = jsae.SAE.from_training(fam.init(jax.random.key(0), d_in=d, d_sae=8, d_out=d,
                                       pre_encoder_bias=False), (2.0, 3.0), transcoder=True)
  assert browse_lib.output_site(config, tc) == "mlp_out.1"  # where its decoder rows live
  sae = jsae.SAE.from_training(fam.init(jax.random.key(0), d_in=d, d_sae=8), 2.0)
  assert browse_lib.output_site(config, sae) == "mlp_in.1"
  config.sae.target_site = ""
  with pytest.raises(browse_lib.BrowseError, match="set config.sae.target_site"):
    browse_lib.output_site(config, tc)
  # Rows at the MLP's output reach the logits directly; at its input they do not.
  w = tc.params.W_dec
  direction = logits.residual_directions(w, params, lm_config, "mlp_out.1")
  np.testing.assert_array_equal(direction, w)
  with pytest.raises(ValueError, match="no linear path to the logits"):
    logits.residual_directions(w, params, lm_config, "mlp_in.1")
