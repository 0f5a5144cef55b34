"""The first delta-LM-loss evaluation, kept as the reference for the fast one.

Three whole forwards from the embedding (clean, spliced, zero-ablated), each
materialising float32 logits [batch, seq, vocab] and their log-softmax: slow
and memory-hungry, but each quantity is computed in the most direct way.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jsae.lm import gemma


def lm_sums(lm_params, lm_config, sae, *, site, contexts, batch_size):
  """(targets, clean NLL, spliced NLL, zero-ablation NLL, KL(clean || spliced),
  KL(clean || zero-ablated), every-position zero-ablation NLL, its KL) sums."""

  @jax.jit
  def fn(lm_params, sae, tokens, mask):
    keep = mask[..., None]  # splice only at positions the SAE was trained on
    reconstruct = lambda a: jnp.where(keep, sae.decode(sae.encode(a)).astype(a.dtype), a)
    zero = lambda a: jnp.where(keep, jnp.zeros_like(a), a)
    clean, _ = gemma.forward(lm_params, tokens, lm_config)
    spliced, _ = gemma.forward(lm_params, tokens, lm_config, splice={site: reconstruct})
    zeroed, _ = gemma.forward(lm_params, tokens, lm_config, splice={site: zero})
    zeroed_all, _ = gemma.forward(lm_params, tokens, lm_config,
                                  splice={site: lambda a: 0.0 * a})
    nll_clean, w = gemma.token_nll(clean, tokens, mask)
    logp_clean = jax.nn.log_softmax(clean[:, :-1], -1)

    def nll_and_kl(logits):
      logp = jax.nn.log_softmax(logits[:, :-1], -1)
      kl = jnp.sum(jnp.exp(logp_clean) * (logp_clean - logp), -1) * w
      return gemma.token_nll(logits, tokens, mask)[0].sum(), kl.sum()

    (nll_spliced, kl), (nll_zero, kl_zero), (nll_all, kl_all) = map(
        nll_and_kl, (spliced, zeroed, zeroed_all))
    return jnp.stack([w.sum(), nll_clean.sum(), nll_spliced, nll_zero, kl, kl_zero,
                      nll_all, kl_all])

  sums = np.zeros(8)
  n = contexts.n_contexts
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size) % n
    valid = (np.arange(start, start + batch_size) < n)[:, None]
    sums += np.asarray(fn(lm_params, sae, jnp.asarray(contexts.tokens[idx]),
                          jnp.asarray(contexts.mask[idx] & valid)), np.float64)
  return sums
