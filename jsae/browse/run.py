"""`browse`: held-out text -> per-latent statistics -> the static site or Neuronpedia files.

Steps: check the inputs (SAE width against the site, enough tokens, an output
directory that is empty or this SAE's) -> stream the text through the LM and the
SAE (`stream.stream`) -> logit effects in chunks (`logits.logit_effects`) -> records
with decoded windows -> write.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from jsae import evals, stages
from jsae.browse import accumulate, logits, neuronpedia, site, stream
from jsae.lm import gemma

FORMATS = ("site", "neuronpedia")
RECORD_NAME = "browse.json"


class BrowseError(ValueError):
  """An input the browser cannot use; the message names it and the fix."""


def settings_from_config(config) -> stream.BrowseSettings:
  """`BrowseSettings` from `config.browse`."""
  b = config.browse
  return stream.BrowseSettings(n_top=b.n_top, n_samples=b.n_samples, n_bands=b.n_bands,
                               per_band=b.per_band, window_left=b.window_left,
                               window_right=b.window_right, batch_size=b.batch_size,
                               seed=b.seed)


def browsed_contexts(config, contexts):
  """The held-out contexts the pass streams: the first `config.browse.max_tokens` tokens."""
  if config.browse.max_tokens <= 0:
    return contexts
  kept = int(np.searchsorted(np.cumsum(contexts.mask.sum(1)), config.browse.max_tokens)) + 1
  return contexts.take(slice(0, kept))


def browse_definition(config, sae, lm, contexts, text_source: str, fmt: str) -> dict:
  """What defines a browser: the SAE's weights, the site, the LM, the streamed text,
  the settings and the format (recorded in DIR/browse.json)."""
  return dict(sae=stages.array_fingerprint(*jax.tree.leaves(sae)), site=config.lm.site,
              lm=lm.definition(), text_source=text_source, format=fmt,
              settings=dataclasses.asdict(settings_from_config(config)),
              contexts=stages.array_fingerprint(contexts.tokens, contexts.mask))


def _check_out_dir(out: Path, definition: dict, fmt: str) -> None:
  record = out / RECORD_NAME
  if record.exists():
    saved = json.loads(record.read_text())
    if saved.get("sae") != definition["sae"]:
      raise BrowseError(f"{out} holds the browser of another SAE (weights {saved.get('sae')},"
                        f" this one {definition['sae']}); pass another --out, or delete it.")
  elif out.exists() and any(out.iterdir()) and fmt == "site":
    raise BrowseError(f"{out} is not empty and holds no jsae browser ({RECORD_NAME}); pass"
                      " a new or empty --out directory.")


def check_latents(latents, d_sae: int) -> list[int] | None:
  """The requested latent ids, checked against `d_sae` (None: all)."""
  if latents is None:
    return None
  bad = [l for l in latents if not 0 <= l < d_sae]
  if bad:
    raise BrowseError(f"latent id(s) {bad} out of range: this SAE has latents 0 ... {d_sae - 1}.")
  return sorted(set(latents))


def _logit_strings(eff: logits.LogitEffects, tokenizer) -> list[dict]:
  ids = np.unique(np.concatenate([eff.top_tokens.ravel(), eff.bottom_tokens.ravel()]))
  name = dict(zip(ids.tolist(), stream.token_strings(tokenizer, ids)))
  return [dict(pos=[[name[int(t)], float(v)] for t, v in zip(eff.top_tokens[l], eff.top_values[l])],
               neg=[[name[int(t)], float(v)] for t, v in zip(eff.bottom_tokens[l],
                                                              eff.bottom_values[l])])
          for l in range(eff.top_tokens.shape[0])]


@dataclasses.dataclass
class BrowseResult:
  """What `browse` wrote and how fast.

  Attributes:
    path: index.html (site) or the output directory (neuronpedia).
    tokens: held-out tokens streamed.
    tokens_per_s: speed of the streaming pass.
    logit_s: seconds of the logit-effect pass.
    records: the per-latent records written.
  """

  path: Path
  tokens: int
  tokens_per_s: float
  logit_s: float
  records: list


def browse(config, sae, lm, contexts, out_dir, *, fmt: str = "site", text_source: str = "",
           latents=None, progress: bool = True, say=print) -> BrowseResult:
  """Every latent's browser data from `contexts` (held-out text) into `out_dir`.

  Args:
    config: a config with `lm.site` and `browse` (configs/default.py).
    sae: the SAE (a `jsae.SAE` of any family; raw units of the site).
    lm: a `pipeline.LM` (params, config, tokenizer, name).
    contexts: held-out `TokenContexts`.
    out_dir: the output directory.
    fmt: 'site' or 'neuronpedia'.
    text_source: a description of the text (recorded, and Neuronpedia's `dataset`).
    latents: ids of the latents whose pages are written (default: all; the
      statistics always cover every latent).
  """
  if fmt not in FORMATS:
    raise BrowseError(f"--format={fmt}: expected one of {', '.join(FORMATS)}.")
  site_name = config.lm.site
  evals.check_sae_matches_site(sae.d_in, lm.config, site_name)
  latents = check_latents(latents, sae.d_sae)
  settings = settings_from_config(config)
  contexts = browsed_contexts(config, contexts)
  if contexts.n_tokens < settings.n_top:
    raise BrowseError(f"the held-out text has {contexts.n_tokens} tokens, fewer than the"
                      f" {settings.n_top} examples asked per latent; raise"
                      " config.text.max_eval_tokens or lower config.browse.n_top.")
  out = Path(out_dir)
  definition = browse_definition(config, sae, lm, contexts, text_source, fmt)
  _check_out_dir(out, definition, fmt)

  edges = accumulate.hist_edges()
  stats_sharding = None
  sharding = getattr(jax.tree.leaves(sae)[0], "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is not None and "model" in mesh.axis_names and mesh.shape["model"] > 1:
    P = jax.sharding.PartitionSpec
    stats_sharding = jax.tree.map(
        lambda a: jax.sharding.NamedSharding(mesh, P("model") if a.ndim else P()),
        accumulate.init(1, n_top=1, n_samples=1, window=1, n_bins=1))
  t0 = time.perf_counter()
  stats = stream.stream(sae, lm.params, lm.config, site_name, contexts, settings, edges=edges,
                        stats_sharding=stats_sharding, progress=progress)
  jax.block_until_ready(stats)
  stream_s = time.perf_counter() - t0
  say(f"browse: {contexts.n_tokens:,} tokens through {site_name} and {sae.d_sae} latents"
      f" in {stream_s:.0f}s ({contexts.n_tokens / stream_s:,.0f} tokens/s)")
  t0 = time.perf_counter()
  eff = logits.logit_effects(sae.params.W_dec, lm.params, lm.config, site_name,
                             k=config.browse.logit_tokens)
  logit_s = time.perf_counter() - t0
  records = stream.latent_records(stats, contexts, lm.tokenizer, settings, edges, latents)
  strings = _logit_strings(eff, lm.tokenizer)
  if fmt == "site":
    if latents is not None:  # the index lists every latent; pages exist for the chosen ones
      chosen = {r["id"]: r for r in records}
      records = [chosen.get(l) or _stub(l, stats) for l in range(sae.d_sae)]
    path = site.write_site(out, records, strings, edges=edges, tokens=int(stats.tokens_seen),
                           title=f"{sae.d_sae} latents at {site_name} of {lm.name}",
                           meta=f"{contexts.n_tokens:,} held-out tokens of {text_source}",
                           per_file=config.browse.latents_per_file)
  else:
    kind, layer = gemma.parse_site(site_name, lm.config)
    hists = list(zip(eff.hist_heights, eff.hist_centres))
    neuronpedia.write_batches(out, records, strings, hists, edges, model_id=lm.config.name,
                              layer=layer, sae_set=f"jsae-{kind}-{sae.d_sae}",
                              n_prompts=contexts.n_contexts, prompt_tokens=contexts.seq_len,
                              dataset=text_source)
    path = out
  (out / RECORD_NAME).write_text(json.dumps(definition, indent=2, sort_keys=True) + "\n")
  return BrowseResult(path=path, tokens=contexts.n_tokens,
                      tokens_per_s=contexts.n_tokens / stream_s, logit_s=logit_s,
                      records=records)


def _stub(latent: int, stats) -> dict:
  """An index-only record (no page data) for a latent outside `latents`."""
  n = int(stats.fire_count[latent])
  seen = max(int(stats.tokens_seen), 1)
  return dict(id=latent, fire_count=n, density=n / seen, max=float(stats.max_value[latent]),
              mean=float(stats.sum_value[latent]) / max(n, 1), hist=[], top=[], bands=[])


__all__ = ["BrowseError", "BrowseResult", "FORMATS", "browse", "check_latents",
           "settings_from_config"]
