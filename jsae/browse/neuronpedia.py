"""Neuronpedia upload files in the layout SAEDashboard's Neuronpedia runner writes.

    DIR/batch-0.json, batch-1.json, ...   {"model_id", "layer", "sae_set", "features": [...]}

Each feature holds `feature_index`, the direct logit effect (`pos_str` / `pos_values`,
`neg_str` / `neg_values`), `frac_nonzero`, the activation histogram
(`freq_hist_data_bar_values` / `_heights`, 50 bars over the active values), the logit
histogram (`logits_hist_data_bar_values` / `_heights`, 50 bars over the vocabulary),
`n_prompts_total`, `n_tokens_in_prompt`, `dataset` and `activations`: the top
examples (`bin_min` -1, `bin_max` the max activation, `bin_contains` -1) then the
quantile bands from the highest down (`bin_min` / `bin_max` the interval, `bin_contains`
its share of tokens), each with `tokens`, `values` and `qualifying_token_index`. Values
are rounded to 3 decimals, as the runner rounds them.

Left out (empty lists, as the runner writes them when it does not compute them):
the neuron-alignment and correlated-neuron/feature tables and `decoder_weights_dist`.
The activation histogram is re-binned from jsae's fine log-spaced bins (each bin's
count goes to the linear bar holding its centre), not from the raw values; examples are
windows of `window_left + 1 + window_right` tokens, not whole prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_BARS = 50


def _r(x) -> float:
  return float(np.round(float(x), 3))


def _activation_bars(counts, edges, vmax: float) -> tuple[list, list]:
  counts = np.asarray(counts)
  if vmax <= 0 or counts.sum() == 0:
    return [], []
  centres = np.sqrt(edges[:-1] * edges[1:])
  bar_edges = np.linspace(0.0, vmax, _BARS + 1)
  which = np.clip(np.searchsorted(bar_edges, centres, side="right") - 1, 0, _BARS - 1)
  heights = np.bincount(which, weights=counts, minlength=_BARS)
  values = (bar_edges[:-1] + bar_edges[1:]) / 2
  return [_r(v) for v in values], [int(h) for h in heights]


def _activation(example: dict, bin_min, bin_max, bin_contains) -> dict:
  return dict(bin_min=bin_min, bin_max=bin_max, bin_contains=bin_contains,
              tokens=example["tokens"], values=[_r(v) for v in example["values"]],
              qualifying_token_index=example["token_index"])


def feature(record: dict, logit_strings: dict, logit_hist: tuple, edges, *, n_prompts: int,
            prompt_tokens: int, dataset: str) -> dict:
  """One latent's feature object."""
  bar_values, bar_heights = _activation_bars(record["hist"], edges, record["max"])
  activations = [_activation(e, -1, _r(record["max"]), -1) for e in record["top"]]
  for band in record["bands"]:
    activations += [_activation(e, _r(band["min"]), _r(band["max"]), _r(band["contains"]))
                    for e in band["examples"]]
  heights, centres = logit_hist
  return dict(
      feature_index=record["id"],
      neuron_alignment_indices=[], neuron_alignment_values=[], neuron_alignment_l1=[],
      correlated_neurons_indices=[], correlated_neurons_l1=[], correlated_neurons_pearson=[],
      correlated_features_indices=[], correlated_features_l1=[],
      correlated_features_pearson=[],
      neg_str=[s for s, _ in logit_strings["neg"]], neg_values=[_r(v) for _, v in logit_strings["neg"]],
      pos_str=[s for s, _ in logit_strings["pos"]], pos_values=[_r(v) for _, v in logit_strings["pos"]],
      frac_nonzero=record["density"],
      freq_hist_data_bar_values=bar_values, freq_hist_data_bar_heights=bar_heights,
      logits_hist_data_bar_heights=[int(h) for h in heights],
      logits_hist_data_bar_values=[_r(c) for c in centres],
      n_prompts_total=n_prompts, n_tokens_in_prompt=prompt_tokens, dataset=dataset,
      decoder_weights_dist=[], activations=activations)


def write_batches(out_dir: str | Path, records: list[dict], logit_strings: list[dict],
                  logit_hists: list[tuple], edges, *, model_id: str, layer: int, sae_set: str,
                  n_prompts: int, prompt_tokens: int, dataset: str,
                  per_batch: int = 128) -> list[Path]:
  """Writes DIR/batch-N.json for `records` (in id order: every latent, or the chosen ones);
  returns the files. `logit_strings` and `logit_hists` (heights, centres) hold one entry
  per record, in the records' order."""
  if not len(records) == len(logit_strings) == len(logit_hists):
    raise ValueError(f"write_batches: {len(records)} records, {len(logit_strings)} logit"
                     f" tables and {len(logit_hists)} logit histograms; pass one of each per"
                     " record, in the records' order.")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  files = []
  for n, start in enumerate(range(0, len(records), per_batch)):
    part = slice(start, start + per_batch)
    feats = [feature(r, strings, hist, edges, n_prompts=n_prompts, prompt_tokens=prompt_tokens,
                     dataset=dataset)
             for r, strings, hist in zip(records[part], logit_strings[part], logit_hists[part])]
    path = out / f"batch-{n}.json"
    path.write_text(json.dumps(dict(model_id=model_id, layer=layer, sae_set=sae_set,
                                    features=feats)))
    files.append(path)
  return files


__all__ = ["feature", "write_batches"]
