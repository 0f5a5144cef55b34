"""Next-token losses of several forwards of the same tokens, a chunk of positions at a time.

Delta LM loss compares a clean forward with modified ones (an SAE spliced in,
the site zero-ablated): their next-token NLLs and KL(clean || modified). Gemma's
vocabulary is 262,144 tokens, so float32 logits [batch, seq, vocab] are 1 GiB
per 1024-token context, and a log-softmax of each is another. Here the forwards
stop at their final-normed hidden states (`gemma.forward(..., logits=False)`,
[batch, seq, d_model]); `loss_sums` unembeds one chunk of positions of all of
them, reduces it to sums and drops it, so peak memory is a few
[chunk, vocab] tensors and the clean log-probabilities are computed once per
chunk for every modified forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsae.lm import gemma

# A chunk step holds about this many float32 [chunk, vocab] tensors at once:
# the clean logits, log-probs and probs, one modified forward's logits and log-probs.
_LIVE_TENSORS = 6


def chunk_positions(vocab: int, budget_bytes: int) -> int:
  """Positions per chunk so a chunk step's float32 [chunk, vocab] tensors fit `budget_bytes`.

  A power of two in [8, 4096]: matmuls of 8+ rows stay efficient, and one
  compiled shape serves every budget in a factor-of-two band.
  """
  fit = max(1, budget_bytes // (_LIVE_TENSORS * 4 * vocab))
  return int(min(4096, max(8, 2 ** (fit.bit_length() - 1))))


def loss_sums(params, config: gemma.GemmaConfig, clean: jax.Array, others: jax.Array,
              tokens: jax.Array, mask: jax.Array, *, chunk: int,
              unembed_dtype=None) -> jax.Array:
  """Summed next-token losses of a clean forward and K modified forwards.

  Position t predicts token t + 1; a position counts when its target does
  (`mask[:, t + 1]`, as in `gemma.token_nll`).

  Args:
    params: the LM's params (the tied embedding unembeds).
    config: its `GemmaConfig` (static).
    clean: [batch, seq, d_model] final-normed hidden states of the clean forward.
    others: [K, batch, seq, d_model] the same for K modified forwards.
    tokens: [batch, seq] int.
    mask: [batch, seq] bool, True where a token counts as a target.
    chunk: positions unembedded at once (static; `chunk_positions`).
    unembed_dtype: the unembedding matmul's input dtype (None: the hidden states'); it
      accumulates in float32, and everything after it is float32. bfloat16 halves the
      cost where the hardware multiplies bfloat16 natively (pass the embedding in it).

  Returns:
    float32 [2 + 2K]: (targets, clean NLL, K NLLs, K KL(clean || modified)),
    each summed over the counted positions.
  """
  k, d = others.shape[0], clean.shape[-1]
  if unembed_dtype is not None:
    clean, others = clean.astype(unembed_dtype), others.astype(unembed_dtype)
  h = clean[:, :-1].reshape(-1, d)
  h_others = others[:, :, :-1].reshape(k, -1, d)
  targets = tokens[:, 1:].reshape(-1)
  weights = mask[:, 1:].reshape(-1).astype(jnp.float32)
  pad = (-h.shape[0]) % chunk  # padded positions have weight 0
  h = jnp.pad(h, ((0, pad), (0, 0)))
  h_others = jnp.pad(h_others, ((0, 0), (0, pad), (0, 0)))
  targets, weights = jnp.pad(targets, (0, pad)), jnp.pad(weights, (0, pad))
  n_chunks = h.shape[0] // chunk

  def one_chunk(args):
    h_c, h_others_c, t_c, w_c = args  # [c, d], [K, c, d], [c], [c]
    target = lambda a: jnp.take_along_axis(a, t_c[:, None], -1)[:, 0]
    # KL(p || q) = sum p log p - sum p log q, with log p = l - lse(l), log q = l_k - lse(l_k):
    # = (sum p l - sum p l_k) + (lse(l_k) - lse(l)). Each modified forward needs only
    # its logits' lse, target logit and sum p l_k: one exp pass over its logits, no
    # log-softmax tensor; exactly 0 when the logits are identical.
    logits = gemma.unembed(params, h_c, config)  # [c, vocab]
    lse = jax.nn.logsumexp(logits, -1)
    p = jnp.exp(logits - lse[:, None])
    p_logits = jnp.sum(p * logits, -1)

    def modified(h_k):
      logits_k = gemma.unembed(params, h_k, config)
      lse_k = jax.nn.logsumexp(logits_k, -1)
      kl = (p_logits - jnp.sum(p * logits_k, -1)) + (lse_k - lse)
      return jnp.stack([((lse_k - target(logits_k)) * w_c).sum(), (kl * w_c).sum()])

    per = jax.lax.map(modified, h_others_c)  # [K, 2]
    return jnp.concatenate([jnp.stack([w_c.sum(), ((lse - target(logits)) * w_c).sum()]),
                            per[:, 0], per[:, 1]])

  chunks = (h.reshape(n_chunks, chunk, d),
            h_others.reshape(k, n_chunks, chunk, d).swapaxes(0, 1),
            targets.reshape(n_chunks, chunk), weights.reshape(n_chunks, chunk))
  return jax.lax.map(one_chunk, chunks).sum(0)
