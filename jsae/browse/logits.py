"""Direct logit effects of SAE latents: each decoder row pushed through the rest of the LM's
linear path to the unembedding, in chunks over latents (the `[d_sae, vocab]` product never
exists whole).

For a latent with decoder row w (raw units at the hook site), the effect on the
logits is `u = (A w * (1 + final_norm)) @ embed.T`, with A the site's linear map into
the residual stream: the identity for resid_post / mlp_out, and the output projection
`o` followed by the post-attention norm's scale for attn_z (a transcoder's rows live
at its target, mlp_out; mlp_in has no linear path). The RMS normalisations'
1/rms factors are dropped: they are positive per token, so the ranking of tokens (top
and bottom) is the same, and values are in the usual "W_dec @ W_U" units.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jsae.lm import gemma


@dataclasses.dataclass
class LogitEffects:
  """Top and bottom tokens of every latent's direct logit effect.

  Attributes:
    top_tokens, top_values: `[d_sae, k]` the k most promoted token ids and effects.
    bottom_tokens, bottom_values: `[d_sae, k]` the k most suppressed (most negative first).
    hist_heights: `[d_sae, n_bins]` histogram of the effect over the whole vocabulary.
    hist_centres: `[d_sae, n_bins]` the bins' centres (each latent its own range).
  """

  top_tokens: np.ndarray
  top_values: np.ndarray
  bottom_tokens: np.ndarray
  bottom_values: np.ndarray
  hist_heights: np.ndarray
  hist_centres: np.ndarray


def residual_directions(w_dec: jax.Array, params, lm_config: gemma.GemmaConfig, site: str
                        ) -> jax.Array:
  """`[n, d_model]` residual-stream directions of decoder rows `w_dec [n, site width]`."""
  kind, layer = gemma.parse_site(site, lm_config)
  if kind == "mlp_in":
    raise ValueError(f"decoder rows at {site} (the MLP's input) have no linear path to the"
                     " logits: the MLP is in between. Browse an SAE of another site, or a"
                     f" transcoder of {site} (its rows are in mlp_out.{layer}).")
  w = w_dec.astype(jnp.float32)
  if kind == "attn_z":
    lp = params["layers"][layer]
    w = jnp.einsum("lnh,nhd->ld", w.reshape(w.shape[0], lm_config.n_heads, lm_config.head_dim),
                   lp["o"].astype(jnp.float32))
    w = w * (1.0 + lp["post_attn_norm"].astype(jnp.float32))
  return w


@functools.partial(jax.jit, static_argnames=("lm_config", "site", "k", "n_bins"))
def _chunk(w_dec, params, *, lm_config, site: str, k: int, n_bins: int):
  direction = residual_directions(w_dec, params, lm_config, site)
  direction = direction * (1.0 + params["final_norm"].astype(jnp.float32))
  u = direction @ params["embed"].astype(jnp.float32).T  # [chunk, vocab]
  top_v, top_i = jax.lax.top_k(u, k)
  bot_v, bot_i = jax.lax.top_k(-u, k)
  lo, hi = u.min(axis=1, keepdims=True), u.max(axis=1, keepdims=True)
  width = jnp.maximum(hi - lo, 1e-12) / n_bins
  bins = jnp.clip(((u - lo) / width).astype(jnp.int32), 0, n_bins - 1)
  heights = jax.vmap(lambda b: jnp.bincount(b, length=n_bins))(bins)
  centres = lo + width * (jnp.arange(n_bins) + 0.5)
  return top_i, top_v, bot_i, -bot_v, heights, centres


def logit_effects(w_dec, params, lm_config: gemma.GemmaConfig, site: str, *, k: int = 10,
                  n_bins: int = 50, chunk: int = 128, progress=None) -> LogitEffects:
  """Every latent's top/bottom `k` tokens and effect histogram, `chunk` latents at a time.

  Args:
    w_dec: `[d_sae, site width]` decoder rows in raw units (an `SAE`'s `params.W_dec`).
    params, lm_config: the LM.
    site: the SAE's hook site.
    progress: optional callable(n_done) after each chunk.
  """
  w_dec = jnp.asarray(w_dec)
  parts = []
  for start in range(0, w_dec.shape[0], chunk):
    block = w_dec[start:start + chunk]
    if block.shape[0] < chunk:  # one compiled shape: pad the last chunk
      block = jnp.pad(block, ((0, chunk - block.shape[0]), (0, 0)))
    out = jax.device_get(_chunk(block, params, lm_config=lm_config, site=site, k=k,
                                n_bins=n_bins))
    parts.append([np.asarray(a)[:min(chunk, w_dec.shape[0] - start)] for a in out])
    if progress is not None:
      progress(min(start + chunk, w_dec.shape[0]))
  cat = [np.concatenate(p) for p in zip(*parts)]
  return LogitEffects(*cat)


__all__ = ["LogitEffects", "logit_effects", "residual_directions"]
