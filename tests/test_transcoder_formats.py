"""Transcoders in every format that holds one (jsae, gemma_scope_2, saelens): round trips
with and without the affine skip, the files' layout, bad input, and a training run's export.

SAELens's own files are checked in tests/test_saelens_fixtures.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as st

import jsae
from configs import tiny
from jsae import formats, runs, saes, train
from jsae.formats import FormatError, gemma_scope_2
from jsae.sae import SAE

D_IN, D_SAE, D_OUT = 8, 16, 6
C_IN, C_OUT = 3.0, 5.0  # norm scales of x and y: folding scales W_dec and W_skip too
PROV = {"model": "google/gemma-3-270m", "hook_site": "mlp_in.6", "target_site": "mlp_out.6"}
# format -> the families it holds as transcoders.
HELD = {"jsae": ("jumprelu", "relu", "topk"), "gemma_scope_2": ("jumprelu",),
        "saelens": ("jumprelu", "relu")}
CASES = [(fmt, family, skip, d_out) for fmt, fams in HELD.items() for family in fams
         for skip in (False, True) for d_out in (D_OUT, D_IN)]


def _transcoder(family="jumprelu", skip=True, d_out=D_OUT, seed=0, prov=PROV) -> SAE:
  """A transcoder with non-trivial biases, thresholds and skip, folded from training units."""
  k = jax.random.split(jax.random.key(seed), 5)
  extra = {"k": 4} if family == "topk" else {}
  p = saes.get(family).init(k[0], d_in=D_IN, d_sae=D_SAE, d_out=d_out, skip=skip,
                            pre_encoder_bias=False, **extra)
  p = p.replace(b_enc=0.1 * jax.random.normal(k[1], (D_SAE,)),
                b_dec=0.3 * jax.random.normal(k[2], (d_out,)))
  if family == "jumprelu":
    p = p.replace(threshold=jax.random.uniform(k[3], (D_SAE,), minval=0.02, maxval=0.15))
  if skip:
    p = p.replace(W_skip=0.5 * jax.random.normal(k[4], (D_IN, d_out)))
  return SAE.from_training(p, (C_IN, C_OUT), prov, transcoder=True)


def _x(n=32, seed=1):
  return np.asarray(C_IN * jax.random.normal(jax.random.key(seed), (n, D_IN)) / np.sqrt(D_IN),
                    np.float32)


def _save(sae, path, fmt, **kw):
  layout = {"gemma_scope_2": dict(layer=6, l0="small")}.get(fmt, {})
  return jsae.save(sae, path, format=fmt, **{**layout, **kw})


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt,family,skip,d_out", CASES)
def test_round_trip_identical_outputs(tmp_path, fmt, family, skip, d_out):
  """Save then load: the same transcoder flag, d_out, skip, weights, encodings and outputs."""
  sae, x = _transcoder(family, skip, d_out), _x()
  f = np.asarray(sae.encode(x))
  assert 0 < (f != 0).mean() < 1  # both sides of every cut are exercised
  if skip:  # dropping W_skip would change the outputs
    assert np.abs(np.asarray(sae(x)) - np.asarray(sae.decode(sae.encode(x)))).max() > 0.1
  out = _save(sae, tmp_path / "out", fmt)
  assert formats.detect_format(out)[0] == fmt
  loaded = jsae.load(out)
  assert loaded.transcoder is True and loaded.family == family
  assert (loaded.d_in, loaded.d_sae, loaded.d_out) == (D_IN, D_SAE, d_out)
  assert (loaded.params.W_skip is None) == (not skip)
  for k in saes.base.array_fields(sae.params):
    if getattr(sae.params, k) is not None:
      np.testing.assert_array_equal(getattr(loaded.params, k), getattr(sae.params, k), k)
  np.testing.assert_array_equal(loaded.encode(x), f)
  np.testing.assert_array_equal(loaded(x), sae(x))
  assert loaded.provenance["target_site"] == "mlp_out.6"
  if family == "topk":
    assert loaded.k == sae.k


@pytest.mark.parametrize("fmt", ["gemma_scope_2", "saelens"])
@pytest.mark.parametrize("skip", [False, True])
def test_third_party_reader_view(tmp_path, fmt, skip):
  """Without jsae's provenance (what another tool's file has), the config alone says it is
  a transcoder, even one of equal widths and no skip, and names both sites."""
  sae, x = _transcoder(skip=skip, d_out=D_IN), _x()
  out = _save(sae, tmp_path / "out", fmt)
  cfg_file = out / ("config.json" if fmt == "gemma_scope_2" else "cfg.json")
  cfg = json.loads(cfg_file.read_text())
  if fmt == "gemma_scope_2":
    del cfg["jsae_provenance"]
  else:
    del cfg["metadata"]["jsae_provenance"]
  cfg_file.write_text(json.dumps(cfg))
  loaded = jsae.load(out)
  assert loaded.transcoder is True and (loaded.params.W_skip is not None) == skip
  np.testing.assert_array_equal(loaded(x), sae(x))
  prov = loaded.provenance
  assert (prov["hook_site"], prov["layer"], prov["target_site"]) == ("mlp_in", 6, "mlp_out.6")
  assert prov["source_format"] == fmt


def test_sae_stays_an_sae(tmp_path):
  """An SAE saved in each format loads as an SAE (transcoder False, no skip)."""
  p = saes.get("jumprelu").init(jax.random.key(0), d_in=D_IN, d_sae=D_SAE)
  sae = SAE.from_training(p, C_IN, {"hook_site": "resid_post", "layer": 6})
  for fmt in formats.FORMATS:
    loaded = jsae.load(_save(sae, tmp_path / fmt, fmt,
                             **({"layer": 6, "average_l0": 5} if fmt == "gemma_scope" else {})))
    assert loaded.transcoder is False and loaded.params.W_skip is None, fmt


# ----------------------------------------------------------------------------- layouts


def test_jsae_config(tmp_path):
  out = _save(_transcoder(skip=True), tmp_path / "j", "jsae")
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["format_version"] == 3 and cfg["transcoder"] is True and cfg["skip"] is True
  assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"]) == (D_IN, D_SAE, D_OUT)
  assert (cfg["hook_site"], cfg["target_site"]) == ("mlp_in.6", "mlp_out.6")
  assert cfg["inference"].endswith("y_hat = f @ W_dec + b_dec + x @ W_skip")
  assert st.load_file(str(out / "sae.safetensors"))["W_skip"].shape == (D_IN, D_OUT)
  plain = json.loads((_save(_transcoder(skip=False), tmp_path / "p", "jsae")
                      / "config.json").read_text())
  assert plain["skip"] is False and plain["transcoder"] is True
  # An SAE is still written as version 2, which older jsae reads.
  p = saes.get("relu").init(jax.random.key(0), d_in=D_IN, d_sae=D_SAE)
  sae_cfg = json.loads((_save(SAE.from_training(p, 1.0), tmp_path / "s", "jsae")
                        / "config.json").read_text())
  assert sae_cfg["format_version"] == 2 and "transcoder" not in sae_cfg


@pytest.mark.parametrize("skip", [False, True])
def test_gemma_scope_2_layout(tmp_path, skip):
  sae = _transcoder(skip=skip)
  out = _save(sae, tmp_path, "gemma_scope_2")
  assert out == tmp_path / "transcoder" / ("layer_6_width_16_l0_small" + ("_affine" * skip))
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["type"] == "transcoder" and cfg["affine_connection"] is skip
  assert cfg["architecture"] == "jump_relu" and cfg["width"] == D_SAE
  assert cfg["hf_hook_point_in"] == "model.layers.6.pre_feedforward_layernorm.output"
  assert cfg["hf_hook_point_out"] == "model.layers.6.post_feedforward_layernorm.output"
  w = st.load_file(str(out / "params.safetensors"))
  assert set(w) == {"w_enc", "w_dec", "b_enc", "b_dec", "threshold"} | (
      {"affine_skip_connection"} if skip else set())
  assert w["w_dec"].shape == (D_SAE, D_OUT) and w["b_dec"].shape == (D_OUT,)
  if skip:  # Gemma Scope 2 stores it [d_in, d_out], as jsae's W_skip
    np.testing.assert_array_equal(w["affine_skip_connection"], sae.params.W_skip)


@pytest.mark.parametrize("family,skip,arch", [
    ("relu", False, "transcoder"), ("relu", True, "skip_transcoder"),
    ("jumprelu", False, "jumprelu_transcoder"), ("jumprelu", True, "jumprelu_skip_transcoder")])
def test_saelens_layout(tmp_path, family, skip, arch):
  sae = _transcoder(family, skip)
  out = _save(sae, tmp_path, "saelens")
  cfg = json.loads((out / "cfg.json").read_text())
  assert cfg["architecture"] == arch and cfg["d_out"] == D_OUT
  assert cfg["apply_b_dec_to_input"] is False  # SAELens refuses true for transcoders
  assert cfg["metadata"]["hook_name"] == "blocks.6.hook_mlp_in"
  assert cfg["metadata"]["hook_name_out"] == "blocks.6.hook_mlp_out"
  w = st.load_file(str(out / "sae_weights.safetensors"))
  if skip:  # SAELens's W_skip is [d_out, d_in] (its output adds x @ W_skip.T)
    np.testing.assert_array_equal(w["W_skip"], np.asarray(sae.params.W_skip).T)
  else:
    assert "W_skip" not in w


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("skip", [False, True])
def test_gemma_scope_refuses_transcoders(tmp_path, skip):
  """Gemma Scope 1 holds SAEs only: refused before anything is written, naming the fix."""
  with pytest.raises(FormatError, match=r"holds SAEs only.*'jsae'.*'gemma_scope_2'") as e:
    jsae.save(_transcoder(skip=skip), tmp_path / "gs", format="gemma_scope", layer=6,
              average_l0=5)
  assert ("skip transcoder" in str(e.value)) == skip
  assert not (tmp_path / "gs").exists()


@pytest.mark.parametrize("fmt,match", [
    ("saelens", r"'topk' skip transcoder cannot be saved as saelens: that format holds"
                r" jumprelu and relu transcoders only\. Use format='jsae'\.$"),
    ("gemma_scope_2", r"'topk' skip transcoder cannot be saved as gemma_scope_2:.*"
                      r"Use format='jsae'\.$")])
def test_topk_transcoder_only_in_jsae(tmp_path, fmt, match):
  with pytest.raises(FormatError, match=match):
    _save(_transcoder("topk"), tmp_path / "out", fmt)
  assert not (tmp_path / "out").exists()


def test_relu_transcoder_not_in_gemma_scope_2(tmp_path):
  with pytest.raises(FormatError, match=r"holds jumprelu transcoders only\. Use"
                                        r" format='jsae' or 'saelens'"):
    _save(_transcoder("relu"), tmp_path / "out", "gemma_scope_2")
  assert not (tmp_path / "out").exists()


def test_skip_refused_where_a_format_has_no_place_for_it(tmp_path, monkeypatch):
  """A format holding transcoders but no skip refuses a skip transcoder (and not a plain one)."""
  monkeypatch.setattr(gemma_scope_2, "HOLDS_SKIP", False)
  with pytest.raises(FormatError, match=r"no place for the affine skip W_skip\. Use"
                                        r" format='jsae' or 'saelens'"):
    _save(_transcoder(skip=True), tmp_path / "out", "gemma_scope_2")
  assert not (tmp_path / "out").exists()
  _save(_transcoder(skip=False), tmp_path / "out", "gemma_scope_2")


def _gs2_folder(tmp_path, skip):
  return _save(_transcoder(skip=skip), tmp_path / "gs2", "gemma_scope_2")


def _edit_json(file, **changes):
  cfg = json.loads(file.read_text())
  cfg.update(changes)
  file.write_text(json.dumps(cfg))


def _edit_weights(file, drop=(), **add):
  w = st.load_file(str(file))
  for k in drop:
    del w[k]
  w.update({k: np.asarray(v, np.float32) for k, v in add.items()})
  st.save_file(w, str(file))


def test_gemma_scope_2_affine_flag_and_weights_disagree(tmp_path):
  out = _gs2_folder(tmp_path, skip=True)
  _edit_json(out / "config.json", affine_connection=False)
  with pytest.raises(FormatError, match=r"params\.safetensors: key 'affine_skip_connection'"
                                        r" holds an affine skip connection, but .*config\.json"
                                        r" says there is none \(key 'affine_connection' is"
                                        r" false\)"):
    jsae.load(out)
  out = _gs2_folder(tmp_path / "b", skip=False)
  _edit_json(out / "config.json", affine_connection=True)
  with pytest.raises(FormatError, match=r"params\.safetensors: missing key"
                                        r" 'affine_skip_connection'.*affine_connection' is true"):
    jsae.load(out)
  _edit_json(out / "config.json", affine_connection="yes")
  with pytest.raises(FormatError, match=r"key 'affine_connection' is 'yes'; expected true"):
    jsae.load(out)


def test_gemma_scope_2_sae_with_a_skip(tmp_path):
  p = saes.get("jumprelu").init(jax.random.key(0), d_in=D_IN, d_sae=D_SAE)
  out = _save(SAE.from_training(p, 1.0), tmp_path / "sae", "gemma_scope_2")
  _edit_weights(out / "params.safetensors", affine_skip_connection=np.ones((D_IN, D_IN)))
  with pytest.raises(FormatError, match=r"key 'type' is 'sae' but the folder has an affine"
                                        r" skip connection"):
    jsae.load(out)


def test_gemma_scope_2_skip_of_wrong_shape(tmp_path):
  out = _gs2_folder(tmp_path, skip=True)
  _edit_weights(out / "params.safetensors", affine_skip_connection=np.ones((D_OUT, D_IN)))
  with pytest.raises(FormatError, match=r"key 'W_skip' has shape \(6, 8\); expected W_skip"
                                        r" \[d_in, d_out\] = \(8, 6\)"):
    jsae.load(out)


def test_saelens_transcoder_bad_input(tmp_path):
  out = _save(_transcoder("jumprelu", skip=True), tmp_path / "sl", "saelens")
  cfg_file, w_file = out / "cfg.json", out / "sae_weights.safetensors"
  # Architecture without a skip, weights with one.
  _edit_json(cfg_file, architecture="jumprelu_transcoder")
  with pytest.raises(FormatError, match=r"key 'W_skip' holds an affine skip connection.*"
                                        r"'architecture' is 'jumprelu_transcoder'"):
    jsae.load(out)
  # An SAE architecture with a skip in the weights.
  _edit_json(cfg_file, architecture="jumprelu")
  with pytest.raises(FormatError, match=r"unexpected key 'W_skip'.*'jumprelu_skip_transcoder'"):
    jsae.load(out)
  # apply_b_dec_to_input, which SAELens refuses for transcoders.
  _edit_json(cfg_file, architecture="jumprelu_skip_transcoder", apply_b_dec_to_input=True)
  with pytest.raises(FormatError, match=r"'apply_b_dec_to_input' is true.*expected false"):
    jsae.load(out)
  # W_skip in jsae's orientation [d_in, d_out] instead of SAELens's [d_out, d_in].
  _edit_json(cfg_file, apply_b_dec_to_input=False)
  w = st.load_file(str(w_file))
  _edit_weights(w_file, W_skip=w["W_skip"].T)
  with pytest.raises(FormatError, match=r"key 'W_skip' has shape \(8, 6\); expected"
                                        r" SAELens's \[d_out, d_in\] = \(6, 8\)"):
    jsae.load(out)
  # A skip architecture without the skip; a cfg whose d_out disagrees.
  _edit_weights(w_file, drop=["W_skip"])
  with pytest.raises(FormatError, match=r"missing key 'W_skip'.*'jumprelu_skip_transcoder'"):
    jsae.load(out)
  _edit_json(cfg_file, architecture="jumprelu_transcoder", d_out=7)
  with pytest.raises(FormatError, match=r"cfg\.json: key 'd_out' is 7, but the weights.*"
                                        r"d_out = 6"):
    jsae.load(out)


def test_jsae_transcoder_bad_input(tmp_path):
  out = _save(_transcoder(skip=True), tmp_path / "j", "jsae")
  cfg_file = out / "config.json"
  _edit_json(cfg_file, skip=False)
  with pytest.raises(FormatError, match=r"key 'W_skip' holds an affine skip.*key 'skip' is"
                                        r" false"):
    jsae.load(out)
  _edit_json(cfg_file, skip=True, transcoder=False)
  with pytest.raises(FormatError, match=r"key 'W_skip' holds an affine skip connection, but"
                                        r" .*describes an SAE"):
    jsae.load(out)
  _edit_json(cfg_file, transcoder=True)
  _edit_weights(out / "sae.safetensors", drop=["W_skip"])
  with pytest.raises(FormatError, match=r"missing key 'W_skip'.*key 'skip' is true"):
    jsae.load(out)


def test_gemma_scope_npz_with_a_skip(tmp_path):
  sae = _transcoder(skip=True, d_out=D_IN)
  arrays = {k: np.asarray(getattr(sae.params, k)) for k in saes.base.array_fields(sae.params)}
  np.savez(tmp_path / "params.npz", **arrays)
  with pytest.raises(FormatError, match=r"params\.npz: unexpected key 'W_skip'.*Gemma Scope 2"):
    jsae.load(tmp_path)


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def transcoder_run(tmp_path_factory):
  """A few steps of a skip transcoder on synthetic pairs (d_in 64 -> d_out 48)."""
  workdir = tmp_path_factory.mktemp("tc_run")
  config = tiny.get_config()
  config.sae.target_site, config.sae.d_out, config.sae.skip = "mlp_out.6", 48, True
  config.sae.pre_encoder_bias = False
  config.data.synthetic.skip_scale = 0.5
  config.train.num_tokens = 20 * 512
  config.ckpt.every_steps = 20
  train.train(config, workdir, progress=False)
  return workdir


def test_export_of_a_transcoder_run(transcoder_run, tmp_path):
  sae = runs.read_sae(transcoder_run)
  assert sae.transcoder and sae.params.W_skip is not None and sae.d_out == 48
  x = np.asarray(jax.random.normal(jax.random.key(0), (16, sae.d_in)), np.float32)
  for fmt in HELD:
    out = formats.export(transcoder_run, tmp_path / fmt, fmt,
                         **({"layer": 6, "l0": "small"} if fmt == "gemma_scope_2" else {}))
    loaded = jsae.load(out)
    assert loaded.transcoder and loaded.d_out == 48, fmt
    assert loaded.provenance["target_site"] == "mlp_out.6", fmt
    np.testing.assert_array_equal(loaded.encode(x), sae.encode(x), err_msg=fmt)
    np.testing.assert_array_equal(loaded(x), sae(x), err_msg=fmt)
  with pytest.raises(FormatError, match=r"tc_run.*: a 'jumprelu' skip transcoder.*cannot be"
                                        r" saved as gemma_scope"):
    formats.export(transcoder_run, tmp_path / "gs", "gemma_scope", layer=6, average_l0=5)
  assert not (tmp_path / "gs").exists()
  assert runs.training_transcoder(transcoder_run) == (True, True)


def test_bfloat16_transcoder_round_trip(tmp_path):
  sae = _transcoder(skip=True).astype(jnp.bfloat16)
  for fmt in ("jsae", "saelens"):
    loaded = jsae.load(_save(sae, tmp_path / fmt, fmt))
    assert loaded.dtype == jnp.bfloat16 and loaded.params.W_skip.dtype == jnp.bfloat16
    np.testing.assert_array_equal(loaded(_x()), sae(_x()))
