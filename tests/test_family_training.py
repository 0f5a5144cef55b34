"""Every family trained end to end: planted-feature recovery, inference forms, export and
load in every format that holds it, and sharded steps equal to one device."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsae
from jsae import data, formats, sharding, train
from jsae.formats import FormatError

FAMILIES = ["relu", "topk", "batchtopk", "matryoshka", "gated"]  # jumprelu: test_train.py
MIN_COSINE = {"relu": 0.85, "gated": 0.85, "topk": 0.9, "batchtopk": 0.9, "matryoshka": 0.9}


def _config(family):
  c = importlib.import_module(f"configs.tiny_{family}").get_config()
  c.mesh.data = c.mesh.model = 1
  return c


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tmp_path_factory):
  family = request.param
  config = _config(family)
  workdir = tmp_path_factory.mktemp(family)
  result = train.train(config, workdir, progress=False)
  source = data.make_source(config)
  held_out = np.concatenate([np.asarray(source.batch(10_000 + i)) for i in range(4)])
  return family, config, workdir, result, source, held_out


def test_recovers_planted_features(trained):
  family, config, _, result, source, held_out = trained
  W = np.asarray(result.state.params.W_dec)
  W = W / np.linalg.norm(W, axis=1, keepdims=True)
  best_cos = (source.features @ W.T).max(axis=1).mean()
  sae = jsae.SAE.from_training(result.state.params, source.norm_scale,
                               state=result.state.family_state)
  l0 = float((np.asarray(sae.encode(held_out)) != 0).sum(-1).mean())
  print(f"{family}: mean best cosine {best_cos:.3f}, inference L0 {l0:.2f}")
  assert best_cos >= MIN_COSINE[family]
  assert 0.5 * config.data.synthetic.l0 <= l0 <= 3 * config.data.synthetic.l0


def test_inference_form_matches_training_forward(trained):
  """TopK/ReLU/Gated: the same latents; BatchTopK/Matryoshka: the same L0 within 5%."""
  family, config, workdir, result, source, held_out = trained
  sae = jsae.runs.read_sae(workdir)
  fam = jsae.saes.get(family)
  params = result.state.params
  f_raw = np.asarray(sae.encode(held_out))
  x = jnp.asarray(held_out) / source.norm_scale
  if family in ("batchtopk", "matryoshka"):
    f_train = np.asarray(fam.encode(params, x))  # the batch-level top k * batch
    l0_train, l0_inf = (f_train != 0).sum(-1).mean(), (f_raw != 0).sum(-1).mean()
    assert l0_inf == pytest.approx(l0_train, rel=0.05)
    assert sae.family == "jumprelu" and sae.provenance["training_family"] == family
    np.testing.assert_allclose(np.asarray(sae.threshold),
                               source.norm_scale * float(result.state.family_state.threshold),
                               rtol=1e-6)
    return
  f_train = np.asarray(fam.encode(params, x))
  if not config.optim.decoder_unit_norm:  # relu, gated: the export folds the row norms
    norms = np.linalg.norm(np.asarray(params.W_dec), axis=1)
    f_train = f_train * norms
  np.testing.assert_array_equal(f_raw != 0, f_train != 0)
  np.testing.assert_allclose(f_raw, source.norm_scale * f_train, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(sae(held_out), source.norm_scale * np.asarray(
      fam.decode(params, fam.encode(params, x))), rtol=2e-3, atol=2e-3)


def test_export_then_load_gives_identical_encodings(trained, tmp_path):
  family, _, workdir, _, _, held_out = trained
  sae = jsae.runs.read_sae(workdir)
  f = np.asarray(sae.encode(held_out))
  assert (f != 0).any()
  for fmt in formats.FORMATS:
    out = tmp_path / fmt
    if sae.family not in formats.families(fmt):
      with pytest.raises(FormatError, match=f"cannot be saved as {fmt}"):
        jsae.save(sae, out, format=fmt)
      with pytest.raises(FormatError, match="cannot hold"):
        formats.export(workdir, out, fmt)
      assert not out.exists()  # refused before anything is written
      continue
    path = formats.export(workdir, out, fmt, **({"layer": 3, "average_l0": 6}
                                                if fmt == "gemma_scope" else {}))
    loaded = jsae.load(path)
    assert loaded.family == sae.family
    np.testing.assert_array_equal(loaded.encode(held_out), f, err_msg=fmt)


# ----------------------------------------------------------------------------- sharding


def _sharded_steps(config, mesh_shape, steps=4):
  """Params and family state after `steps` train steps on a (data, model) mesh."""
  from ml_collections import ConfigDict
  mesh = sharding.make_mesh(ConfigDict(dict(data=mesh_shape[0], model=mesh_shape[1])))
  optimizer = train.optim.make_optimizer(config.optim, total_steps=100)
  init = functools.partial(train.create_state, config=config, optimizer=optimizer)
  abstract = jax.eval_shape(init, jax.random.key(0))
  family = jsae.saes.get(config.sae.family)
  state_sh = sharding.named(mesh, sharding.state_specs(abstract, family))
  batch_sh = jax.sharding.NamedSharding(mesh, sharding.BATCH_SPEC)
  state = jax.jit(init, out_shardings=state_sh)(jax.random.key(0))
  # A third of the latents start dead, so AuxK runs too.
  dead = jnp.arange(config.sae.d_sae) % 3 == 0
  state = state.replace(steps_since_fired=jax.device_put(
      jnp.where(dead, 10**6, 0).astype(jnp.int32), state_sh.steps_since_fired))
  settings = train.StepSettings.from_config(config, norm_scale=1.0)
  step = jax.jit(functools.partial(train.train_step, settings=settings, optimizer=optimizer),
                 in_shardings=(state_sh, batch_sh, None), out_shardings=(state_sh, None))
  source = data.make_source(config)
  hparams = train.hyperparams(config)
  for i in range(steps):
    state, metrics = step(state, jax.device_put(source.batch(i) / source.norm_scale, batch_sh),
                          hparams)
  return jax.device_get((state.params, state.family_state, metrics))


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_steps_equal_single_device(family):
  assert jax.device_count() == 8
  config = _config(family)
  config.data.batch_size = 256
  want = _sharded_steps(config, (1, 1))
  assert want[2]["aux" if "aux" in want[2] else "loss"] >= 0
  for mesh_shape in [(8, 1), (1, 8), (2, 4)]:
    got = _sharded_steps(config, mesh_shape)
    for a, b in zip(jax.tree.leaves(want[:2]), jax.tree.leaves(got[:2])):
      scale = np.abs(a).max() + 1e-12
      np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * scale, err_msg=f"{mesh_shape}")


@pytest.mark.parametrize("family", ["topk", "batchtopk"])
def test_latent_sharded_selection_is_global(family):
  """On a 1x8 mesh the top k is the global one: equal to one device, and different
  from a per-shard top k (which would keep k latents in each of the 8 shards)."""
  from ml_collections import ConfigDict
  fam = jsae.saes.get(family)
  params = fam.init(jax.random.key(0), d_in=16, d_sae=64, k=4)
  x = jax.random.normal(jax.random.key(1), (32, 16))
  single = np.asarray(jax.jit(fam.encode)(params, x))
  mesh = sharding.make_mesh(ConfigDict(dict(data=1, model=8)))
  specs = sharding.named(mesh, fam.param_specs(params))
  sharded = jax.jit(fam.encode)(jax.device_put(params, specs), x)
  np.testing.assert_array_equal(np.asarray(sharded) != 0, single != 0)
  np.testing.assert_allclose(np.asarray(sharded), single, rtol=1e-5)
  per_row = (single != 0).sum(-1)
  assert per_row.mean() == pytest.approx(4.0) and per_row.max() < 8 * 4 / 2


def test_batchtopk_resume_is_exact_including_the_threshold(tmp_path):
  """N steps + restart + N steps = 2N steps, the family state (running threshold) too."""
  def config(steps):
    c = _config("batchtopk")
    c.train.num_tokens = steps * c.data.batch_size
    c.ckpt.every_steps = 40
    return c
  straight = train.train(config(80), tmp_path / "straight", progress=False)
  train.train(config(40), tmp_path / "resumed", progress=False)
  resumed = train.train(config(80), tmp_path / "resumed", progress=False)
  for a, b in zip(jax.tree.leaves((straight.state.params, straight.state.family_state)),
                  jax.tree.leaves((resumed.state.params, resumed.state.family_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(resumed.state.family_state.count) == 80
