"""Reports: Pareto frontier logic, and the HTML rendering in a real headless browser."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from configs import tiny
from jsae import report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_pareto_front():
  points = [(10, 0.5), (20, 0.3), (15, 0.6), (40, 0.31), (80, 0.1)]
  assert report.pareto_front(points) == [(10, 0.5), (20, 0.3), (80, 0.1)]


def _fake_run(root: Path, name: str, l0: float, delta: float, seed: int) -> Path:
  run = root / name
  run.mkdir(parents=True)
  c = tiny.get_config()
  c.loss.sparsity_coeff = 1.0 / l0
  (run / "config.json").write_text(json.dumps(c.to_dict()))
  rng = np.random.default_rng(seed)
  lines = [dict(step=s, loss=1 / s, l0=l0 + 100 / s, fvu=0.5 / np.sqrt(s), dead_frac=0.01)
           for s in range(10, 210, 10)]
  (run / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  (run / "eval.json").write_text(json.dumps(dict(l0=l0, fvu=0.1 + 1 / l0, delta_lm_loss=delta,
                                                 delta_lm_loss_zero=5.0, dead_frac=0.02,
                                                 dense_frac=0.0, ce_loss_score=1 - delta / 5,
                                                 kl_div_score=0.75 + seed / 100)))
  freq = np.where(rng.random(256) < 0.05, 0.0, 10 ** rng.uniform(-5, -0.5, 256))
  np.save(run / "eval_firing_frequency.npy", freq)
  return run


def test_report_files_and_table(tmp_path):
  runs = [_fake_run(tmp_path, f"lam{i}", l0, d, i) for i, (l0, d) in
          enumerate([(20, 0.9), (50, 0.4), (120, 0.2)])]
  index = report.write_report(runs, tmp_path / "report")
  page = index.read_text()
  for img in re.findall(r'src="([^"]+\.png)"', page):
    assert (index.parent / img).stat().st_size > 5000, img  # a real plot, not an empty file
  assert page.count("<tr>") == 1 + 3 and "lam1" in page
  # SAEBench's scores, columns a user compares across libraries: lam1's row has both.
  assert "<th>CE score</th><th>KL score</th>" in page
  assert "<td>0.92</td><td>0.76</td>" in page.split("lam1")[1].split("</tr>")[0]
  with pytest.raises(FileNotFoundError, match="not a jsae run directory"):
    report.write_report([tmp_path / "nope"], tmp_path / "r2")


def test_unevaluated_runs_plot_their_logged_fvu(tmp_path):
  """A sweep member without eval.json: held-out batches first, else the last training batch."""
  run = _fake_run(tmp_path, "a", 20, 0.9, 0)
  (run / "eval.json").unlink()
  loaded = report.load_run(run)
  assert report.sparsity_point(loaded, "delta_lm_loss") is None
  (l0, fvu), source = report.sparsity_point(loaded, "fvu")
  assert (l0, fvu) == (20 + 100 / 200, 0.5 / np.sqrt(200)) and "training batch" in source
  loaded["metrics"].append(dict(step=300, l0=1.0, fvu=9.0, eval_l0=21.0, eval_fvu=0.25))
  assert report.sparsity_point(loaded, "fvu") == ((21.0, 0.25),
                                                  "held-out batches (metrics.jsonl)")


def test_frozen_unhealthy_non_finite_and_off_scale_runs_stay_off_the_fronts(tmp_path):
  """A frozen sweep member with a non-finite FVU (null, or 'nan' from older files), an
  unhealthy one, and a run 1e10 above the others: the report is written, the fronts hold
  only the healthy finite points, and the page says what was left out and why."""
  runs = [_fake_run(tmp_path, f"ok{i}", l0, d, i) for i, (l0, d) in
          enumerate([(20, 0.9), (50, 0.4), (120, 0.2)])]
  frozen = _fake_run(tmp_path, "frozen", 459, 0.1, 7)
  (frozen / "eval.json").write_text('{"l0": 459.0, "fvu": "nan", "delta_lm_loss": null,'
                                    ' "delta_lm_loss_zero": 5.0}')
  (frozen / "status.json").write_text(json.dumps(
      {"status": "frozen", "step": 0, "detail": "frozen at step 0 (a non-finite or"
       " exploding update)"}))
  sick = _fake_run(tmp_path, "sick", 300, 0.05, 8)
  (sick / "status.json").write_text(json.dumps({"status": "unhealthy",
                                                "detail": "every latent is dead"}))
  huge = _fake_run(tmp_path, "huge", 80, 0.3, 9)
  evaluation = json.loads((huge / "eval.json").read_text())
  (huge / "eval.json").write_text(json.dumps(dict(evaluation, fvu=7.1e11)))
  loaded = [report.load_run(r) for r in runs + [frozen, sick, huge]]
  assert loaded[3]["eval"]["fvu"] is None and report.sparsity_point(loaded[3], "fvu") is None
  notes = report.plot_pareto(loaded, "fvu", "FVU", tmp_path / "p.png")
  assert notes == ["#4 frozen left out: frozen at step 0 (a non-finite or exploding update)",
                   "#5 sick left out: every latent is dead", "#6 huge off-scale (FVU 7.1e+11)"]
  index = report.write_report(runs + [frozen, sick, huge], tmp_path / "report")
  page = index.read_text()
  assert "frozen left out" in page and "huge off-scale" in page
  assert page.count("<tr>") == 1 + 6 and "<td>frozen</td>" in page


def test_transcoders_get_fronts_of_their_own(tmp_path):
  runs = []
  for i, (target, skip) in enumerate([("", False), ("mlp_out.6", False), ("mlp_out.6", True)]):
    run = _fake_run(tmp_path, f"r{i}", 20 + 10 * i, 0.5, i)
    config = json.loads((run / "config.json").read_text())
    config["sae"].update(target_site=target, skip=skip)
    (run / "config.json").write_text(json.dumps(config))
    runs.append(report.load_run(run))
  assert [report.series(r) for r in runs] == ["jumprelu", "jumprelu transcoder",
                                               "jumprelu skip transcoder"]
  labels = []
  real_legend = report.plt.Axes.legend
  try:
    report.plt.Axes.legend = lambda self, *a, **k: labels.extend(
        t for t in self.get_legend_handles_labels()[1]) or real_legend(self, *a, **k)
    report.plot_pareto(runs, "fvu", "FVU", tmp_path / "p.png")
  finally:
    report.plt.Axes.legend = real_legend
  assert labels == ["jumprelu (1)", "jumprelu transcoder (1)", "jumprelu skip transcoder (1)"]


def test_empty_delta_loss_panel_single_step_runs_and_mixed_token_counts(tmp_path):
  run = _fake_run(tmp_path, "a", 20, 0.9, 0)
  (run / "eval.json").unlink()
  (run / "metrics.jsonl").write_text(json.dumps(dict(step=10, loss=1.0, l0=20.0, fvu=0.3,
                                                     dead_frac=0.0)) + "\n")
  loaded = report.load_run(run)
  report.plot_curves([loaded], tmp_path / "c.png")  # one logged step: drawn as a marker
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots()
  plotted = []
  real_plot = report.plt.Axes.plot
  try:
    report.plt.Axes.plot = lambda self, *a, **k: plotted.append(k) or real_plot(self, *a, **k)
    report.plot_curves([loaded], tmp_path / "c2.png")
  finally:
    report.plt.Axes.plot = real_plot
    plt.close(fig)
  assert plotted and all(k.get("marker") == "o" for k in plotted)
  texts = []
  real_text = report.plt.Axes.text
  try:
    report.plt.Axes.text = lambda self, *a, **k: texts.append(a[2]) or real_text(self, *a, **k)
    assert report.plot_pareto([loaded], "delta_lm_loss", "delta LM loss", tmp_path / "d.png") == []
  finally:
    report.plt.Axes.text = real_text
  assert texts and "run jsae eval" in texts[0]
  b, c = _fake_run(tmp_path, "b", 30, 0.5, 1), _fake_run(tmp_path, "c", 60, 0.3, 2)
  for run, targets in ((b, 32_735), (c, 1_023)):
    evaluation = json.loads((run / "eval.json").read_text())
    (run / "eval.json").write_text(json.dumps(dict(evaluation, lm_targets=targets)))
  titles = []
  real_title = report.plt.Axes.set_title
  try:
    report.plt.Axes.set_title = lambda self, t, **k: titles.append(t) or real_title(self, t, **k)
    report.plot_pareto([report.load_run(b), report.load_run(c)], "delta_lm_loss",
                       "delta LM loss", tmp_path / "e.png")
  finally:
    report.plt.Axes.set_title = real_title
  assert "different numbers of target tokens (1,023, 32,735)" in titles[0]


@pytest.mark.skipif(CHROMIUM is None,
                    reason="needs Debian's chromium (.ci/run installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
  runs = [_fake_run(tmp_path, f"lam{i}", l0, d, i) for i, (l0, d) in enumerate([(30, 0.5), (90, 0.2)])]
  index = report.write_report(runs, tmp_path / "report")
  flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}"]
  dom = subprocess.run([CHROMIUM, *flags, "--virtual-time-budget=5000", "--dump-dom",
                        index.as_uri()], capture_output=True, text=True, timeout=120)
  n_images = len(re.findall(r"<img ", index.read_text()))
  assert f'data-images-ok="{n_images}/{n_images}"' in dom.stdout, dom.stderr[-2000:]
  shot = tmp_path / "report.png"
  subprocess.run([CHROMIUM, *flags, "--window-size=1200,2400", f"--screenshot={shot}",
                  index.as_uri()], capture_output=True, timeout=120)
  assert shot.stat().st_size > 20000  # a rendered page with plots, not a blank one
