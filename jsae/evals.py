"""SAE evaluation: reconstruction, sparsity, latent density and delta LM loss.

All metrics are computed in the LM's own units on held-out tokens, with
BOS/EOS/pad positions excluded, by jitted, batched passes:

  L0             mean number of active latents per token (and its histogram)
  FVU            sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
  cosine         mean over tokens of cos(x, x_hat)
  rel. bias      gamma = sum ||x_hat||^2 / sum <x, x_hat> (1: unbiased, < 1: shrinkage)
  density        per-latent firing frequency; dead = never fires, dense > 10%
  delta LM loss  CE with x_hat spliced in at the hook site at every text position
                 (BOS/EOS/pad keep their own activations, as they were excluded
                 from training) minus the clean CE (next-token targets, special
                 tokens masked), with the zero-ablation delta (same positions)
                 and KL(clean || spliced) beside it

An `sae` is any pytree with `encode(x) -> f` and `decode(f) -> x_hat` in the
LM's units (e.g. `jsae.SAE`; `jsae.SAE.from_training` wraps training-time params).
It is passed to jitted functions as an argument, never baked in as a constant.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jsae.lm import gemma

DENSE_THRESHOLD = 0.1
MIN_DENSITY_TOKENS = 100_000


# ---------------------------------------------------------------- accumulators


def _zero_stats(d_in: int, d_sae: int, max_l0_bin: int) -> dict:
  z = lambda *s: jnp.zeros(s, jnp.float32)
  return dict(n=z(), sum_x=z(d_in), sum_sq_x=z(), sum_err=z(), sum_cos=z(),
              sum_xhat_sq=z(), sum_x_xhat=z(), sum_l0=z(), fires=z(d_sae),
              l0_hist=z(max_l0_bin + 1))


def _accumulate(stats: dict, x: jax.Array, f: jax.Array, x_hat: jax.Array,
                weight: jax.Array) -> dict:
  """Adds a batch of tokens `x: [n, d_in]` (weight [n] in {0, 1}) to the sums."""
  x, x_hat = x.astype(jnp.float32), x_hat.astype(jnp.float32)
  w = weight.astype(jnp.float32)
  active = (f != 0).astype(jnp.float32)
  l0 = active.sum(-1)
  dot = jnp.sum(x * x_hat, -1)
  cos = dot / jnp.maximum(jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(x_hat, axis=-1), 1e-12)
  bins = stats["l0_hist"].shape[0]
  hist = jnp.zeros(bins).at[jnp.minimum(l0, bins - 1).astype(jnp.int32)].add(w)
  return dict(
      n=stats["n"] + w.sum(),
      sum_x=stats["sum_x"] + (w[:, None] * x).sum(0),
      sum_sq_x=stats["sum_sq_x"] + (w * jnp.sum(x * x, -1)).sum(),
      sum_err=stats["sum_err"] + (w * jnp.sum(jnp.square(x - x_hat), -1)).sum(),
      sum_cos=stats["sum_cos"] + (w * cos).sum(),
      sum_xhat_sq=stats["sum_xhat_sq"] + (w * jnp.sum(x_hat * x_hat, -1)).sum(),
      sum_x_xhat=stats["sum_x_xhat"] + (w * dot).sum(),
      sum_l0=stats["sum_l0"] + (w * l0).sum(),
      fires=stats["fires"] + (w[:, None] * active).sum(0),
      l0_hist=stats["l0_hist"] + hist)


def _finish(stats: dict) -> dict:
  """Metrics from the accumulated sums (host floats)."""
  s = {k: np.asarray(v, np.float64) for k, v in stats.items()}
  n = s["n"]
  if n == 0:
    raise ValueError("no tokens to evaluate (every position was masked).")
  total_var = s["sum_sq_x"] - np.sum(s["sum_x"] ** 2) / n
  freq = s["fires"] / n
  return dict(
      tokens=int(n), l0=float(s["sum_l0"] / n), fvu=float(s["sum_err"] / total_var),
      mse=float(s["sum_err"] / n), cosine=float(s["sum_cos"] / n),
      relative_reconstruction_bias=float(s["sum_xhat_sq"] / s["sum_x_xhat"]),
      dead_frac=float(np.mean(freq == 0)),
      dense_frac=float(np.mean(freq > DENSE_THRESHOLD)),
      l0_histogram=s["l0_hist"].astype(int).tolist(),
      firing_frequency=freq.astype(np.float32))


@jax.jit
def _activation_step(stats, sae, x, weight):
  f = sae.encode(x)
  return _accumulate(stats, x, f, sae.decode(f), weight)


def activation_metrics(sae, batches: Iterable[tuple[Any, Any]], *, d_in: int, d_sae: int,
                       max_l0_bin: int = 1024) -> dict:
  """Reconstruction and sparsity metrics over `(x [n, d_in], weight [n])` batches."""
  stats = _zero_stats(d_in, d_sae, max_l0_bin)
  for x, weight in batches:
    stats = _activation_step(stats, sae, jnp.asarray(x), jnp.asarray(weight))
  return _finish(stats)


def shard_batches(directory, batch_rows: int = 8192):
  """`(rows [n, d_in] float32, ones [n])` batches over every row of a shard directory, in order."""
  from jsae.data import shards as shards_lib
  manifest = shards_lib.load_manifest(directory)
  dtype = shards_lib.storage_dtype(manifest.dtype)
  for i, entry in enumerate(manifest.shards):
    problem = shards_lib.check_shard_file(directory, manifest, i, checksum=True)
    if problem:
      raise shards_lib.ShardError(problem)
    rows = np.memmap(f"{directory}/{entry.file}", dtype=dtype, mode="r",
                     shape=(entry.rows, manifest.d_in))
    for start in range(0, entry.rows, batch_rows):
      chunk = np.asarray(rows[start:start + batch_rows], np.float32)
      if len(chunk) < batch_rows:  # pad to one compiled shape; padding has weight 0
        weight = np.concatenate([np.ones(len(chunk)), np.zeros(batch_rows - len(chunk))])
        chunk = np.concatenate([chunk, np.zeros((batch_rows - len(chunk), manifest.d_in),
                                                np.float32)])
      else:
        weight = np.ones(batch_rows)
      yield chunk, weight.astype(np.float32)


# ---------------------------------------------------------------- LM splicing


def _lm_eval_fn(lm_config: gemma.GemmaConfig, site: str):
  """A jitted fn(lm_params, sae, tokens, mask, stats) -> (stats, lm sums)."""

  def fn(lm_params, sae, tokens, mask, stats):
    clean, acts = gemma.forward(lm_params, tokens, lm_config, capture=(site,))
    x = acts[site]
    flat = x.reshape(-1, x.shape[-1])
    f = sae.encode(flat)
    stats = _accumulate(stats, flat, f, sae.decode(f), mask.reshape(-1))
    # Splice only where the SAE was trained (mask True): BOS/EOS/pad keep their
    # own activations. The BOS residual is huge (an attention sink) and never
    # in the training data; replacing it would measure that, not the SAE.
    keep = mask[..., None]
    reconstruct = lambda a: jnp.where(keep, sae.decode(sae.encode(a)).astype(a.dtype), a)
    zero = lambda a: jnp.where(keep, jnp.zeros_like(a), a)
    spliced, _ = gemma.forward(lm_params, tokens, lm_config, splice={site: reconstruct})
    zeroed, _ = gemma.forward(lm_params, tokens, lm_config, splice={site: zero})
    nll_clean, w = gemma.token_nll(clean, tokens, mask)
    nll_spliced, _ = gemma.token_nll(spliced, tokens, mask)
    nll_zero, _ = gemma.token_nll(zeroed, tokens, mask)
    logp_clean = jax.nn.log_softmax(clean[:, :-1], -1)
    logp_spliced = jax.nn.log_softmax(spliced[:, :-1], -1)
    kl = jnp.sum(jnp.exp(logp_clean) * (logp_clean - logp_spliced), -1) * w
    sums = jnp.stack([w.sum(), nll_clean.sum(), nll_spliced.sum(), nll_zero.sum(), kl.sum()])
    return stats, sums

  return jax.jit(fn)


def evaluate(lm_params, lm_config: gemma.GemmaConfig, sae, *, site: str, contexts,
             batch_size: int = 4, min_density_tokens: int = MIN_DENSITY_TOKENS,
             progress: bool = True) -> dict:
  """All metrics of the module docstring on held-out `contexts` (TokenContexts).

  Raises:
    ValueError: when the SAE's width does not match the site, or the eval set
      has fewer than `min_density_tokens` tokens (too few for the density
      statistics; pass a smaller `min_density_tokens` to accept that).
  """
  d_in = site_width(lm_config, site)
  probe = jax.eval_shape(sae.encode, jax.ShapeDtypeStruct((1, d_in), jnp.float32))
  d_sae = probe.shape[-1]
  if contexts.n_tokens < min_density_tokens:
    raise ValueError(
        f"the eval set has {contexts.n_tokens:,} tokens, fewer than the {min_density_tokens:,}"
        " needed for per-latent firing frequencies; use more eval text or lower"
        " min_density_tokens (config.eval.min_density_tokens).")
  fn = _lm_eval_fn(lm_config, site)
  stats = _zero_stats(d_in, d_sae, 1024)
  sums = np.zeros(5)
  n = contexts.n_contexts
  bar = tqdm(total=contexts.n_tokens, disable=not progress, unit="tok", desc="eval",
             dynamic_ncols=True, mininterval=1.0)
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size) % n  # pad the last batch by wrapping...
    valid = (np.arange(start, start + batch_size) < n)[:, None]  # ...and masking it out
    tokens = jnp.asarray(contexts.tokens[idx])
    mask = jnp.asarray(contexts.mask[idx] & valid)
    stats, batch_sums = fn(lm_params, sae, tokens, mask, stats)
    sums += np.asarray(batch_sums, np.float64)
    bar.update(int(np.asarray(mask).sum()))
  bar.close()
  out = _finish(stats)
  out.update(_lm_summary(*sums), site=site, d_in=d_in, d_sae=d_sae)
  return out


def _lm_summary(targets, clean, spliced, zero, kl) -> dict:
  """Delta LM loss and its companions from summed NLLs over `targets` tokens."""
  out = dict(
      ce_clean=clean / targets, ce_spliced=spliced / targets, ce_zero_ablation=zero / targets,
      delta_lm_loss=(spliced - clean) / targets, delta_lm_loss_zero=(zero - clean) / targets,
      kl_div=kl / targets, lm_targets=int(targets))
  out["loss_recovered"] = 1 - out["delta_lm_loss"] / max(out["delta_lm_loss_zero"], 1e-12)
  return out


# ---------------------------------------------------------------- many SAEs, one prefix


def _shared_fn(lm_config: gemma.GemmaConfig, site: str):
  """A jitted fn(lm_params, tokens, mask) -> (resid, x, logp_clean, w, sums[4]).

  What every SAE of a site shares: the LM up to the hooked block (`resid`), the
  clean suffix (the site's activations `x` and clean log-probabilities) and the
  zero ablation; sums = (targets, clean NLL, zero-ablation NLL, 0).
  """
  layer = gemma.parse_site(site, lm_config)[1]

  def fn(lm_params, tokens, mask):
    resid = gemma.residual_before(lm_params, tokens, lm_config, layer)
    suffix = functools.partial(gemma.forward, lm_params, tokens, lm_config, start_layer=layer,
                               resid=resid)
    clean, acts = suffix(capture=(site,))
    zero = lambda a: jnp.where(mask[..., None], jnp.zeros_like(a), a)
    zeroed, _ = suffix(splice={site: zero})
    nll_clean, w = gemma.token_nll(clean, tokens, mask)
    nll_zero, _ = gemma.token_nll(zeroed, tokens, mask)
    logp_clean = jax.nn.log_softmax(clean[:, :-1], -1)
    return resid, acts[site], logp_clean, w, jnp.stack(
        [w.sum(), nll_clean.sum(), nll_zero.sum()])

  return jax.jit(fn)


def _member_fn(lm_config: gemma.GemmaConfig, site: str):
  """A jitted fn(lm_params, sae, tokens, mask, resid, x, logp_clean, w, stats) ->
  (stats, [spliced NLL, KL]): one SAE's part, the spliced suffix from the hooked block."""
  layer = gemma.parse_site(site, lm_config)[1]

  def fn(lm_params, sae, tokens, mask, resid, x, logp_clean, w, stats):
    flat = x.reshape(-1, x.shape[-1])
    f = sae.encode(flat)
    stats = _accumulate(stats, flat, f, sae.decode(f), mask.reshape(-1))
    keep = mask[..., None]  # splice only where the SAE was trained (see `_lm_eval_fn`)
    reconstruct = lambda a: jnp.where(keep, sae.decode(sae.encode(a)).astype(a.dtype), a)
    spliced, _ = gemma.forward(lm_params, tokens, lm_config, splice={site: reconstruct},
                               start_layer=layer, resid=resid)
    nll_spliced, _ = gemma.token_nll(spliced, tokens, mask)
    logp_spliced = jax.nn.log_softmax(spliced[:, :-1], -1)
    kl = jnp.sum(jnp.exp(logp_clean) * (logp_clean - logp_spliced), -1) * w
    return stats, jnp.stack([nll_spliced.sum(), kl.sum()])

  return jax.jit(fn)


def evaluate_many(lm_params, lm_config: gemma.GemmaConfig, saes: dict, *, site: str, contexts,
                  batch_size: int = 4, progress: bool = True) -> dict:
  """`evaluate` for many SAEs of one site: {name: metrics}, the LM shared.

  Per batch of contexts the LM prefix up to the hooked block, the clean forward
  and the zero ablation run once; each SAE adds only its encode/decode and its
  spliced suffix (from the hooked block on). SAEs of one family and shape share
  one compiled program. Equals `evaluate` per SAE to float tolerance.
  """
  d_in = site_width(lm_config, site)
  widths = {}
  for name, sae in saes.items():
    probe = jax.eval_shape(sae.encode, jax.ShapeDtypeStruct((1, d_in), jnp.float32))
    widths[name] = probe.shape[-1]
  shared, member = _shared_fn(lm_config, site), _member_fn(lm_config, site)
  stats = {name: _zero_stats(d_in, widths[name], 1024) for name in saes}
  shared_sums = np.zeros(3)
  member_sums = {name: np.zeros(2) for name in saes}
  n = contexts.n_contexts
  bar = tqdm(total=contexts.n_tokens * len(saes), disable=not progress, unit="tok",
             desc=f"eval ({len(saes)} SAEs)", dynamic_ncols=True, mininterval=1.0)
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size) % n  # pad the last batch as `evaluate` does
    valid = (np.arange(start, start + batch_size) < n)[:, None]
    tokens = jnp.asarray(contexts.tokens[idx])
    mask = jnp.asarray(contexts.mask[idx] & valid)
    resid, x, logp_clean, w, sums = shared(lm_params, tokens, mask)
    shared_sums += np.asarray(sums, np.float64)
    for name, sae in saes.items():
      stats[name], sums = member(lm_params, sae, tokens, mask, resid, x, logp_clean, w,
                                 stats[name])
      member_sums[name] += np.asarray(sums, np.float64)
      bar.update(int(np.asarray(mask).sum()))
  bar.close()
  targets, clean, zero = shared_sums
  out = {}
  for name in saes:
    out[name] = _finish(stats[name])
    spliced, kl = member_sums[name]
    out[name].update(_lm_summary(targets, clean, spliced, zero, kl), site=site, d_in=d_in,
                     d_sae=widths[name])
  return out


def site_width(lm_config: gemma.GemmaConfig, site: str) -> int:
  """Width of the activations at `site` (d_model, or n_heads * head_dim for attn_z)."""
  kind, _ = gemma.parse_site(site, lm_config)
  return lm_config.n_heads * lm_config.head_dim if kind == "attn_z" else lm_config.d_model


def check_sae_matches_site(sae_d_in: int, lm_config: gemma.GemmaConfig, site: str) -> None:
  """Raises when an SAE of width `sae_d_in` cannot read `site` of the LM."""
  width = site_width(lm_config, site)
  if sae_d_in != width:
    raise ValueError(f"the SAE has d_in={sae_d_in} but {lm_config.name} site {site} has width"
                     f" {width}; evaluate it on the site it was trained on.")


def write_json(path, metrics: dict) -> None:
  """Writes metrics as JSON; the per-latent firing frequencies go to a .npy beside it."""
  from pathlib import Path
  path = Path(path)
  metrics = dict(metrics)
  freq = metrics.pop("firing_frequency", None)
  if freq is not None:
    np.save(path.with_name(path.stem + "_firing_frequency.npy"), np.asarray(freq))
  path.write_text(json.dumps({k: _jsonable(v) for k, v in metrics.items()}, indent=2) + "\n")


def _jsonable(v):
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v

