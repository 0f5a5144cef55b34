"""Reports: PNG plots and a static index.html over one or more run directories.

A run directory is a training workdir (config.json, metrics.jsonl) with an
optional eval.json (+ eval_firing_frequency.npy) from `jsae eval`/`jsae demo`.

  jsae report runs/demo/sae runs/sweep/* --out=runs/report
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jsae import saes  # noqa: E402

CURVES = (("loss", "loss"), ("l0", "L0"), ("fvu", "FVU (train batch)"), ("dead_frac", "dead fraction"))


def load_run(run_dir: str | Path) -> dict:
  """Config, metrics lines and evaluation of a run directory (clear error if not one)."""
  run_dir = Path(run_dir)
  config_file, metrics_file = run_dir / "config.json", run_dir / "metrics.jsonl"
  if not config_file.exists() or not metrics_file.exists():
    raise FileNotFoundError(
        f"{run_dir} is not a jsae run directory (expected config.json and metrics.jsonl"
        " written by `jsae train`/`jsae demo`).")
  lines = [json.loads(l) for l in metrics_file.read_text().splitlines() if l.strip()]
  eval_file = run_dir / "eval.json"
  evaluation = (_numbers(json.loads(eval_file.read_text())) if eval_file.exists() else None)
  freq_file = run_dir / "eval_firing_frequency.npy"
  freq = np.load(freq_file) if freq_file.exists() else None
  status_file = run_dir / "status.json"  # sweep members: ok, frozen or unhealthy
  status = json.loads(status_file.read_text()) if status_file.exists() else {"status": "ok"}
  name = run_dir.name if run_dir.name not in ("sae", "") else run_dir.parent.name
  return dict(name=name, dir=run_dir, config=json.loads(config_file.read_text()),
              metrics=lines, eval=evaluation, freq=freq, status=status)


def _numbers(record: dict) -> dict:
  """`record` with non-finite numbers (JSON null, or 'nan' strings of older files) as None."""
  def number(v):
    if isinstance(v, str) and v.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
      return None
    if isinstance(v, float) and not np.isfinite(v):
      return None
    return v
  return {k: number(v) for k, v in record.items()}


def plot_curves(runs: list[dict], path: Path) -> None:
  """Training curves (loss, L0, FVU, dead fraction vs step), one line per run."""
  fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
  for ax, (key, label) in zip(axes.flat, CURVES):
    for run in runs:
      pts = [(m["step"], m[key]) for m in run["metrics"] if m.get(key) is not None]
      if pts:  # a marker too, so that a run logged once still shows
        ax.plot(*zip(*pts), label=run["name"], marker="o" if len(pts) == 1 else None)
    ax.set_title(label)
    ax.set_xlabel("step")
    if key in ("loss", "fvu"):
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_density(run: dict, path: Path) -> None:
  """Histogram of log10 firing frequency on held-out tokens; dead latents noted."""
  freq = np.asarray(run["freq"], np.float64)
  alive = freq[freq > 0]
  fig, ax = plt.subplots(figsize=(6.5, 3.8))
  if alive.size:
    ax.hist(np.log10(alive), bins=60, color="tab:blue", alpha=0.85)
  ax.axvline(np.log10(0.1), color="tab:red", ls="--", label="dense (10%)")
  ax.set_xlabel("log10 firing frequency (held-out tokens)")
  ax.set_ylabel("latents")
  ax.set_title(f"{run['name']}: latent density ({int((freq == 0).sum())} dead of {freq.size})")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """The points not dominated in (lower x, lower y), sorted by x."""
  front, best = [], float("inf")
  for x, y in sorted(points):
    if y < best:
      front.append((x, y))
      best = y
  return front


def sparsity_point(run: dict, key: str) -> tuple[tuple[float, float], str] | None:
  """(L0, `key`) of a run and where it comes from, or None (not measured, or not finite).

  From eval.json when the run was evaluated; for FVU otherwise from the last
  metrics line: held-out batches (eval.every_steps) before the training batch.
  """
  found = None
  if run["eval"] and key in run["eval"]:  # evaluated: its value, finite or not
    found = (run["eval"].get("l0"), run["eval"][key]), "held-out eval (eval.json)"
  elif key == "fvu":
    last = next((m for m in reversed(run["metrics"]) if m.get("fvu") is not None), None)
    if last is not None and last.get("eval_fvu") is not None:
      found = (last["eval_l0"], last["eval_fvu"]), "held-out batches (metrics.jsonl)"
    elif last is not None:
      found = (last["l0"], last["fvu"]), "last training batch (metrics.jsonl)"
  if found is None or not all(v is not None and np.isfinite(v) for v in found[0]):
    return None
  return found


def series(run: dict) -> str:
  """What a run's Pareto front groups it with: its family, and whether it is a
  transcoder (with or without a skip) of a target site."""
  sae = run["config"]["sae"]
  if not sae.get("target_site"):
    return sae["family"]
  return f"{sae['family']} {'skip ' if sae.get('skip') else ''}transcoder"


def excluded(run: dict) -> str | None:
  """Why a run is left out of the Pareto fronts (a frozen or unhealthy sweep member), or None."""
  status = run.get("status") or {}
  if status.get("status", "ok") == "ok":
    return None
  return status.get("detail") or status["status"]


# A point this many times above the median of a plot's points is drawn at the top edge
# as off-scale, so that one failing run does not stretch the axis over the others.
OFF_SCALE = 100.0


def plot_pareto(runs: list[dict], key: str, label: str, path: Path) -> list[str]:
  """`key` vs L0 across runs: one numbered marker per run (its row in the table), the
  Pareto frontier per family. Returns notes on the runs left out (frozen, unhealthy,
  not measured) and drawn off-scale."""
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  families: dict[str, list] = {}
  sources, notes, shown = set(), [], []
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for number, run in enumerate(runs, 1):
    found = sparsity_point(run, key)
    why = excluded(run)
    if why is not None:
      notes.append(f"#{number} {run['name']} left out: {why}")
    if found is None or why is not None:
      continue
    point, source = found
    sources.add(source)
    shown.append((number, run, point))
  ys = [p[1] for _, _, p in shown]
  limit = OFF_SCALE * float(np.median(ys)) if ys and np.median(ys) > 0 else float("inf")
  top = max([y for y in ys if y <= limit], default=None)
  for number, run, point in shown:
    family = series(run)
    color = colors[(list(families) + [family]).index(family) % len(colors)]
    if point[1] > limit:  # off-scale: at the top edge, left out of the front
      notes.append(f"#{number} {run['name']} off-scale ({label} {point[1]:.3g})")
      ax.scatter(point[0], top, marker="^", s=60, zorder=3, color=color)
      ax.annotate(f"{number} (off-scale)", (point[0], top), fontsize=7, xytext=(4, -10),
                  textcoords="offset points")
      continue
    families.setdefault(family, []).append(point)
    ax.scatter(*point, s=40, zorder=3, color=color)
    ax.annotate(str(number), point, fontsize=7, xytext=(4, 4), textcoords="offset points")
  for i, (family, points) in enumerate(families.items()):
    front = pareto_front(points)
    ax.plot(*zip(*front), "-", alpha=0.7, color=colors[i % len(colors)],
            label=f"{family} ({len(points)})")
  ax.set_xlabel("L0")
  ax.set_ylabel(label)
  if shown:
    ax.set_xscale("log")
    ax.margins(0.12)  # room for the numbers inside the axes, clear of the tick labels
  if key == "fvu" and families:
    ax.set_yscale("log")
  title = "; ".join(sorted(sources))
  targets = sorted({run["eval"].get("lm_targets") for _, run, _ in shown
                    if run["eval"] and run["eval"].get("lm_targets")})
  if key.startswith("delta_lm_loss") and len(targets) > 1:
    title += (f"\nmeasured on different numbers of target tokens"
              f" ({', '.join(f'{t:,}' for t in targets)}): compare with care")
  ax.set_title(title, fontsize=8)
  if not shown:
    ax.text(0.5, 0.5, "nothing to plot yet: no run has " + (
        "a delta LM loss (run jsae eval)" if key.startswith("delta_lm_loss")
        else f"a finite {label}"), ha="center", va="center", transform=ax.transAxes,
        fontsize=9, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])
  ax.grid(alpha=0.3)
  if families:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return notes


def _fmt(v, spec=".3g"):
  if isinstance(v, int) and not isinstance(v, bool):
    return str(v)  # d_sae, steps: whole numbers as they are (16384, not 1.64e+04)
  return "—" if v is None else format(v, spec) if isinstance(v, float) else html.escape(str(v))


def _knob(config: dict) -> str:
  """The run's sparsity knob as its family writes it (lambda, k, ...)."""
  family = config["sae"]["family"]
  target = saes.get(family).l0_target(config) if family in saes.names() else None
  if target is not None:  # lambda was steered to this L0
    return f"target L0 {_fmt(target)}"
  knob = saes.get(family).knob_value(config) if family in saes.names() else None
  return "—" if knob is None else f"{html.escape(knob[0])} {_fmt(knob[1])}"


def _row(number: int, run: dict) -> str:
  c, e = run["config"], run["eval"] or {}
  last = run["metrics"][-1] if run["metrics"] else {}
  l0 = fvu = None
  found = sparsity_point(run, "fvu")
  if found:  # not evaluated: the training log's figures (see the Pareto plot's title)
    (l0, fvu), _ = found
  status = (run.get("status") or {}).get("status", "ok")
  cells = [number, run["name"], series(run), c["sae"]["d_sae"], _knob(c),
           last.get("step"), status, l0, fvu, e.get("delta_lm_loss"),
           e.get("delta_lm_loss_zero"), e.get("ce_loss_score", e.get("loss_recovered")),
           e.get("kl_div_score"), e.get("lm_targets"), e.get("dead_frac"),
           e.get("dense_frac")]
  return "<tr>" + "".join(f"<td>{v if i == 4 else _fmt(v)}</td>"
                          for i, v in enumerate(cells)) + "</tr>"


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>jsae report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child {{ text-align: left; }}
img {{ max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }}
pre {{ background: #f8f8f8; padding: 0.8em; overflow-x: auto; font-size: 12px; }}
</style></head><body>
<h1>jsae report</h1>
<p>{n} run(s). Metrics on held-out tokens; delta LM loss in nats per token. CE and KL
scores as SAEBench defines them, (ablation &minus; SAE) / (ablation &minus; clean), against
the zero ablation of the positions the SAE is spliced into (SAEBench's own ablation, of every
position, is in each run's SAEBench file: <code>config.eval.saebench</code>).</p>
<table><tr><th>#</th><th>run</th><th>family</th><th>d_sae</th><th>sparsity knob</th><th>steps</th>
<th>status</th><th>L0</th><th>FVU</th><th>&Delta; LM loss</th><th>zero-abl. &Delta;</th>
<th>CE score</th><th>KL score</th><th>LM targets</th><th>dead</th><th>dense</th></tr>
{rows}</table>
<h2>Sparsity-fidelity trade-off</h2>
<p>Numbers on the markers are the runs' rows above.</p>
<img src="pareto_delta_loss.png" alt="delta LM loss vs L0"> <img src="pareto_fvu.png" alt="FVU vs L0">
{notes}
<h2>Training curves</h2>
<img src="curves.png" alt="training curves">
<h2>Latent density</h2>
{density}
{browser}
<h2>Configs</h2>
{configs}
<script>
// Lets a headless browser (and the tests) confirm every plot decoded.
window.addEventListener("load", () => {{
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.title = `jsae report: ${{ok}}/${{imgs.length}} images`;
  document.body.setAttribute("data-images-ok", `${{ok}}/${{imgs.length}}`);
}});
</script>
</body></html>
"""


def write_report(run_dirs: list[str | Path], out_dir: str | Path, *,
                 browser: str | Path | None = None) -> Path:
  """Writes the plots and index.html for `run_dirs` into `out_dir`; returns index.html.

  `browser`: a feature browser's index.html (`jsae browse`) to link to.
  """
  if not run_dirs:
    raise ValueError("no run directories given; pass one or more training workdirs.")
  runs = [load_run(d) for d in run_dirs]
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  plot_curves(runs, out / "curves.png")
  notes = plot_pareto(runs, "delta_lm_loss", "delta LM loss (nats)", out / "pareto_delta_loss.png")
  notes += plot_pareto(runs, "fvu", "FVU", out / "pareto_fvu.png")
  density = []
  for i, run in enumerate(runs):
    if run["freq"] is not None:
      plot_density(run, out / f"density_{i}.png")
      density.append(f'<img src="density_{i}.png" alt="density of {html.escape(run["name"])}">')
  configs = "".join(
      f"<details><summary>{html.escape(r['name'])} ({html.escape(str(r['dir']))})</summary>"
      f"<pre>{html.escape(json.dumps(r['config'], indent=2))}</pre></details>" for r in runs)
  index = out / "index.html"
  index.write_text(_PAGE.format(
      n=len(runs), rows="\n".join(_row(i, r) for i, r in enumerate(runs, 1)),
      notes=("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in dict.fromkeys(notes))
             + "</ul>") if notes else "",
      density="\n".join(density) or "<p>No evaluation yet (run <code>jsae eval</code>).</p>",
      configs=configs, browser=_browser_link(browser, out)))
  return index


def _browser_link(browser, out: Path) -> str:
  if browser is None:
    return ""
  target = Path(os.path.relpath(Path(browser).absolute(), out.absolute()))
  return (f'<h2>Latents</h2><p><a href="{html.escape(target.as_posix())}">The feature browser'
          "</a>: every latent's top contexts, quantile samples, histogram and logit"
          " effects.</p>")
