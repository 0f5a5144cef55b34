"""The static feature browser: plain HTML + data scripts + one small script, no server.

    DIR/index.html          every latent (or the chosen ones: --latents): id, density, max
                            and mean activation; sortable, searchable (?q=ID), paginated;
                            the density histogram
    DIR/latent.html?id=N    one latent: highlighted top examples (shading by activation,
                            the value as a tooltip), quantile-band samples, its activation
                            histogram, top / bottom logit tokens
    DIR/data/index.js       the index table (one small row per latent)
    DIR/data/latents-K.js   the full records of the index's rows K*per_file ... (a page
                            loads one)
    DIR/browse.json         what the browser was made from (refuses a different SAE)

Data files are scripts (`JSAE.chunk(...)`) rather than JSON so the pages work from
file:// URLs, where browsers refuse `fetch`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1100px}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:right}
th{cursor:pointer;background:#eee}tr:nth-child(even){background:#fafafa}
.ex{font-family:ui-monospace,monospace;white-space:pre-wrap;margin:3px 0;padding:3px;
border-bottom:1px solid #eee}.tok{border-radius:2px}.at{outline:2px solid #c40;font-weight:bold}
.bar{fill:#e80}.muted{color:#888}.logits td{text-align:left;font-family:ui-monospace,monospace}
h2{margin-top:1.2em}
"""

_SCRIPT = r"""
const JSAE = {chunks: {}, index: null,
  setIndex(d) { JSAE.index = d; }, chunk(k, d) { JSAE.chunks[k] = d; }};
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(x) { return x === 0 ? '0' : Math.abs(x) >= 100 ? x.toFixed(1) : x.toPrecision(3); }
function load(src, done) { const s = el('script', {src}); s.onload = done; document.head.appendChild(s); }
function bars(counts, labels, width, height) {
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('width', width); svg.setAttribute('height', height + 16);
  const m = Math.max(1, ...counts), w = width / Math.max(1, counts.length);
  counts.forEach((c, i) => {
    const r = document.createElementNS(svg.namespaceURI, 'rect');
    const h = height * c / m;
    r.setAttribute('x', i * w); r.setAttribute('y', height - h);
    r.setAttribute('width', Math.max(1, w - 1)); r.setAttribute('height', h);
    r.setAttribute('class', 'bar');
    const t = document.createElementNS(svg.namespaceURI, 'title');
    t.textContent = labels[i] + ': ' + c; r.appendChild(t); svg.appendChild(r);
  });
  const lo = document.createElementNS(svg.namespaceURI, 'text');
  lo.setAttribute('x', 0); lo.setAttribute('y', height + 13); lo.setAttribute('font-size', 11);
  lo.textContent = labels[0] + ' ... ' + labels[labels.length - 1]; svg.appendChild(lo);
  return svg;
}
function example(ex, vmax) {
  const div = el('div', {class: 'ex'});
  ex.tokens.forEach((t, i) => {
    const v = ex.values[i], a = vmax > 0 ? Math.max(0, Math.min(1, v / vmax)) : 0;
    const span = el('span', {class: 'tok' + (i === ex.token_index ? ' at' : ''),
      title: fmt(v), 'data-act': v, style: 'background:rgba(255,140,0,' + a.toFixed(3) + ')'}, t);
    div.appendChild(span);
  });
  return div;
}
function indexPage() {
  const d = JSAE.index, rows = d.rows, per = 200;
  const q = new URLSearchParams(location.search).get('q') || '';
  const box = document.getElementById('q'); box.value = q;
  let key = 0, desc = false, page = 0;
  const body = document.getElementById('rows');
  function shown() {
    const s = box.value.trim();
    let r = s === '' ? rows.slice() : rows.filter(x => String(x[0]) === s);
    r.sort((a, b) => (desc ? -1 : 1) * (a[key] - b[key]));
    return r;
  }
  function render() {
    const r = shown(); body.textContent = '';
    r.slice(page * per, (page + 1) * per).forEach(x => {
      const tr = el('tr', {'data-latent': x[0]});
      const td = el('td'); td.appendChild(el('a', {href: 'latent.html?id=' + x[0]}, x[0]));
      tr.appendChild(td);
      [x[1], x[2], x[3]].forEach(v => tr.appendChild(el('td', {}, fmt(v))));
      body.appendChild(tr);
    });
    document.getElementById('count').textContent = r.length + ' latent(s), page ' + (page + 1)
      + ' of ' + Math.max(1, Math.ceil(r.length / per));
  }
  document.querySelectorAll('th').forEach((th, i) => th.onclick = () => {
    desc = key === i ? !desc : true; key = i; page = 0; render(); });
  box.oninput = () => { page = 0; render(); };
  document.getElementById('prev').onclick = () => { page = Math.max(0, page - 1); render(); };
  document.getElementById('next').onclick = () => { page += 1; render(); };
  document.getElementById('title').textContent = d.title;
  document.getElementById('meta').textContent = d.meta;
  const h = document.getElementById('density');
  h.appendChild(bars(d.density_hist.counts, d.density_hist.labels, 600, 120));
  render();
}
function latentPage() {
  const id = parseInt(new URLSearchParams(location.search).get('id') || '0');
  load('data/index.js', () => {
    // Data files hold the index's rows in order: every latent, or only the chosen ones.
    const d = JSAE.index, at = d.rows.findIndex(x => x[0] === id);
    const k = Math.floor(at / d.per_file);
    if (at < 0) {
      document.getElementById('title').textContent = 'latent ' + id + (d.covers
        ? ' is not in this browser, which covers ' + d.covers
        : ' does not exist (0 ... ' + (d.rows.length - 1) + ')'); return; }
    load('data/latents-' + String(k).padStart(5, '0') + '.js', () => {
      const r = JSAE.chunks[k][at - k * d.per_file];
      document.title = 'latent ' + id;
      document.getElementById('title').textContent = 'latent ' + id;
      document.getElementById('stats').textContent = 'density ' + fmt(r.density)
        + ' (' + r.fire_count + ' of ' + d.tokens + ' tokens), max ' + fmt(r.max) + ', mean '
        + fmt(r.mean);
      const hist = document.getElementById('hist');
      if (r.hist.counts.length) hist.appendChild(bars(r.hist.counts, r.hist.labels, 500, 100));
      const lg = document.getElementById('logits');
      ['pos', 'neg'].forEach(side => {
        const t = el('table', {class: 'logits'});
        t.appendChild(el('tr')).appendChild(el('th', {}, side === 'pos' ? 'promoted' : 'suppressed'));
        r.logits[side].forEach(([s, v]) => { const tr = el('tr');
          tr.appendChild(el('td', {}, JSON.stringify(s))); tr.appendChild(el('td', {}, fmt(v)));
          t.appendChild(tr); });
        lg.appendChild(t);
      });
      const top = document.getElementById('top');
      if (!r.top.length) top.appendChild(el('p', {class: 'muted'}, 'never active on this text'));
      r.top.forEach(ex => top.appendChild(example(ex, r.max)));
      const bands = document.getElementById('bands');
      r.bands.forEach(b => {
        bands.appendChild(el('h3', {}, 'interval ' + fmt(b.min) + ' - ' + fmt(b.max)
          + ' (contains ' + (100 * b.contains).toPrecision(3) + '% of tokens)'));
        if (!b.examples.length) bands.appendChild(el('p', {class: 'muted'}, 'no sample'));
        b.examples.forEach(ex => bands.appendChild(example(ex, r.max)));
      });
    });
  });
}
"""

_INDEX = """<!doctype html><html><head><meta charset="utf-8"><title>jsae latents</title>
<style>{style}</style><script src="browse.js"></script><script src="data/index.js"></script>
</head><body><h1 id="title"></h1><p id="meta" class="muted"></p>
<h2>Density (log10 of the fraction of tokens on which a latent fires)</h2><div id="density"></div>
<h2>Latents</h2><p>Search by id: <input id="q" size="8"> <button id="prev">prev</button>
<button id="next">next</button> <span id="count"></span></p>
<table><thead><tr><th>latent</th><th>density</th><th>max act</th><th>mean act</th></tr></thead>
<tbody id="rows"></tbody></table><script>indexPage();</script></body></html>
"""

_LATENT = """<!doctype html><html><head><meta charset="utf-8"><title>latent</title>
<style>{style}</style><script src="browse.js"></script></head><body>
<p><a href="index.html">all latents</a></p><h1 id="title"></h1><p id="stats"></p>
<h2>Activation histogram (active tokens)</h2><div id="hist"></div>
<h2>Direct logit effect</h2><div id="logits" style="display:flex;gap:2em"></div>
<h2>Top activations</h2><div id="top"></div>
<h2>Quantile bands</h2><div id="bands"></div><script>latentPage();</script></body></html>
"""


def _script(call: str, payload) -> str:
  return f"JSAE.{call}({json.dumps(payload, separators=(',', ':'))});\n"


def _round(x: float) -> float:
  return float(f"{x:.4g}")


def _compact(record: dict, edges, logit_strings) -> dict:
  """A record as the page reads it: values rounded, the histogram trimmed to its range."""
  counts = record["hist"]
  nz = [i for i, c in enumerate(counts) if c]
  lo, hi = (nz[0], nz[-1] + 1) if nz else (0, 0)
  examples = lambda xs: [dict(tokens=e["tokens"], values=[_round(v) for v in e["values"]],
                              token_index=e["token_index"]) for e in xs]
  return dict(
      density=record["density"], fire_count=record["fire_count"], max=_round(record["max"]),
      mean=_round(record["mean"]),
      hist=dict(counts=counts[lo:hi], labels=[f"{edges[i]:.3g}" for i in range(lo, hi)]),
      logits=logit_strings, top=examples(record["top"]),
      bands=[dict(min=_round(b["min"]), max=_round(b["max"]), contains=b["contains"],
                  examples=examples(b["examples"])) for b in record["bands"]])


def write_site(out_dir: str | Path, records: list[dict], logit_strings: list[dict], *,
               edges, title: str, meta: str, tokens: int, per_file: int = 256,
               covers: str | None = None) -> Path:
  """Writes the browser for `records` into `out_dir`; returns index.html.

  Args:
    records: `stream.latent_records`, in id order: every latent, or the chosen ones.
    logit_strings: one per record, in the same order: {'pos': [[token, value], ...],
      'neg': [...]}.
    covers: for a browser of chosen latents, which ones (`run.coverage`): the index and
      the page of a latent left out say it. None: `records` are every latent.
  """
  if len(logit_strings) != len(records):
    raise ValueError(f"write_site: {len(records)} records but {len(logit_strings)} logit"
                     " tables; pass one table per record, in the records' order.")
  out = Path(out_dir)
  (out / "data").mkdir(parents=True, exist_ok=True)
  (out / "browse.js").write_text(_SCRIPT)
  (out / "index.html").write_text(_INDEX.replace("{style}", _STYLE))
  (out / "latent.html").write_text(_LATENT.replace("{style}", _STYLE))
  density = np.array([r["density"] for r in records])
  log_d = np.log10(density[density > 0]) if (density > 0).any() else np.zeros(0)
  counts, bin_edges = np.histogram(log_d, bins=40) if log_d.size else (np.zeros(0), [0])
  rows = [[r["id"], r["density"], _round(r["max"]), _round(r["mean"])] for r in records]
  index = dict(title=title, meta=meta + f"; {int((density == 0).sum())} latent(s) never fired",
               rows=rows, per_file=per_file, tokens=tokens,
               density_hist=dict(counts=[int(c) for c in counts],
                                 labels=[f"{e:.2f}" for e in bin_edges[:-1]]))
  if covers is not None:  # only then: a browser of every latent keeps today's index
    index["covers"] = covers
  (out / "data" / "index.js").write_text(_script("setIndex", index))
  written = set()
  for k in range(0, len(records), per_file):
    chunk = [_compact(r, edges, strings) for r, strings in zip(records[k:k + per_file],
                                                               logit_strings[k:k + per_file])]
    path = out / "data" / f"latents-{k // per_file:05d}.js"
    path.write_text(
        _script("chunk", chunk).replace("JSAE.chunk(", f"JSAE.chunk({k // per_file}, ", 1))
    written.add(path)
  # A browser written here before (of more latents) leaves data files of latents this one
  # does not cover: removed, so the directory holds only what its index links.
  for path in (out / "data").glob("latents-*.js"):
    if path not in written:
      path.unlink()
  return out / "index.html"


__all__ = ["write_site"]
