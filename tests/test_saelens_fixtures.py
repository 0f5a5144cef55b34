"""SAELens folders written by SAELens 6.54 itself (tests/fixtures/saelens, made by
tests/fixtures/make_saelens_fixtures.py): jsae loads them and encodes as SAELens did."""

import json
from pathlib import Path

import numpy as np
import pytest

import jsae

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "saelens"
# SAELens architecture -> the jsae inference family it loads as.
CASES = {"standard": "relu", "topk": "topk", "topk_rescale": "topk", "gated": "jumprelu",
         "jumprelu": "jumprelu"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_loads_and_encodes_as_saelens(name):
  folder = FIXTURES / name
  io = json.loads((folder / "io.json").read_text())
  x = np.asarray(io["inputs"], np.float32)
  want_f = np.asarray(io["encodings"], np.float32)
  want_x_hat = np.asarray(io["reconstructions"], np.float32)
  sae = jsae.load(folder)
  assert sae.family == CASES[name]
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
  x = np.asarray(json.loads((FIXTURES / name / "io.json").read_text())["inputs"], np.float32)
  again = jsae.load(jsae.save(sae, tmp_path / "out", format="saelens"))
  np.testing.assert_array_equal(again.encode(x), sae.encode(x))
  cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
  arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[sae.family]
  assert cfg["architecture"] == arch and cfg["apply_b_dec_to_input"] is False
  assert cfg["metadata"]["sae_lens_version"] >= "6"
  if arch == "topk":
    assert cfg["k"] == 4 and cfg["rescale_acts_by_decoder_norm"] is False
