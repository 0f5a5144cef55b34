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
    (["--latents=,"], ["--latents", "names no latent"]),
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


@pytest.mark.skipif(CHROMIUM is None,
                    reason="needs Debian's chromium (.ci/run installs it)")
def test_pages_render_search_and_highlight_in_headless_chromium(demo, tmp_path):
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


def _index(browser):
  """The site's index data (data/index.js)."""
  return json.loads(re.search(r"JSAE.setIndex\((.*)\);", (browser / "data/index.js")
                              .read_text()).group(1))


def _pages(browser):
  """{latent id: its page data} from data/latents-K.js, placed by the index's rows."""
  index, pages = _index(browser), {}
  for path in (browser / "data").glob("latents-*.js"):
    k, chunk = re.fullmatch(r"JSAE.chunk\((\d+), (.*)\);\n", path.read_text(), re.S).groups()
    for j, record in enumerate(json.loads(chunk)):
      pages[index["rows"][int(k) * index["per_file"] + j][0]] = record
  return pages


def _count_latents_computed(monkeypatch) -> dict:
  """{'logits': [...], 'stats': [...]}: the latents each logit-effect and streaming pass
  computes, filled in as they run."""
  from jsae.browse import logits, stream
  computed = {"logits": [], "stats": []}
  real_logits, real_stream = logits.logit_effects, stream.stream
  monkeypatch.setattr(logits, "logit_effects", lambda w, *a, **k: (
      computed["logits"].append(w.shape[0]), real_logits(w, *a, **k))[1])
  monkeypatch.setattr(stream, "stream", lambda *a, **k: (
      s := real_stream(*a, **k), computed["stats"].append(s.fire_count.shape[0]))[0])
  return computed


@pytest.fixture(scope="module")
def chosen(demo):
  """Three latents that fire, none of them the busiest one (which the subset leaves out)."""
  rows = _index(demo[0] / "browser")["rows"]
  busy = max(rows, key=lambda r: r[1])[0]
  firing = [r[0] for r in rows if r[1] > 0 and r[0] != busy]
  return [firing[0], firing[len(firing) // 2], firing[-1]], busy


def test_browse_of_chosen_latents_computes_writes_and_links_only_them(demo, chosen, tmp_path,
                                                                      capsys, monkeypatch):
  workdir, config_file = demo
  ids, busy = chosen
  full_index, full_pages = _index(workdir / "browser"), _pages(workdir / "browser")
  assert full_index["rows"][busy][1] > 0.2  # fires on a good share of the tokens
  computed = _count_latents_computed(monkeypatch)
  out = tmp_path / "b"
  shutil.copytree(workdir / "browser", out)  # a full browser of this SAE, browsed again
  capsys.readouterr()
  assert cli.main(["browse", f"--config={config_file}", f"--sae={workdir}/sae", f"--out={out}",
                   f"--workdir={workdir}", f"--latents={ids[2]},{ids[0]},{ids[1]},{ids[0]}",
                   "--config.browse.latents_per_file=2"]) == 0
  printed = capsys.readouterr().out
  covers = f"3 of 128 latents: {', '.join(map(str, ids))}"
  # (c) statistics and logit effects of the chosen latents only.
  assert computed == {"logits": [3], "stats": [3]}, computed
  # (a) the index lists exactly them and says what the browser covers; only their data is
  # left (the full browser's other files are gone).
  index = _index(out)
  assert [r[0] for r in index["rows"]] == ids
  assert covers in index["title"] and index["covers"] == covers
  assert sorted(p.name for p in (out / "data").glob("latents-*.js")) == [
      "latents-00000.js", "latents-00001.js"]
  assert f"({covers}; " in printed and "and 3 of 128 latents in" in printed, printed
  assert json.loads((out / "browse.json").read_text())["latents"] == ids
  # (b) the busy latent outside the subset has no row, no page data, no "never active".
  pages = _pages(out)
  assert busy not in pages and busy not in [r[0] for r in index["rows"]]
  # (d) the chosen latents' rows and pages are the full browser's, value for value.
  assert index["rows"] == [full_index["rows"][l] for l in ids]
  assert pages == {l: full_pages[l] for l in ids}
  assert all(pages[l]["top"] and pages[l]["hist"]["counts"] and pages[l]["logits"]["pos"]
             for l in ids)


def test_neuronpedia_export_of_chosen_latents_equals_the_full_export_for_them(
    demo, chosen, tmp_path, monkeypatch):
  workdir, config_file = demo
  ids, busy = chosen
  computed = _count_latents_computed(monkeypatch)
  features = {}
  for name, flag in (("full", []), ("some", [f"--latents={','.join(map(str, ids))}"])):
    assert cli.main(["browse", f"--config={config_file}", f"--sae={workdir}/sae",
                     f"--out={tmp_path / name}", f"--workdir={workdir}", "--format=neuronpedia",
                     *flag]) == 0
    features[name] = {f["feature_index"]: f for p in sorted((tmp_path / name).glob("batch-*"))
                      for f in json.loads(p.read_text())["features"]}
  assert computed == {"logits": [128, 3], "stats": [128, 3]}, computed
  assert len(features["full"]) == 128 and list(features["some"]) == ids
  assert features["some"] == {l: features["full"][l] for l in ids}
  assert busy not in features["some"]
  # Into the directory of the full export (as if it had had more batches): only the
  # chosen latents' batch is left to upload.
  (tmp_path / "full/batch-7.json").write_text("{}")
  assert cli.main(["browse", f"--config={config_file}", f"--sae={workdir}/sae",
                   f"--out={tmp_path / 'full'}", f"--workdir={workdir}", "--format=neuronpedia",
                   f"--latents={','.join(map(str, ids))}"]) == 0
  assert [p.name for p in (tmp_path / "full").glob("batch-*")] == ["batch-0.json"]
  assert [f["feature_index"] for f in json.loads((tmp_path / "full/batch-0.json").read_text())
          ["features"]] == ids


@pytest.mark.skipif(CHROMIUM is None,
                    reason="needs Debian's chromium (.ci/run installs it)")
def test_browser_of_chosen_latents_in_headless_chromium(demo, chosen, tmp_path):
  workdir, config_file = demo
  ids, busy = chosen
  out = tmp_path / "b"
  assert cli.main(["browse", f"--config={config_file}", f"--sae={workdir}/sae", f"--out={out}",
                   f"--workdir={workdir}", f"--latents={','.join(map(str, ids))}",
                   "--config.browse.latents_per_file=2"]) == 0
  flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--allow-file-access-from-files", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=5000"]
  dump = lambda url: subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True,
                                    text=True, timeout=120).stdout
  index = dump((out / "index.html").as_uri())
  assert re.findall(r'data-latent="(\d+)"', index) == [str(l) for l in ids]
  assert f"3 of 128 latents: {', '.join(map(str, ids))}" in index
  for l in ids:  # the last one's data is in the second file
    page = dump(f"{(out / 'latent.html').as_uri()}?id={l}")
    assert f"latent {l}</h1>" in page and "never active" not in page, l
    assert re.findall(r'class="tok at" title="[^"]+" data-act="([^"]+)"', page), l
  page = dump(f"{(out / 'latent.html').as_uri()}?id={busy}")
  assert "not in this browser" in page and "never active" not in page
