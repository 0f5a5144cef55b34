"""`browse`: held-out text -> per-latent statistics -> the static site or Neuronpedia files.

Steps: check the inputs (SAE width against the site, enough tokens, an output
directory that is empty or this SAE's) -> stream the text through the LM and the
SAE (`stream.stream`) -> logit effects in chunks (`logits.logit_effects`) -> records
with decoded windows -> write. Given `latents`, every step after the SAE's encode
works on those latents alone, and only they are written.
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
from jsae.lm import mesh as lm_mesh

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


def output_site(config, sae) -> str:
  """Where the SAE's decoder rows live: its own site, or a transcoder's target site
  (config.sae.target_site), whose rows reach the logits through the MLP output's path.

  Raises BrowseError for a transcoder without a target site in the config."""
  if not sae.transcoder:
    return config.lm.site
  target = config.sae.get("target_site", "") or sae.provenance.get("target_site", "")
  if not target:
    raise BrowseError("the SAE is a transcoder: set config.sae.target_site to the site it"
                      " predicts (e.g. mlp_out.6), for its logit effects.")
  return target


def browse_definition(config, sae, lm, contexts, text_source: str, fmt: str,
                      latents: list[int] | None = None) -> dict:
  """What defines a browser: the SAE's weights, the site, the LM, the streamed text,
  the settings, the format and, for a browser of chosen latents, their ids (recorded in
  DIR/browse.json; a browser of every latent records no `latents`, as before)."""
  definition = dict(sae=stages.array_fingerprint(*jax.tree.leaves(sae)), site=config.lm.site,
                    **({"target_site": output_site(config, sae)} if sae.transcoder else {}),
                    lm=lm.definition(), text_source=text_source, format=fmt,
                    settings=dataclasses.asdict(settings_from_config(config)),
                    contexts=stages.array_fingerprint(contexts.tokens, contexts.mask))
  if latents is not None:  # so the demo never reuses a browser of some latents as its own
    definition["latents"] = list(latents)
  return definition


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
  """The requested latent ids, checked against `d_sae`, sorted, each once (None: all)."""
  if latents is None:
    return None
  if not len(latents):
    raise BrowseError("--latents names no latent; name some (--latents=3,17,42), or leave"
                      " the flag out to browse every latent.")
  bad = [l for l in latents if not 0 <= l < d_sae]
  if bad:
    raise BrowseError(f"latent id(s) {bad} out of range: this SAE has latents 0 ... {d_sae - 1}.")
  return sorted(set(latents))


def coverage(latents: list[int] | None, d_sae: int, max_groups: int = 12) -> str:
  """Which latents a browser covers, for people: 'all 4,096 latents', '3 of 4,096
  latents: 3, 17, 200', '1,000 of 4,096 latents: 0-999' (runs of consecutive ids as
  ranges; past `max_groups` of them, the number left out).

  Args:
    latents: sorted distinct ids (`check_latents`), or None for every latent.
    d_sae: the SAE's width.
  """
  if latents is None:
    return f"all {d_sae:,} latents"
  groups, start = [], 0
  for i in range(1, len(latents) + 1):  # a group ends where the next id is not one more
    if i == len(latents) or latents[i] != latents[i - 1] + 1:
      first, last = latents[start], latents[i - 1]
      groups.append(str(first) if first == last else f"{first}-{last}")
      start = i
  shown = ", ".join(groups[:max_groups])
  if len(groups) > max_groups:
    shown += f", ... ({len(groups) - max_groups} more)"
  return f"{len(latents):,} of {d_sae:,} latents: {shown}"


def _stats_sharding(sae, n_rows: int):
  """The accumulators' shardings for a latent-sharded SAE (on its `model` axis), else None.

  A subset of latents whose count the `model` axis does not divide stays on one device:
  jax shards a dimension only in equal parts, and a subset's accumulators are small.
  """
  sharding = getattr(jax.tree.leaves(sae)[0], "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or "model" not in mesh.axis_names or mesh.shape["model"] <= 1:
    return None
  if n_rows % mesh.shape["model"]:
    return None
  P = jax.sharding.PartitionSpec
  return jax.tree.map(
      lambda a: jax.sharding.NamedSharding(mesh, P("model") if a.ndim else P()),
      accumulate.init(1, n_top=1, n_samples=1, window=1, n_bins=1))


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
    records: the per-latent records written (every latent, or the chosen ones).
    covers: which latents, in words (`coverage`).
  """

  path: Path
  tokens: int
  tokens_per_s: float
  logit_s: float
  records: list
  covers: str = ""


def browse(config, sae, lm, contexts, out_dir, *, fmt: str = "site", text_source: str = "",
           latents=None, progress: bool = True, say=print) -> BrowseResult:
  """Every latent's (or the chosen latents') browser data from `contexts` (held-out text)
  into `out_dir`.

  Args:
    config: a config with `lm.site` and `browse` (configs/default.py).
    sae: the SAE (a `jsae.SAE` of any family; raw units of the site).
    lm: a `pipeline.LM` (params, config, tokenizer, name).
    contexts: held-out `TokenContexts`.
    out_dir: the output directory.
    fmt: 'site' or 'neuronpedia'.
    text_source: a description of the text (recorded, and Neuronpedia's `dataset`).
    latents: ids of the latents browsed (default: all). Only their statistics and
      logit effects are computed and only they are written and listed; each one's
      content is what a browser of every latent shows for it.
  """
  if fmt not in FORMATS:
    raise BrowseError(f"--format={fmt}: expected one of {', '.join(FORMATS)}.")
  site_name = config.lm.site
  evals.check_sae_matches_site(sae.d_in, lm.config, site_name)
  decoder_site = output_site(config, sae)  # a transcoder's contexts are on its input
  evals.check_sae_matches_site(sae.d_out, lm.config, decoder_site)
  latents = check_latents(latents, sae.d_sae)
  settings = settings_from_config(config)
  contexts = browsed_contexts(config, contexts)
  if contexts.n_tokens < settings.n_top:
    raise BrowseError(f"the held-out text has {contexts.n_tokens} tokens, fewer than the"
                      f" {settings.n_top} examples asked per latent; raise"
                      " config.text.max_eval_tokens or lower config.browse.n_top.")
  out = Path(out_dir)
  definition = browse_definition(config, sae, lm, contexts, text_source, fmt, latents)
  _check_out_dir(out, definition, fmt)
  ours = (out / RECORD_NAME).exists()  # this SAE's browser was written here before
  covers = coverage(latents, sae.d_sae)
  n_rows = sae.d_sae if latents is None else len(latents)

  edges = accumulate.hist_edges()
  t0 = time.perf_counter()
  stats_sharding = _stats_sharding(sae, n_rows)
  # Several processes (each with the whole SAE) stream contiguous shares of the contexts
  # and merge their accumulators in order: the one-process statistics.
  split = jax.process_count() > 1 and stats_sharding is None
  share = (stream.process_range(contexts.n_contexts, jax.process_index(), jax.process_count())
           if split else None)
  stats = stream.stream(sae, lm.params, lm.config, site_name, contexts, settings, edges=edges,
                        stats_sharding=stats_sharding, latents=latents, progress=progress,
                        context_range=share)
  if split:
    stats = stream.merge_over_processes(stats)
  jax.block_until_ready(stats)
  stream_s = time.perf_counter() - t0
  browsed = f"{sae.d_sae}" if latents is None else f"{n_rows} of {sae.d_sae}"
  say(f"browse: {contexts.n_tokens:,} tokens through {site_name} and {browsed} latents"
      f" in {stream_s:.0f}s ({contexts.n_tokens / stream_s:,.0f} tokens/s)")
  t0 = time.perf_counter()
  w_dec = sae.params.W_dec if latents is None else sae.params.W_dec[np.asarray(latents)]
  w_dec = lm_mesh.replicate(lm.params, w_dec)  # on the LM's devices (its mesh, if any)
  eff = logits.logit_effects(w_dec, lm.params, lm.config, decoder_site,
                             k=config.browse.logit_tokens)
  logit_s = time.perf_counter() - t0
  records = stream.latent_records(stats, contexts, lm.tokenizer, settings, edges, latents)
  result = BrowseResult(path=out, tokens=contexts.n_tokens,
                        tokens_per_s=contexts.n_tokens / stream_s, logit_s=logit_s,
                        records=records, covers=covers)
  if jax.process_index() != 0:  # process 0 writes what every process holds
    return result
  strings = _logit_strings(eff, lm.tokenizer)  # one per record, in the records' order
  if fmt == "site":
    what = f"{sae.d_sae} latents" if latents is None else covers
    where = (f"of a transcoder {site_name} -> {decoder_site}" if sae.transcoder
             else f"at {site_name}")
    path = site.write_site(out, records, strings, edges=edges, tokens=int(stats.tokens_seen),
                           title=f"{what} {where} of {lm.name}",
                           meta=f"{contexts.n_tokens:,} held-out tokens of {text_source}",
                           per_file=config.browse.latents_per_file,
                           covers=None if latents is None else covers)
  else:
    kind, layer = gemma.parse_site(site_name, lm.config)
    hists = list(zip(eff.hist_heights, eff.hist_centres))
    files = neuronpedia.write_batches(out, records, strings, hists, edges,
                                      model_id=lm.config.name, layer=layer,
                                      sae_set=f"jsae-{kind}-{sae.d_sae}",
                                      n_prompts=contexts.n_contexts,
                                      prompt_tokens=contexts.seq_len, dataset=text_source)
    if ours:
      _remove_stale_batches(out, files)
    path = out
  (out / RECORD_NAME).write_text(json.dumps(definition, indent=2, sort_keys=True) + "\n")
  return dataclasses.replace(result, path=path)


def _remove_stale_batches(out: Path, written: list[Path]) -> None:
  """Removes batch-N.json files of an earlier export of this SAE that this one did not
  write (it covered more latents): an upload of the directory then holds only this one."""
  for path in out.glob("batch-*.json"):
    if path not in written:
      path.unlink()


__all__ = ["BrowseError", "BrowseResult", "FORMATS", "browse", "check_latents", "coverage",
           "settings_from_config"]
