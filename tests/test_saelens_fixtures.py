"""SAELens folders written by SAELens 6.54 itself (tests/fixtures/saelens, made by
tests/fixtures/make_saelens_fixtures.py): jsae loads them and encodes as SAELens did."""

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as st

import jsae

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "saelens"
# SAELens architecture -> the jsae inference family it loads as.
CASES = {"standard": "relu", "topk": "topk", "topk_rescale": "topk", "gated": "jumprelu",
         "jumprelu": "jumprelu"}
# SAELens transcoder architecture -> (jsae family, has an affine skip).
TRANSCODERS = {"transcoder": ("relu", False), "skip_transcoder": ("relu", True),
               "jumprelu_transcoder": ("jumprelu", False),
               "jumprelu_skip_transcoder": ("jumprelu", True)}
D_IN, D_OUT = 8, 6


def _io(name):
  return json.loads((FIXTURES / name / "io.json").read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_loads_and_encodes_as_saelens(name):
  folder = FIXTURES / name
  io = _io(name)
  x = np.asarray(io["inputs"], np.float32)
  want_f = np.asarray(io["encodings"], np.float32)
  want_x_hat = np.asarray(io["reconstructions"], np.float32)
  sae = jsae.load(folder)
  assert sae.family == CASES[name] and not sae.transcoder
  f = np.asarray(sae.encode(x))
  assert 0 < (want_f != 0).mean() < 1  # the fixture exercises both sides of the cut
  np.testing.assert_array_equal(f != 0, want_f != 0)
  np.testing.assert_allclose(f, want_f, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sae.decode(f), want_x_hat, rtol=1e-5, atol=1e-5)
  assert sae.provenance["saelens"]["hook_name"] == "blocks.2.hook_resid_post"
  assert sae.provenance["hook_site"] == "resid_post" and sae.provenance["layer"] == 2


@pytest.mark.parametrize("name", sorted(CASES))
def test_saelens_round_trip_keeps_the_encodings(name, tmp_path):
  sae = jsae.load(FIXTURES / name)
  x = np.asarray(_io(name)["inputs"], np.float32)
  again = jsae.load(jsae.save(sae, tmp_path / "out", format="saelens"))
  np.testing.assert_array_equal(again.encode(x), sae.encode(x))
  cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
  arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[sae.family]
  assert cfg["architecture"] == arch and cfg["apply_b_dec_to_input"] is False
  assert cfg["metadata"]["sae_lens_version"] >= "6"
  if arch == "topk":
    assert cfg["k"] == 4 and cfg["rescale_acts_by_decoder_norm"] is False


@pytest.mark.parametrize("name", sorted(TRANSCODERS))
def test_transcoders_load_and_predict_as_saelens(name):
  """Encodings, decode(f) and the forward pass (with SAELens's x @ W_skip.T) agree."""
  io = _io(name)
  x = np.asarray(io["inputs"], np.float32)
  want_f = np.asarray(io["encodings"], np.float32)
  sae = jsae.load(FIXTURES / name)
  family, skip = TRANSCODERS[name]
  assert (sae.family, sae.transcoder, sae.d_in, sae.d_out) == (family, True, D_IN, D_OUT)
  assert (sae.params.W_skip is not None) == skip
  f = np.asarray(sae.encode(x))
  assert 0 < (want_f != 0).mean() < 1
  np.testing.assert_array_equal(f != 0, want_f != 0)
  np.testing.assert_allclose(f, want_f, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sae.decode(f), np.asarray(io["decoded"]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sae(x), np.asarray(io["outputs"]), rtol=1e-5, atol=1e-5)
  if skip:  # the fixture's skip is large enough that leaving it out would show
    assert np.abs(np.asarray(io["outputs"]) - np.asarray(io["decoded"])).max() > 0.1
  prov = sae.provenance
  assert (prov["hook_site"], prov["layer"], prov["target_site"]) == ("mlp_in", 2, "mlp_out.2")
  assert prov["training_family"] == family


@pytest.mark.parametrize("name", sorted(TRANSCODERS))
def test_transcoder_export_writes_saelens_layout(name, tmp_path):
  """jsae's export has the architecture, d_out, hooks and W_skip orientation SAELens wrote."""
  sae = jsae.load(FIXTURES / name)
  out = jsae.save(sae, tmp_path / "out", format="saelens")
  cfg = json.loads((out / "cfg.json").read_text())
  theirs = json.loads((FIXTURES / name / "cfg.json").read_text())
  for key in ("architecture", "d_in", "d_sae", "d_out", "apply_b_dec_to_input"):
    assert cfg[key] == theirs[key], key
  for key in ("hook_name", "hook_name_out"):
    assert cfg["metadata"][key] == theirs["metadata"][key], key
  ours, saved = (st.load_file(str(f / "sae_weights.safetensors"))
                 for f in (out, FIXTURES / name))
  assert set(ours) == set(saved)
  for key in saved:
    np.testing.assert_array_equal(ours[key], saved[key], err_msg=key)
  x = np.asarray(_io(name)["inputs"], np.float32)
  again = jsae.load(out)
  np.testing.assert_array_equal(again.encode(x), sae.encode(x))
  np.testing.assert_array_equal(again(x), sae(x))
