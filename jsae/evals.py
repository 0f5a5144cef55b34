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

The LM passes share the prefix below the hook site and never build a
[batch, seq, vocab] tensor (see "LM splicing" below); tests/reference/
three_forward_eval.py is the direct three-forward form they are tested against.

An `sae` is any pytree with `encode(x) -> f` and `decode(f) -> x_hat` in the
LM's units (e.g. `jsae.SAE`; `jsae.SAE.from_training` wraps training-time params),
and `predict(f, x)` where its output depends on x too (a skip transcoder).
It is passed to jitted functions as an argument, never baked in as a constant.
A transcoder's metrics compare its prediction with its target site (y in place
of x above), and its delta LM loss puts it in place of the MLP.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jsae import jsonio
from jsae.lm import gemma, next_token
from jsae.lm import mesh as lm_mesh

DENSE_THRESHOLD = 0.1
MIN_DENSITY_TOKENS = 100_000
SHARD_BATCH_ROWS = 8192  # held-out rows per batch of the activation metrics


# ---------------------------------------------------------------- accumulators


def _zero_stats(d_in: int, d_sae: int, max_l0_bin: int) -> dict:
  z = lambda *s: jnp.zeros(s, jnp.float32)
  return dict(n=z(), sum_x=z(d_in), sum_sq_x=z(), sum_err=z(), sum_cos=z(),
              sum_xhat_sq=z(), sum_x_xhat=z(), sum_l0=z(), sum_l1=z(), sum_norm_x=z(),
              sum_norm_xhat=z(), sum_l2_ratio=z(), sum_ev_batch=z(), fires=z(d_sae),
              l0_hist=z(max_l0_bin + 1), contexts=z(), contexts_fired=z(d_sae))


def _accumulate(stats: dict, x: jax.Array, f: jax.Array, x_hat: jax.Array,
                weight: jax.Array) -> dict:
  """Adds a batch of tokens `x: [n, d_in]` (weight [n] in {0, 1}) to the sums."""
  x, x_hat = x.astype(jnp.float32), x_hat.astype(jnp.float32)
  w = weight.astype(jnp.float32)
  active = (f != 0).astype(jnp.float32)
  l0 = active.sum(-1)
  dot = jnp.sum(x * x_hat, -1)
  norm_x, norm_xhat = jnp.linalg.norm(x, axis=-1), jnp.linalg.norm(x_hat, axis=-1)
  cos = dot / jnp.maximum(norm_x * norm_xhat, 1e-12)
  err = jnp.sum(jnp.square(x - x_hat), -1)
  # Per-token explained variance against this batch's mean (SAEBench's "legacy" form).
  batch_mean = (w[:, None] * x).sum(0) / jnp.maximum(w.sum(), 1.0)
  ev_batch = 1 - err / jnp.sum(jnp.square(x - batch_mean), -1)
  bins = stats["l0_hist"].shape[0]
  hist = jnp.zeros(bins).at[jnp.minimum(l0, bins - 1).astype(jnp.int32)].add(w)
  counted = lambda v: jnp.where(w > 0, w * v, 0.0).sum()  # padding rows may divide by 0
  return dict(
      stats,
      n=stats["n"] + w.sum(),
      sum_x=stats["sum_x"] + (w[:, None] * x).sum(0),
      sum_sq_x=stats["sum_sq_x"] + (w * jnp.sum(x * x, -1)).sum(),
      sum_err=stats["sum_err"] + (w * err).sum(),
      sum_cos=stats["sum_cos"] + (w * cos).sum(),
      sum_xhat_sq=stats["sum_xhat_sq"] + (w * jnp.sum(x_hat * x_hat, -1)).sum(),
      sum_x_xhat=stats["sum_x_xhat"] + (w * dot).sum(),
      sum_l0=stats["sum_l0"] + (w * l0).sum(),
      sum_l1=stats["sum_l1"] + (w * f.astype(jnp.float32).sum(-1)).sum(),
      sum_norm_x=stats["sum_norm_x"] + (w * norm_x).sum(),
      sum_norm_xhat=stats["sum_norm_xhat"] + (w * norm_xhat).sum(),
      sum_l2_ratio=stats["sum_l2_ratio"] + (w * norm_xhat
                                            / jnp.where(norm_x < 1e-4, 1.0, norm_x)).sum(),
      sum_ev_batch=stats["sum_ev_batch"] + counted(ev_batch),
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
  with np.errstate(invalid="ignore", divide="ignore"):  # an all-zero output has no bias: NaN
    bias = float(s["sum_xhat_sq"] / s["sum_x_xhat"])
  out = dict(
      tokens=int(n), l0=float(s["sum_l0"] / n), fvu=float(s["sum_err"] / total_var),
      mse=float(s["sum_err"] / n), cosine=float(s["sum_cos"] / n),
      relative_reconstruction_bias=bias,
      dead_frac=float(np.mean(freq == 0)),
      dense_frac=float(np.mean(freq > DENSE_THRESHOLD)),
      l1=float(s["sum_l1"] / n), l2_norm_in=float(s["sum_norm_x"] / n),
      l2_norm_out=float(s["sum_norm_xhat"] / n), l2_ratio=float(s["sum_l2_ratio"] / n),
      mean_squared_norm=float(s["sum_sq_x"] / n),
      explained_variance_batch=float(s["sum_ev_batch"] / n),
      l0_histogram=s["l0_hist"].astype(int).tolist(),
      firing_frequency=freq.astype(np.float32))
  if s["contexts"] > 0:  # the LM pass: in how many contexts each latent fired
    out.update(contexts=int(s["contexts"]), contexts_fired=s["contexts_fired"].astype(np.int64))
  return out


def _output(sae, f: jax.Array, x: jax.Array) -> jax.Array:
  """The SAE's output for latents `f` of `x`: `predict` (with a skip transcoder's skip)
  where it has one, else `decode`."""
  predict = getattr(sae, "predict", None)
  return sae.decode(f) if predict is None else predict(f, x)


@functools.partial(jax.jit, static_argnames=("d_in",))
def _activation_step(stats, sae, rows, weight, d_in=None):
  x, y = (rows, rows) if d_in is None else (rows[:, :d_in], rows[:, d_in:])
  f = sae.encode(x)
  return _accumulate(stats, y, f, _output(sae, f, x), weight)


def activation_metrics(sae, batches: Iterable[tuple[Any, Any]], *, d_in: int, d_sae: int,
                       d_out: int | None = None, max_l0_bin: int = 1024,
                       over_processes: bool = False) -> dict:
  """Reconstruction and sparsity metrics over `(x [n, d_in], weight [n])` batches.

  A transcoder (`d_out` given): rows are `[x, y]` pairs `[n, d_in + d_out]`, and the
  fidelity metrics (FVU, cosine, ...) compare `sae(x)` with y. With `over_processes`
  each process passes its share of the batches (`shard_batches(share=...)`) and the sums
  are added across processes before the metrics are formed.
  """
  stats = _zero_stats(d_in if d_out is None else d_out, d_sae, max_l0_bin)
  for rows, weight in batches:
    stats = _activation_step(stats, sae, jnp.asarray(rows), jnp.asarray(weight),
                             d_in=None if d_out is None else d_in)
  return _finish(sum_over_processes(stats) if over_processes else stats)


def process_share(index: int | None = None, count: int | None = None) -> tuple[int, int]:
  """(this process, processes): which batches `shard_batches` and `evaluate_many` take
  (batch i belongs to process i % count). Defaults: JAX's."""
  return (jax.process_index() if index is None else int(index),
          jax.process_count() if count is None else int(count))


def _mine(i: int, share: tuple[int, int] | None) -> bool:
  return share is None or i % share[1] == share[0]


def sum_over_processes(tree):
  """`tree`'s arrays summed over every JAX process (float64 on the host); as it is on one.

  Each process's partial sums cover its share of the batches; the sum is the one-process
  result up to the order of the additions.
  """
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  def halves(a):  # JAX moves float32: a float64 as float32 high and low parts keeps ~48 bits
    a = np.asarray(jax.device_get(a), np.float64)
    high = a.astype(np.float32)
    return high, (a - high).astype(np.float32)

  gathered = multihost_utils.process_allgather(jax.tree.map(halves, tree))  # [processes, ...]
  return jax.tree.map(lambda high, low: (np.asarray(high, np.float64)
                                         + np.asarray(low, np.float64)).sum(0),
                      *_unzip(gathered, tree))


def _unzip(pairs, like):
  """A tree of (high, low) pairs shaped like `like` -> (tree of highs, tree of lows)."""
  leaves = jax.tree.leaves(pairs)
  treedef = jax.tree.structure(like)
  return treedef.unflatten(leaves[0::2]), treedef.unflatten(leaves[1::2])


def pair_batches(x_dir, y_dir, batch_rows: int = SHARD_BATCH_ROWS, *,
                 share: tuple[int, int] | None = None):
  """`shard_batches` of two row-aligned directories (a transcoder's input and target) as
  `([x, y] rows [n, d_in + d_out], weights [n])` batches."""
  from jsae.data import pairs  # pylint: disable=import-outside-toplevel
  pairs.check_aligned(x_dir, y_dir)
  for (x, weight), (y, _) in zip(shard_batches(x_dir, batch_rows, share=share),
                                 shard_batches(y_dir, batch_rows, share=share)):
    yield np.concatenate([x, y], axis=-1), weight


def shard_batches(directory, batch_rows: int = SHARD_BATCH_ROWS, *,
                  share: tuple[int, int] | None = None):
  """`(rows [n, d_in] float32, ones [n])` batches over every row of a shard directory, in
  order; with `share` (`process_share`) only this process's batches (the i-th batch of the
  directory belongs to process i % count), and only the shards holding them are read."""
  from jsae.data import shards as shards_lib
  manifest = shards_lib.load_manifest(directory)
  dtype = shards_lib.storage_dtype(manifest.dtype)
  n_batch = 0
  for i, entry in enumerate(manifest.shards):
    starts = range(0, entry.rows, batch_rows)
    numbers = range(n_batch, n_batch + len(starts))
    n_batch += len(starts)
    if not any(_mine(b, share) for b in numbers):
      continue
    problem = shards_lib.check_shard_file(directory, manifest, i, checksum=True)
    if problem:
      raise shards_lib.ShardError(problem)
    rows = np.memmap(f"{directory}/{entry.file}", dtype=dtype, mode="r",
                     shape=(entry.rows, manifest.d_in))
    for start, number in zip(starts, numbers):
      if not _mine(number, share):
        continue
      chunk = np.asarray(rows[start:start + batch_rows], np.float32)
      if len(chunk) < batch_rows:  # pad to one compiled shape; padding has weight 0
        weight = np.concatenate([np.ones(len(chunk)), np.zeros(batch_rows - len(chunk))])
        chunk = np.concatenate([chunk, np.zeros((batch_rows - len(chunk), manifest.d_in),
                                                np.float32)])
      else:
        weight = np.ones(batch_rows)
      yield chunk, weight.astype(np.float32)


# ---------------------------------------------------------------- LM splicing
#
# Per batch of contexts the LM runs its prefix up to the hooked block once;
# from there the clean and zero-ablated suffixes run once and each SAE's
# spliced suffix once, all stopping at the final-normed hidden states. The
# unembedding, log-softmax, NLL and KL then run over all of them a chunk of
# positions at a time (`next_token.loss_sums`): no [batch, seq, vocab] tensor.

DEFAULT_MEMORY_BYTES = 2 << 30

# Backends where bfloat16 unembedding was measured to pay and to keep the numbers:
# XLA:CPU with AVX512-BF16 multiplies [256, 640] x [640, 65536] 1.6-1.9x faster than in
# float32 and runs the whole pass 1.4x faster (bench/eval.py), and on Gemma 3 270M's demo
# SAE delta LM loss moved by 3e-4 nats, KL by 1e-4 relative. `unembed_dtype("auto")` is
# float32 elsewhere until measured there.
BF16_UNEMBED_BACKENDS = ("cpu",)


def unembed_dtype(setting: str, backend: str | None = None) -> str:
  """`config.eval.unembed_dtype` resolved: 'auto' is bfloat16 on `BF16_UNEMBED_BACKENDS`
  (default JAX's backend), else float32; 'float32' and 'bfloat16' are themselves."""
  if setting != "auto":
    return setting
  return "bfloat16" if (backend or jax.default_backend()) in BF16_UNEMBED_BACKENDS else "float32"


def _prefix_fn(lm_config: gemma.GemmaConfig, site: str, target_site: str | None = None,
               zero_every_position: bool = False):
  """A jitted fn(lm_params, tokens, mask) -> (resid, x, y, h_clean, h_zeros [A, ...]).

  What every SAE of a site shares: the residual stream entering the hooked
  block (`resid`), the site's activations `x` (and `y`, a transcoder's target
  site; `x` again for SAEs), and the final hidden states of the clean and the
  zero-ablated forwards (the target site zeroed: for a transcoder, the MLP's
  output) where the SAEs are spliced in; with `zero_every_position` also the
  zero ablation of every position, BOS/EOS/pad included (SAEBench's ablation).
  """
  target = target_site or site
  layer = gemma.parse_site(site, lm_config)[1]

  def fn(lm_params, tokens, mask):
    resid = gemma.residual_before(lm_params, tokens, lm_config, layer)
    suffix = functools.partial(gemma.forward, lm_params, tokens, lm_config, start_layer=layer,
                               resid=resid, logits=False)
    h_clean, acts = suffix(capture=tuple(dict.fromkeys((site, target))))
    zero = lambda a: jnp.where(mask[..., None], jnp.zeros_like(a), a)
    h_zeros = [suffix(splice={target: zero})[0]]
    if zero_every_position:
      h_zeros.append(suffix(splice={target: jnp.zeros_like})[0])
    return resid, acts[site], acts[target], h_clean, jnp.stack(h_zeros)

  return jax.jit(fn)


def _member_fn(lm_config: gemma.GemmaConfig, site: str, target_site: str | None = None):
  """A jitted fn(lm_params, sae, tokens, mask, resid, x, y, stats) -> (stats, h_spliced):
  one SAE's reconstruction metrics and its spliced suffix from the hooked block.

  A transcoder (`target_site`) takes the place of the MLP: the suffix computes the
  MLP's output from its input through the transcoder, and the MLP is not run.
  """
  layer = gemma.parse_site(site, lm_config)[1]

  def fn(lm_params, sae, tokens, mask, resid, x, y, stats):
    flat = x.reshape(-1, x.shape[-1])
    f = sae.encode(flat)
    y_hat = _output(sae, f, flat)
    stats = _accumulate(stats, y.reshape(-1, y.shape[-1]), f, y_hat, mask.reshape(-1))
    fired = ((f != 0).reshape(*mask.shape, -1) & mask[..., None]).any(1)  # [batch, d_sae]
    stats = dict(stats, contexts=stats["contexts"] + mask.any(1).sum(),
                 contexts_fired=stats["contexts_fired"] + fired.sum(0))
    # Splice only where the SAE was trained (mask True): BOS/EOS/pad keep their
    # own activations. The BOS residual is huge (an attention sink) and never
    # in the training data; replacing it would measure that, not the SAE. The
    # site's value in this suffix is `x` (same prefix), so y_hat is reused; so is
    # the clean `y` where a transcoder keeps the MLP's own output.
    keep = mask[..., None]
    spliced = lambda a: jnp.where(keep, y_hat.reshape(y.shape).astype(a.dtype),
                                  y.astype(a.dtype))
    hooks = (dict(transcode={target_site: spliced}) if target_site
             else dict(splice={site: spliced}))
    h_spliced, _ = gemma.forward(lm_params, tokens, lm_config, start_layer=layer, resid=resid,
                                 logits=False, **hooks)
    return stats, h_spliced

  return jax.jit(fn)


def _loss_fn(lm_config: gemma.GemmaConfig, chunk: int, unembed_dtype: str):
  """A jitted fn(embed, h_clean, h_others [K, ...], tokens, mask) -> sums [2 + 2K]."""

  def fn(embed, h_clean, h_others, tokens, mask):
    return next_token.loss_sums({"embed": embed}, lm_config, h_clean, h_others, tokens, mask,
                                chunk=chunk, unembed_dtype=jnp.dtype(unembed_dtype))

  return jax.jit(fn)


def auto_batch_size(lm_config: gemma.GemmaConfig, site: str, seq_len: int, n_saes: int,
                    budget_bytes: int) -> int:
  """Contexts per batch whose forwards fit `budget_bytes` (at least 1, at most 64).

  Per context: the hidden states kept for the loss (resid, the site, clean,
  zero and one per SAE) and one block's transient tensors (attention scores
  per head, the MLP's hidden layer), all float32.
  """
  c = lm_config
  kept = seq_len * (c.d_model * (3 + n_saes) + site_width(c, site)) * 4
  block = seq_len * (c.n_heads * seq_len + 3 * c.d_ff + 8 * c.d_model) * 4
  return int(min(64, max(1, budget_bytes // (kept + block))))


def _on_lm_devices(lm_params, sae):
  """`sae` on the LM's devices: its latents split over the mesh's model axis where they
  divide it (a wide SAE then takes 1/model of each device, as the LM's weights do), else
  whole on each."""
  mesh = lm_mesh.mesh_of(lm_params)
  if (mesh is not None and mesh.shape["model"] > 1 and hasattr(sae, "shard")
      and sae.d_sae % mesh.shape["model"] == 0):
    return sae.shard(mesh)
  return lm_mesh.replicate(lm_params, sae)


def _batch_starts(n_contexts: int, batch_size: int, share: tuple[int, int] | None):
  """The first context of each of this process's batches."""
  starts = range(0, n_contexts, batch_size)
  return [start for i, start in enumerate(starts) if _mine(i, share)]


def _batches(contexts, batch_size: int, lm_params, starts):
  """(tokens, mask) batches of `batch_size` contexts from each of `starts`, split over the
  LM mesh's data axis (`lm_mesh.put_batch`); the last is padded by wrapping and masked
  out, so every batch has one compiled shape."""
  n = contexts.n_contexts
  for start in starts:
    idx = np.arange(start, start + batch_size) % n
    valid = (np.arange(start, start + batch_size) < n)[:, None]
    yield (lm_mesh.put_batch(lm_params, contexts.tokens[idx]),
           lm_mesh.put_batch(lm_params, contexts.mask[idx] & valid))


def evaluate(lm_params, lm_config: gemma.GemmaConfig, sae, *, site: str, contexts,
             batch_size: int = 0, memory_bytes: int = DEFAULT_MEMORY_BYTES,
             min_density_tokens: int = MIN_DENSITY_TOKENS, progress: bool = True,
             target_site: str | None = None, unembed_dtype: str = "float32") -> dict:
  """All metrics of the module docstring on held-out `contexts` (TokenContexts).

  `batch_size` contexts per LM forward (0: from `memory_bytes`, see
  `evaluate_many`); `target_site` for a transcoder and `unembed_dtype`: see
  `evaluate_many`.

  Raises:
    ValueError: when the SAE's width does not match the site, or the eval set
      has fewer than `min_density_tokens` tokens (too few for the density
      statistics; pass a smaller `min_density_tokens` to accept that).
  """
  if contexts.n_tokens < min_density_tokens:
    raise ValueError(
        f"the eval set has {contexts.n_tokens:,} tokens, fewer than the {min_density_tokens:,}"
        " needed for per-latent firing frequencies; use more eval text or lower"
        " min_density_tokens (config.eval.min_density_tokens).")
  return evaluate_many(lm_params, lm_config, {"sae": sae}, site=site, contexts=contexts,
                       batch_size=batch_size, memory_bytes=memory_bytes,
                       progress=progress, target_site=target_site,
                       unembed_dtype=unembed_dtype)["sae"]


def _lm_summary(targets, clean, spliced, zero, kl, kl_zero) -> dict:
  """Delta LM loss and its companions from summed NLLs and KLs over `targets` tokens.

  `loss_recovered` (SAEBench's `ce_loss_score`) is (CE_zero - CE_spliced) /
  (CE_zero - CE_clean) and `kl_div_score` is (KL_zero - KL_spliced) / KL_zero,
  both against the zero ablation of the positions the SAE is spliced into.
  """
  out = dict(
      ce_clean=clean / targets, ce_spliced=spliced / targets, ce_zero_ablation=zero / targets,
      delta_lm_loss=(spliced - clean) / targets, delta_lm_loss_zero=(zero - clean) / targets,
      kl_div=kl / targets, kl_div_zero_ablation=kl_zero / targets, lm_targets=int(targets))
  out["loss_recovered"] = 1 - out["delta_lm_loss"] / max(out["delta_lm_loss_zero"], 1e-12)
  out["kl_div_score"] = 1 - kl / max(kl_zero, 1e-12)
  return out


def evaluate_many(lm_params, lm_config: gemma.GemmaConfig, saes: dict, *, site: str, contexts,
                  batch_size: int = 0, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                  progress: bool = True, target_site: str | None = None,
                  zero_every_position: bool = False, unembed_dtype: str = "float32",
                  process_index: int | None = None, process_count: int | None = None) -> dict:
  """`evaluate` for many SAEs of one site: {name: metrics}, the LM shared.

  On several processes (`process_index` of `process_count`, default JAX's) each runs
  its share of the batches of contexts (batch i on process i % count) on its own LM
  mesh, and the sums are added across processes: every process returns the metrics of
  all the contexts; `lm_contexts_per_process` says how many each one ran. (A share given
  in a one-process JAX job, as tests do, returns that share's own metrics.)

  `zero_every_position` adds SAEBench's ablation, every position's activation
  zeroed (BOS/EOS/pad too): `ce_zero_ablation_every_position` and
  `kl_div_zero_ablation_every_position` (one more suffix and unembedding a token).

  With `target_site` the SAEs are transcoders of `site` (mlp_in.L) to it
  (mlp_out.L): fidelity metrics compare their prediction with the target, the
  spliced forward puts it in place of the MLP (`gemma.forward`'s transcode), and
  the zero ablation zeroes the MLP's output.

  `unembed_dtype` "bfloat16" multiplies the hidden states and the embedding in
  bfloat16 for the logits (float32 accumulation; everything else float32): the
  unembedding is most of this pass's work (Gemma's 262k-token vocabulary), and on
  CPUs with bfloat16 instructions it runs about twice as fast.

  Per batch of contexts the LM prefix up to the hooked block, the clean
  forward and the zero ablation run once; each SAE adds only its
  encode/decode and its spliced suffix (from the hooked block on), and the
  losses of all of them are computed together a chunk of positions at a time.
  SAEs of one family and shape share one compiled program. `memory_bytes`
  bounds the working set: half for the forwards (`batch_size` 0 picks the
  batch from it, `auto_batch_size`), half for the chunks of logits.
  """
  d_in = site_width(lm_config, site)
  d_out = site_width(lm_config, target_site) if target_site else d_in
  widths = {}
  for name, sae in saes.items():
    probe = jax.eval_shape(sae.encode, jax.ShapeDtypeStruct((1, d_in), jnp.float32))
    widths[name] = probe.shape[-1]
  n = contexts.n_contexts
  if batch_size <= 0:
    batch_size = auto_batch_size(lm_config, site, contexts.tokens.shape[1], len(saes),
                                 memory_bytes // 2)
    batch_size = -(-n // -(-n // batch_size))  # as many batches, the least padding
  batch_size = lm_mesh.round_batch(batch_size, lm_params)  # every data device gets contexts
  chunk = next_token.chunk_positions(lm_config.vocab_size, memory_bytes // 2)
  prefix = _prefix_fn(lm_config, site, target_site, zero_every_position)
  member = _member_fn(lm_config, site, target_site)
  losses = _loss_fn(lm_config, chunk, unembed_dtype)
  embed = lm_params["embed"].astype(unembed_dtype)  # once, not per chunk
  saes = {name: _on_lm_devices(lm_params, sae) for name, sae in saes.items()}
  stats = lm_mesh.replicate(lm_params, {name: _zero_stats(d_out, widths[name], 1024)
                                        for name in saes})
  n_zero = 2 if zero_every_position else 1
  k = n_zero + len(saes)
  sums = np.zeros(2 + 2 * k)  # targets, clean, (zeros..., SAEs...) NLLs, the same KLs
  share = process_share(process_index, process_count)
  starts = _batch_starts(n, batch_size, share)
  mine = sum(min(batch_size, n - start) for start in starts)  # contexts this process runs
  bar = tqdm(total=sum(int(contexts.mask[s:s + batch_size].sum()) for s in starts),
             disable=not progress, unit="tok", desc=f"eval ({len(saes)} SAE{'s' if len(saes) > 1 else ''})", dynamic_ncols=True,
             mininterval=1.0)
  for tokens, mask in _batches(contexts, batch_size, lm_params, starts):
    resid, x, y, h_clean, h_zeros = prefix(lm_params, tokens, mask)
    spliced = []
    for name, sae in saes.items():
      stats[name], h = member(lm_params, sae, tokens, mask, resid, x, y, stats[name])
      spliced.append(h)
    others = jnp.concatenate([h_zeros, jnp.stack(spliced)])
    sums += np.asarray(losses(embed, h_clean, others, tokens, mask), np.float64)
    bar.update(int(np.asarray(mask).sum()))
  bar.close()
  sums, stats = sum_over_processes((sums, stats))
  per_process = sum_over_processes(np.eye(share[1])[share[0]] * mine)
  targets, clean = sums[0], sums[1]
  nll, kls = sums[2:2 + k], sums[2 + k:]
  out = {}
  for i, name in enumerate(saes):
    out[name] = _finish(stats[name])
    out[name].update(_lm_summary(targets, clean, nll[n_zero + i], nll[0], kls[n_zero + i],
                                 kls[0]), site=site, d_in=d_in, d_sae=widths[name],
                     lm_batch_size=batch_size,
                     lm_contexts_per_process=[int(c) for c in per_process])
    if zero_every_position:
      out[name].update(ce_zero_ablation_every_position=nll[1] / targets,
                       kl_div_zero_ablation_every_position=kls[1] / targets)
    if target_site:
      out[name].update(target_site=target_site, d_out=d_out)
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
  path.parent.mkdir(parents=True, exist_ok=True)  # `jsae eval --out=NEW_DIR/eval.json`
  metrics = dict(metrics)
  freq = metrics.pop("firing_frequency", None)
  if freq is not None:
    np.save(path.with_name(path.stem + "_firing_frequency.npy"), np.asarray(freq))
  path.write_text(json.dumps(jsonio.finite_or_none(metrics), indent=2, allow_nan=False)
                  + "\n")

