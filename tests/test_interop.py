"""The SAE object and interop: folding, formats, round trips, sharding, runs, bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as st

import jsae
from configs import tiny
from jsae import data, formats as interop, runs, saes, train
from jsae.formats import FormatError
from jsae.sae import SAE
from jsae.saes.jumprelu import family as JUMPRELU
fold_decoder_norms = JUMPRELU.fold_decoder_norms

FAMILY = jsae.saes.get("jumprelu")
C = 37.5
D_IN, D_SAE = 16, 32


def _training_params(*, log_threshold=False, pre_encoder_bias=True, seed=0):
  """Training-time params with non-trivial biases and thresholds (normalised units)."""
  k = jax.random.split(jax.random.key(seed), 4)
  p = FAMILY.init(k[0], d_in=D_IN, d_sae=D_SAE, log_threshold=log_threshold,
                  pre_encoder_bias=pre_encoder_bias)
  theta = jax.random.uniform(k[1], (D_SAE,), minval=0.02, maxval=0.2)
  return p.replace(
      b_dec=0.1 * jax.random.normal(k[2], (D_IN,)),
      b_enc=0.05 * jax.random.normal(k[3], (D_SAE,)),
      threshold=jnp.log(theta) if log_threshold else theta)


def _normalised_x(n=64, seed=1):
  """Inputs with E||x||^2 ~ 1 (training units)."""
  x = np.asarray(jax.random.normal(jax.random.key(seed), (n, D_IN))) / np.sqrt(D_IN)
  return x.astype(np.float32)


def _sae(provenance=None):
  prov = {"model": "google/gemma-3-270m", "hook_site": "resid_post", "layer": 6,
          "excluded_tokens": ["<bos>"], "extra": {"a": [1, 2]}}
  return SAE.from_training(_training_params(), C, provenance or prov)


def _raw_x(n=64, seed=1):
  return np.float32(C) * _normalised_x(n, seed)


# ----------------------------------------------------------------------------- folding


@pytest.mark.parametrize("log_threshold", [False, True])
@pytest.mark.parametrize("pre_encoder_bias", [True, False])
def test_folding_matches_training_time_sae(log_threshold, pre_encoder_bias):
  """Exported SAE on raw x: same firing pattern, latents x C, reconstruction x C."""
  params = _training_params(log_threshold=log_threshold, pre_encoder_bias=pre_encoder_bias)
  x_norm = _normalised_x()
  f_train = np.asarray(FAMILY.encode(params, x_norm))
  x_hat_train = np.asarray(FAMILY.decode(params, f_train))
  assert 0.05 < (f_train != 0).mean() < 0.95  # a non-trivial firing pattern

  sae = SAE.from_training(params, C)
  assert sae.params.pre_encoder_bias is False and sae.params.log_threshold is False
  assert sae.provenance["norm_scale"] == C
  f_raw = np.asarray(sae.encode(C * x_norm))
  np.testing.assert_array_equal(f_raw != 0, f_train != 0)
  np.testing.assert_allclose(f_raw, C * f_train, rtol=2e-5, atol=2e-5 * C)
  np.testing.assert_allclose(np.asarray(sae(C * x_norm)), C * x_hat_train,
                             rtol=2e-5, atol=2e-5 * C)


def test_folding_algebra():
  """b_enc' = C (b_enc - b_dec @ W_enc), theta' = C theta, b_dec' = C b_dec, W unchanged."""
  p = _training_params()
  sae = SAE.from_training(p, C)
  W_enc, b_enc, b_dec = (np.asarray(a, np.float64) for a in (p.W_enc, p.b_enc, p.b_dec))
  np.testing.assert_allclose(sae.params.b_enc, C * (b_enc - b_dec @ W_enc), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(sae.params.b_dec, C * b_dec, rtol=1e-6)
  np.testing.assert_allclose(sae.threshold, C * np.asarray(p.threshold), rtol=1e-6)
  np.testing.assert_array_equal(sae.params.W_enc, p.W_enc)
  np.testing.assert_array_equal(sae.params.W_dec, p.W_dec)


def test_decoder_norm_folding():
  """Non-unit decoder rows: latents scale by the row norms, reconstruction unchanged."""
  p = _training_params(pre_encoder_bias=False)
  norms = np.linspace(0.5, 3.0, D_SAE).astype(np.float32)
  p = p.replace(W_dec=p.W_dec * norms[:, None])
  sae = SAE.from_training(p, C)
  folded = sae.fold_decoder_norms()
  x = _raw_x()
  f, f2 = np.asarray(sae.encode(x)), np.asarray(folded.encode(x))
  np.testing.assert_array_equal(f != 0, f2 != 0)
  np.testing.assert_allclose(f2, f * norms, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(folded(x), sae(x), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(folded.params.W_dec, axis=1), 1.0, rtol=1e-6)
  assert folded.provenance["decoder_norm_folded"] is True
  # A zero row is left alone instead of dividing by zero.
  z = fold_decoder_norms(sae.params.replace(W_dec=sae.params.W_dec.at[0].set(0.0)))
  assert np.all(np.isfinite(np.asarray(z.W_dec)))


# ----------------------------------------------------------------------------- formats


def _save_kwargs(fmt):
  return {"gemma_scope": dict(layer=6, average_l0=71),
          "gemma_scope_2": dict(layer=6, l0="small")}.get(fmt, {})


@pytest.mark.parametrize("fmt", interop.FORMATS)
def test_round_trip_identical_encodings(tmp_path, fmt):
  sae = _sae()
  x = _raw_x()
  out = jsae.save(sae, tmp_path / "out", format=fmt, **_save_kwargs(fmt))
  assert interop.detect_format(out)[0] == fmt
  loaded = jsae.load(out)
  np.testing.assert_array_equal(loaded.encode(x), sae.encode(x))
  np.testing.assert_array_equal(loaded(x), sae(x))
  for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
    np.testing.assert_array_equal(getattr(loaded.params, k), getattr(sae.params, k))
  if fmt == "gemma_scope":  # params.npz has no room for provenance; the path has some
    assert out == tmp_path / "out/layer_6/width_32/average_l0_71/params.npz"
    assert loaded.provenance["layer"] == 6 and loaded.provenance["average_l0"] == 71
    assert jsae.load(out.parent).provenance["layer"] == 6  # the folder loads too
  else:
    assert loaded.provenance == sae.provenance
  # Explicit format, and a file inside the folder, load the same SAE.
  again = jsae.load(out if out.is_file() else next(out.glob("*.safetensors")), format=fmt)
  np.testing.assert_array_equal(again.encode(x), sae.encode(x))


@pytest.mark.parametrize("fmt", ["jsae", "saelens"])
def test_round_trip_bfloat16(tmp_path, fmt):
  sae = _sae().astype(jnp.bfloat16)
  out = jsae.save(sae, tmp_path / fmt, format=fmt)
  loaded = jsae.load(out)
  assert loaded.dtype == jnp.bfloat16 and loaded.threshold.dtype == jnp.float32
  x = _raw_x()
  np.testing.assert_array_equal(loaded.encode(x), sae.encode(x))


def test_gemma_scope_2_layout_and_config(tmp_path):
  out = jsae.save(_sae(), tmp_path, format="gemma_scope_2", layer=6, l0="small")
  assert out == tmp_path / "resid_post/layer_6_width_32_l0_small"
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["width"] == D_SAE and cfg["type"] == "sae" and cfg["l0"] == "small"
  assert cfg["architecture"] == "jump_relu" and cfg["affine_connection"] is False
  assert cfg["hf_hook_point_in"] == "model.layers.6.output"
  keys = set(st.load_file(str(out / "params.safetensors")))
  assert keys == {"w_enc", "w_dec", "b_enc", "b_dec", "threshold"}


def test_saelens_cfg_fields(tmp_path):
  out = jsae.save(_sae(), tmp_path, format="saelens")
  cfg = json.loads((out / "cfg.json").read_text())
  assert cfg["architecture"] == "jumprelu" and cfg["apply_b_dec_to_input"] is False
  assert cfg["normalize_activations"] == "none"
  assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, D_SAE, "float32")
  assert cfg["metadata"]["hook_name"] == "blocks.6.hook_resid_post"
  assert cfg["metadata"]["model_name"] == "google/gemma-3-270m"
  assert set(st.load_file(str(out / "sae_weights.safetensors"))) == {
      "W_enc", "W_dec", "b_enc", "b_dec", "threshold"}


def _write_saelens(folder, weights, **cfg):
  folder.mkdir(parents=True, exist_ok=True)
  st.save_file({k: np.asarray(v, np.float32) for k, v in weights.items()},
               str(folder / "sae_weights.safetensors"))
  base = dict(architecture="jumprelu", d_in=D_IN, d_sae=D_SAE, dtype="float32",
              apply_b_dec_to_input=False, normalize_activations="none",
              metadata=dict(model_name="gpt2", hook_name="blocks.3.hook_resid_pre"))
  (folder / "cfg.json").write_text(json.dumps({**base, **cfg}))
  return folder


def test_saelens_log_threshold_and_pre_encoder_bias(tmp_path):
  """Older SAELens files: log_threshold key, apply_b_dec_to_input folded on load."""
  p = _training_params(pre_encoder_bias=True)
  w = dict(W_enc=p.W_enc, W_dec=p.W_dec, b_enc=p.b_enc, b_dec=p.b_dec,
           log_threshold=np.log(np.asarray(p.threshold)))
  sae = jsae.load(_write_saelens(tmp_path / "sl", w, apply_b_dec_to_input=True))
  x = _normalised_x()
  expected = np.asarray(FAMILY.encode(p, x))  # (x - b_dec) @ W_enc + b_enc, same theta
  np.testing.assert_array_equal(np.asarray(sae.encode(x)) != 0, expected != 0)
  np.testing.assert_allclose(sae.encode(x), expected, rtol=1e-5, atol=1e-6)
  assert sae.provenance["hook_site"] == "resid_pre" and sae.provenance["layer"] == 3
  assert sae.provenance["model"] == "gpt2"


def test_hand_built_gemma_scope_npz(tmp_path):
  """The published layout, built by hand, encodes to a hand-computed result."""
  folder = tmp_path / "gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82"
  folder.mkdir(parents=True)
  W_enc = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], np.float32)  # [d_in=2, d_sae=3]
  W_dec = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], np.float32)  # [d_sae, d_in]
  b_enc = np.array([0.0, -0.5, 0.0], np.float32)
  b_dec = np.array([0.25, -0.25], np.float32)
  threshold = np.array([0.5, 0.5, 2.5], np.float32)
  np.savez(folder / "params.npz", W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec,
           threshold=threshold)
  x = np.array([[1.0, 1.0], [0.2, 3.0]], np.float32)
  # Row 0: pi = [1, 0.5, 2] vs theta [0.5, 0.5, 2.5] -> only latent 0 fires (0.5 is not > 0.5).
  # Row 1: pi = [0.2, 2.5, 3.2] -> latents 1 and 2 fire. No b_dec subtraction.
  f_expected = np.array([[1.0, 0.0, 0.0], [0.0, 2.5, 3.2]], np.float32)
  x_hat_expected = np.array([[1.25, -0.25], [3.45, 7.95]], np.float32)
  sae = jsae.load(folder)
  np.testing.assert_allclose(sae.encode(x), f_expected, rtol=1e-6)
  np.testing.assert_allclose(sae(x), x_hat_expected, rtol=1e-6)
  prov = sae.provenance
  assert (prov["layer"], prov["width"], prov["average_l0"]) == (12, "16k", 82)
  assert prov["model"] == "google/gemma-2-2b" and prov["hook_site"] == "resid_post"
  # Lowercase keys (some releases) and the npz file path load the same.
  np.savez(tmp_path / "lower.npz", w_enc=W_enc, w_dec=W_dec, b_enc=b_enc, b_dec=b_dec,
           threshold=threshold)
  np.testing.assert_allclose(jsae.load(tmp_path / "lower.npz").encode(x), f_expected,
                             rtol=1e-6)
  # Against numpy on random inputs.
  xr = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32) * 2
  pre = xr @ W_enc + b_enc
  np.testing.assert_allclose(sae.encode(xr), pre * (pre > threshold), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- the SAE object


def test_jit_and_sharded_encode():
  sae, x = _sae(), _raw_x(n=16)
  expected = np.asarray(sae.encode(x))
  encode = jax.jit(lambda s, x: s.encode(x))
  np.testing.assert_array_equal(encode(sae, x), expected)

  devices = np.array(jax.devices()[:8]).reshape(2, 4)
  assert devices.size == 8, "conftest should fake 8 CPU devices"
  mesh = jax.sharding.Mesh(devices, ("data", "model"))
  sharded = sae.shard(mesh)
  assert sharded.params.W_enc.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  assert len(sharded.params.W_enc.addressable_shards) == 8
  assert sharded.params.W_enc.addressable_shards[0].data.shape == (D_IN, D_SAE // 4)
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      "data", None)))
  f = encode(sharded, xs)
  np.testing.assert_allclose(f, expected, rtol=1e-6, atol=1e-6)
  assert f.sharding.spec == jax.sharding.PartitionSpec("data", "model")
  np.testing.assert_allclose(jax.jit(lambda s, x: s(x))(sharded, xs), sae(x), rtol=1e-5,
                             atol=1e-4)


def test_explicit_mesh_inference():
  """On a jax.make_mesh (explicit axes) mesh, decode and top-k resolve their shardings."""
  sae, x = _sae(), _raw_x(n=16)
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  sharded = sae.shard(mesh)
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      "data", None)))
  run = jax.jit(lambda s, x: (s.encode(x), s(x), s.encode_topk(x, 4),
                              s.decode_topk(s.encode_topk(x, D_SAE))))
  f, x_hat, top, x_hat_sparse = run(sharded, xs)
  np.testing.assert_allclose(f, sae.encode(x), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(x_hat, sae(x), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(top.values, sae.encode_topk(x, 4).values, rtol=1e-6)
  np.testing.assert_allclose(x_hat_sparse, sae(x), rtol=1e-5, atol=1e-4)


def test_encode_topk_matches_numpy():
  sae, x = _sae(), _raw_x()
  f = np.asarray(sae.encode(x))
  k = 5
  top = jax.jit(lambda s, x: s.encode_topk(x, k))(sae, x)
  assert top.values.shape == (x.shape[0], k) and top.indices.dtype == jnp.int32
  expected = -np.sort(-f, axis=-1)[:, :k]
  np.testing.assert_array_equal(top.values, expected)
  np.testing.assert_array_equal(np.take_along_axis(f, np.asarray(top.indices), -1),
                                top.values)
  approx = sae.encode_topk(x, k, approx=True)
  np.testing.assert_array_equal(approx.values, expected)
  # All latents kept: the sparse decode equals the dense one.
  np.testing.assert_allclose(sae.decode_topk(sae.encode_topk(x, D_SAE)), sae(x), rtol=1e-5,
                             atol=1e-4)
  with pytest.raises(ValueError, match="k must be"):
    sae.encode_topk(x, D_SAE + 1)


def test_bfloat16_inference_close_to_float32():
  sae, x = _sae(), _raw_x(n=256)
  bf = sae.astype(jnp.bfloat16)
  assert bf.params.W_enc.dtype == jnp.bfloat16 and bf.params.W_dec.dtype == jnp.bfloat16
  assert bf.threshold.dtype == jnp.float32
  f32, f16 = np.asarray(sae.encode(x)), np.asarray(jax.jit(lambda s, x: s.encode(x))(bf, x))
  assert f16.dtype == np.float32
  assert ((f32 != 0) == (f16 != 0)).mean() > 0.98  # only latents right at theta may flip
  rel = np.linalg.norm(bf(x) - sae(x)) / np.linalg.norm(sae(x))
  assert rel < 0.05, rel


def test_splice_helpers():
  sae, x = _sae(), _raw_x(n=8)
  x_hat, err = sae.reconstruct_with_error(x)
  np.testing.assert_allclose(x_hat, sae(x), rtol=1e-6)
  np.testing.assert_allclose(x_hat + err, x, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(sae.splice_fn(keep_error=False)(x), sae(x))
  keep = sae.splice_fn(keep_error=True)
  np.testing.assert_allclose(keep(x), x, rtol=1e-5, atol=1e-4)
  # Gradients flow through the SAE only, not through the error term.
  g_keep = jax.grad(lambda x: jnp.sum(keep(x)))(x)
  g_sae = jax.grad(lambda x: jnp.sum(sae(x)))(x)
  np.testing.assert_allclose(g_keep, g_sae, rtol=1e-5, atol=1e-5)
  assert not np.allclose(g_keep, 1.0)
  assert keep(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_sae_is_a_pytree_with_provenance_beside_it():
  sae = _sae()
  leaves = jax.tree.leaves(sae)
  assert len(leaves) == 5
  assert hash(jax.tree.structure(sae)) is not None  # static metadata is hashable
  assert sae.provenance["extra"] == {"a": [1, 2]}
  assert "model='google/gemma-3-270m'" in repr(sae)
  # Not in the tree: SAEs of other provenances share a tree structure; methods keep it,
  # a JAX transformation's rebuilt SAE has none (never another SAE's).
  other = _sae({"model": "other"})
  assert jax.tree.structure(other) == jax.tree.structure(sae)
  assert sae.astype(jnp.bfloat16).provenance == sae.provenance
  assert jax.tree.map(lambda a: a, sae).provenance == {}
  assert jax.jit(lambda s: s)(other).provenance == {}


def _saved_saes(tmp_path, n=5):
  """`n` different SAEs of one family and shape, saved and loaded back (jsae format)."""
  out = []
  for i in range(n):
    sae = SAE.from_training(_training_params(seed=i), C, {"member": i, "model": "m"})
    out.append(jsae.load(jsae.save(sae, tmp_path / f"sae{i}", "jsae")))
  return out


def test_loaded_saes_share_one_compiled_function(tmp_path):
  loaded = _saved_saes(tmp_path)
  traces = []

  @jax.jit
  def encode(sae, x):
    traces.append(1)  # runs once per trace, i.e. per compilation
    return sae.encode(x)

  x = _raw_x()
  for sae in loaded:
    np.testing.assert_array_equal(encode(sae, x), sae.encode(x))
  assert len(traces) == 1


def test_stacked_saes_vmap_to_the_members_encodings(tmp_path):
  loaded = _saved_saes(tmp_path, n=3)
  batch = jsae.stack(loaded)
  assert batch.params.W_enc.shape == (3, D_IN, D_SAE)
  x = _raw_x()
  f = jax.jit(jax.vmap(lambda s, x: s.encode(x), in_axes=(0, None)))(batch, x)
  x_hat = jax.vmap(lambda s, f: s.decode(f))(batch, f)
  for i, sae in enumerate(loaded):
    np.testing.assert_allclose(f[i], sae.encode(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x_hat[i], sae(x), rtol=1e-5, atol=1e-5)
  back = jsae.unstack(batch)
  assert [s.provenance["member"] for s in back] == [0, 1, 2]
  np.testing.assert_array_equal(back[1].encode(x), loaded[1].encode(x))
  # Other families or shapes do not stack.
  relu = SAE.from_training(saes.get("relu").init(jax.random.key(0), d_in=D_IN, d_sae=D_SAE), C)
  with pytest.raises(ValueError, match="family and settings"):
    jsae.stack([loaded[0], relu])
  with pytest.raises(ValueError, match="shapes or dtypes"):
    jsae.stack([loaded[0], loaded[1].astype(jnp.bfloat16)])
  with pytest.raises(ValueError, match="at least one"):
    jsae.stack([])


def test_load_reads_a_training_run(tiny_run):
  config, workdir, _ = tiny_run
  x = np.asarray(data.make_source(config).batch(0))
  np.testing.assert_array_equal(jsae.load(workdir).encode(x), runs.read_sae(workdir).encode(x))


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config = tiny.get_config()
  config.train.num_tokens = 50 * 512
  config.ckpt.every_steps = 50
  result = train.train(config, workdir, progress=False)
  return config, workdir, result


def test_from_run_encodes_raw_activations(tiny_run, tmp_path):
  config, workdir, result = tiny_run
  source = data.make_source(config)
  x_raw = np.asarray(source.batch(0))
  norm_scale = source.norm_scale
  assert norm_scale != 1.0
  sae = runs.read_sae(workdir)
  params = result.state.params
  f_train = np.asarray(FAMILY.encode(params, x_raw / norm_scale))
  f = np.asarray(sae.encode(x_raw))
  assert (f != 0).any()
  np.testing.assert_array_equal(f != 0, f_train != 0)
  np.testing.assert_allclose(f, norm_scale * f_train, rtol=1e-4, atol=1e-5)
  x_hat_train = np.asarray(FAMILY.decode(params, f_train))
  np.testing.assert_allclose(sae(x_raw), norm_scale * x_hat_train, rtol=1e-4, atol=1e-4)
  prov = sae.provenance
  assert prov["norm_scale"] == pytest.approx(norm_scale) and prov["step"] == 50
  # export -> load gives the same SAE.
  out = interop.export(workdir, tmp_path / "sl", "saelens")
  np.testing.assert_array_equal(jsae.load(out).encode(x_raw), f)
  with pytest.raises(FileExistsError, match="overwrite"):
    interop.export(workdir, tmp_path / "sl", "saelens")
  np.testing.assert_array_equal(runs.read_sae(workdir, step=50).encode(x_raw), f)
  with pytest.raises(FileNotFoundError, match=r"no finished checkpoint at step 7.*\[50\]"):
    runs.read_sae(workdir, step=7)


def test_from_run_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such run directory"):
    runs.read_sae(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="not a jsae run directory"):
    runs.read_sae(tmp_path)
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
    runs.read_sae(tmp_path)


# ----------------------------------------------------------------------------- bad input


def test_unknown_folder_lists_contents_and_formats(tmp_path):
  (tmp_path / "weights.bin").write_bytes(b"x")
  (tmp_path / "notes.txt").write_text("hi")
  with pytest.raises(FormatError) as e:
    jsae.load(tmp_path)
  msg = str(e.value)
  assert "weights.bin" in msg and "notes.txt" in msg
  for fmt in interop.FORMATS:
    assert fmt in msg
  with pytest.raises(FileNotFoundError):
    jsae.load(tmp_path / "missing")
  with pytest.raises(ValueError, match="unknown SAE format"):
    jsae.load(tmp_path, format="pickle")


def _good_arrays():
  sae = _sae()
  return {k: np.array(getattr(sae.params, k)) for k in
          ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}


@pytest.mark.parametrize("case,match", [
    ("missing", r"params\.npz: missing key\(s\) \['threshold'\]"),
    ("short_threshold", r"params\.npz: key 'threshold' has shape \(31,\); expected"
                        r" threshold \[d_sae\] = \(32,\)"),
    ("bad_W_dec", r"key 'W_dec' has shape \(16, 32\); expected W_dec \[d_sae, d_in\]"),
    ("nan", r"key 'b_enc' holds NaN"),
])
def test_bad_npz(tmp_path, case, match):
  arrays = _good_arrays()
  if case == "missing":
    del arrays["threshold"]
  elif case == "short_threshold":
    arrays["threshold"] = arrays["threshold"][:-1]
  elif case == "bad_W_dec":
    arrays["W_dec"] = arrays["W_dec"].T.copy()
  elif case == "nan":
    arrays["b_enc"][3] = np.nan
  np.savez(tmp_path / "params.npz", **arrays)
  with pytest.raises(FormatError, match=match):
    jsae.load(tmp_path)


def test_config_claiming_other_d_in(tmp_path):
  out = jsae.save(_sae(), tmp_path / "j", format="jsae")
  cfg = json.loads((out / "config.json").read_text())
  cfg["d_in"] = 99
  (out / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(FormatError, match=r"config\.json: key 'd_in' is 99.*d_in = 16"):
    jsae.load(out)
  sl = jsae.save(_sae(), tmp_path / "s", format="saelens")
  cfg = json.loads((sl / "cfg.json").read_text())
  cfg["d_sae"] = 64
  (sl / "cfg.json").write_text(json.dumps(cfg))
  with pytest.raises(FormatError, match=r"cfg\.json: key 'd_sae' is 64"):
    jsae.load(sl)


def test_unsupported_variants_are_refused(tmp_path):
  w = _good_arrays()
  with pytest.raises(FormatError, match="key 'architecture' is 'matching_pursuit'"):
    jsae.load(_write_saelens(tmp_path / "mp", w, architecture="matching_pursuit"))
  with pytest.raises(FormatError, match="normalize_activations"):
    jsae.load(_write_saelens(tmp_path / "ln", w, normalize_activations="layer_norm"))
  gs2 = jsae.save(_sae(), tmp_path / "gs2", format="gemma_scope_2")
  cfg = json.loads((gs2 / "config.json").read_text())
  (gs2 / "config.json").write_text(json.dumps({**cfg, "type": "clt"}))
  with pytest.raises(FormatError, match="key 'type' is 'clt'.*cross-layer"):
    jsae.load(gs2)
  (gs2 / "config.json").write_text(json.dumps({**cfg, "width": 7}))
  with pytest.raises(FormatError, match="key 'width' is 7"):
    jsae.load(gs2)
  j = jsae.save(_sae(), tmp_path / "j", format="jsae")
  (j / "config.json").write_text("{not json")
  with pytest.raises(FormatError, match=r"config\.json: not valid JSON"):
    jsae.load(j)


def test_save_options_are_checked(tmp_path):
  sae = _sae()
  with pytest.raises(TypeError, match="unexpected option"):
    jsae.save(sae, tmp_path, format="jsae", layer=3)
  with pytest.raises(ValueError, match="average_l0"):
    jsae.save(sae, tmp_path, format="gemma_scope", layer=3)
  out = jsae.save(sae, tmp_path / "a.npz", format="gemma_scope")
  assert out == tmp_path / "a.npz" and out.is_file()
  with pytest.raises(FileExistsError):
    jsae.save(sae, tmp_path / "a.npz", format="gemma_scope")
  jsae.save(sae, tmp_path / "a.npz", format="gemma_scope", overwrite=True)
  assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
