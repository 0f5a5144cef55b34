"""The feature browser end to end on a tiny GGUF LM: the demo's browse stage, `jsae browse`
(site and Neuronpedia files), bad inputs, and the pages in headless Chromium."""

import json
import os
import re
import shutil
import subprocess

import pytest

pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")

from jsae import cli, pipeline

from test_stages import _config, inputs  # noqa: F401  (the tiny GGUF LM and its text)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def demo(inputs, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("browse_demo")
  pipeline.run(_config(inputs), workdir, report=True)
  config_file = workdir / "config.py"
  model, text = inputs
  config_file.write_text(
      "from test_stages import _config\nfrom pathlib import Path\n"
      f"def get_config(arg=None):\n  return _config(({str(model)!r}, Path({str(text)!r})))\n")
  return workdir, config_file


def test_demo_stage_writes_the_browser_and_the_report_links_it(demo):
  workdir, _ = demo
  index = workdir / "browser/index.html"
  assert index.exists() and (workdir / "browser/data/latents-00000.js").exists()
  assert 'href="../browser/index.html"' in (workdir / "report/index.html").read_text()
  rows = json.loads(re.search(r"JSAE.setIndex\((.*)\);", (workdir / "browser/data/index.js")
                              .read_text()).group(1))["rows"]
  assert len(rows) == 128  # every latent of the SAE is in the index


def test_cli_neuronpedia_export_has_the_runner_fields(demo, tmp_path, capsys):
  workdir, config_file = demo
  out = tmp_path / "np"
  assert cli.main(["browse", f"--config={config_file}", f"--sae={workdir}/sae",
                   f"--out={out}", f"--workdir={workdir}", "--format=neuronpedia"]) == 0
  batch = json.loads((out / "batch-0.json").read_text())
  assert {"model_id", "layer", "sae_set", "features"} <= set(batch) and batch["layer"] == 1
  feats = {f["feature_index"]: f for f in batch["features"]}
  f = next(f for f in feats.values() if f["activations"])
  for key in ("pos_str", "pos_values", "neg_str", "neg_values", "frac_nonzero",
              "freq_hist_data_bar_heights", "freq_hist_data_bar_values",
              "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "n_prompts_total",
              "n_tokens_in_prompt", "dataset"):
    assert key in f, key
  assert len(f["pos_str"]) == 10 and len(f["logits_hist_data_bar_heights"]) == 50
  top = f["activations"][0]
  assert top["bin_min"] == -1 and top["bin_max"] == max(top["values"])
  assert top["tokens"][top["qualifying_token_index"]] and all(
      round(v, 3) == v for v in top["values"])


@pytest.mark.parametrize("args,words", [
    (["--latents=5,999"], ["999", "out of range", "0 ... 127"]),
    (["--config.browse.n_top=100000"], ["fewer than the 100000", "browse.n_top"]),
])
def test_bad_browse_inputs(demo, tmp_path, capsys, args, words):
  workdir, config_file = demo
  code = cli.main(["browse", f"--config={config_file}", f"--sae={workdir}/sae",
                   f"--out={tmp_path}/b", f"--workdir={workdir}", *args])
  text = capsys.readouterr().err
  assert code == 2 and all(w in text for w in words) and "Traceback" not in text, text


def test_browser_of_another_sae_and_mismatched_width_are_refused(demo, tmp_path, capsys):
  import jax
  import jsae
  from jsae import saes, formats
  workdir, config_file = demo
  other = jsae.SAE.from_training(saes.get("jumprelu").init(jax.random.key(3), d_in=64,
                                                           d_sae=128), norm_scale=1.0)
  formats.save(other, tmp_path / "other", format="jsae")
  code = cli.main(["browse", f"--config={config_file}", f"--sae={tmp_path}/other",
                   f"--out={workdir}/browser", f"--workdir={workdir}"])
  assert code == 2 and "another SAE" in capsys.readouterr().err
  narrow = jsae.SAE.from_training(saes.get("jumprelu").init(jax.random.key(3), d_in=32,
                                                            d_sae=16), norm_scale=1.0)
  formats.save(narrow, tmp_path / "narrow", format="jsae")
  code = cli.main(["browse", f"--config={config_file}", f"--sae={tmp_path}/narrow",
                   f"--out={tmp_path}/n", f"--workdir={workdir}"])
  err = capsys.readouterr().err
  assert code == 2 and "32" in err and "64" in err, err


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("JSAE_REQUIRE_CHROMIUM"),
                    reason="needs Debian's chromium (.ci/run installs it)")
def test_pages_render_search_and_highlight_in_headless_chromium(demo, tmp_path):
  assert CHROMIUM, "JSAE_REQUIRE_CHROMIUM is set but no chromium is on PATH"
  workdir, _ = demo
  browser = workdir / "browser"
  flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--allow-file-access-from-files", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=5000"]
  dump = lambda url: subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True,
                                    text=True, timeout=120).stdout
  rows = re.findall(r'data-latent="(\d+)"', dump(f"{(browser / 'index.html').as_uri()}?q=17"))
  assert rows == ["17"]
  everything = re.findall(r'data-latent="(\d+)"', dump((browser / "index.html").as_uri()))
  assert len(everything) == 128
  index = json.loads(re.search(r"JSAE.setIndex\((.*)\);", (browser / "data/index.js")
                               .read_text()).group(1))
  busy = max(index["rows"], key=lambda r: r[1])[0]  # the most active latent
  page = dump(f"{(browser / 'latent.html').as_uri()}?id={busy}")
  assert f"latent {busy}" in page
  highlighted = re.findall(r'class="tok at" title="([^"]+)" data-act="([^"]+)"', page)
  assert len(highlighted) >= 10 and all(float(a) > 0 for _, a in highlighted)
  shot = tmp_path / "latent.png"
  subprocess.run([CHROMIUM, *flags, "--window-size=1100,1600", f"--screenshot={shot}",
                  f"{(browser / 'latent.html').as_uri()}?id={busy}"], capture_output=True,
                 timeout=120)
  assert shot.stat().st_size > 20000


def test_browse_stage_is_reused_only_for_the_same_inputs(demo, inputs, tmp_path, capsys):
  workdir, _ = demo
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  capsys.readouterr()
  pipeline.run(_config(inputs), copy, report=False)
  assert "reusing the feature browser" in capsys.readouterr().out
  c = _config(inputs)
  c.browse.max_tokens = 500
  pipeline.run(c, copy, report=False)
  out = capsys.readouterr().out
  assert "browsing again" in out and "settings.max_tokens" not in out and "contexts: was" in out
