"""Tokens/s of the Gemma 3 270M forward up to a middle layer, vs the full forward.

Harvesting activations at a middle layer needs only the first blocks: with
`stop_at_layer` the later blocks and the 262k-way unembedding are skipped.
This prints compile time, seconds per batch and tokens/s for the truncated
forward (capturing `resid_post.{layer}`) and, as the baseline measured in the
same run, for the full forward with logits.

  python bench/lm_forward.py                    # batch 2 x 1024, layer 8 (stop at 9)
  python bench/lm_forward.py --batch 4 --dtype bfloat16
  python bench/lm_forward.py --random-weights --batch 16   # e.g. on a GPU host without the GGUF
  python bench/lm_forward.py --mesh 2x4 --batch 8 # the truncated forward on a data x model
                                                  # LM mesh against one device, same run

Params are jit arguments (never closed over) and inputs have one fixed shape,
so each variant compiles once.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import statistics
import sys
import time


def _fake_cpu_devices_for_mesh(argv: list[str]) -> None:
  """On CPU, `--mesh DxM` fakes the D x M devices it needs (before JAX starts); elsewhere
  the flag is ignored by the accelerator's platform."""
  sizes = [a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv)
           if a.startswith("--mesh") and ("=" in a or i + 1 < len(argv))]
  if sizes and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    data, model = (int(n) for n in sizes[-1].lower().split("x"))
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={data * model}")


_fake_cpu_devices_for_mesh(sys.argv[1:])

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from jsae.hardware import lm_flops_per_token
from jsae.lm import gemma, presets
from jsae.lm import mesh as lm_mesh

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's bench/
from bench.measurement import Measurement, emit, machine  # pylint: disable=wrong-import-position


def _time(fn, params, tokens, repeats: int) -> tuple[float, float]:
  """(compile + first call seconds, median seconds per later call)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(params, tokens))
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, tokens))
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--layer", type=int, default=None,
                  help="capture resid_post.LAYER (default: the middle, n_layers // 2 - 1)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  ap.add_argument("--skip-full", action="store_true", help="skip the full-forward baseline")
  ap.add_argument("--random-weights", action="store_true",
                  help="random weights of the same shapes (speed only; no GGUF needed)")
  ap.add_argument("--json", action="store_true", help="one JSON object per measurement")
  ap.add_argument("--mesh", default="",
                  help="DATAxMODEL, e.g. 2x4: time the truncated forward on that LM mesh"
                       " (jsae.lm.mesh) against one device, instead of against the full"
                       " forward")
  args = ap.parse_args()

  t0 = time.perf_counter()
  if args.random_weights:
    config = gemma.get_config("gemma3_270m")
    params = gemma.init_params(jax.random.key(0), config)
  else:
    params, config = presets.load_gemma3_270m()
  jax.block_until_ready(params)
  print(f"load: {time.perf_counter() - t0:.1f}s ({jax.devices()[0].platform},"
        f" {jax.device_count()} device(s))")
  if args.dtype != "float32":
    import dataclasses  # pylint: disable=import-outside-toplevel
    config = dataclasses.replace(config, dtype=args.dtype)
    params = gemma.cast_params(params, jnp.dtype(args.dtype))
  layer = config.n_layers // 2 - 1 if args.layer is None else args.layer
  site = f"resid_post.{layer}"
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, config.vocab_size, (args.batch, args.seq)), jnp.int32)
  tokens = tokens.at[:, 0].set(2)  # BOS
  n_tok = args.batch * args.seq

  truncated = jax.jit(functools.partial(gemma.forward, config=config, capture=(site,),
                                        stop_at_layer=layer + 1))
  if args.mesh:
    _compare_mesh(args, params, config, truncated, tokens, site, layer)
    return
  variants = {f"stop_at_layer={layer + 1} ({site})": truncated}
  if not args.skip_full:
    variants["full forward (logits)"] = jax.jit(functools.partial(gemma.forward, config=config))

  print(f"Gemma 3 270M, {args.dtype}, batch {args.batch} x {args.seq} tokens,"
        f" median of {args.repeats}")
  results = {}
  for name, fn in variants.items():
    first, per_call = _time(fn, params, tokens, args.repeats)
    results[name] = per_call
    print(f"  {name:36s} compile+first {first:6.2f}s   {per_call:6.2f}s/batch"
          f"   {n_tok / per_call:8.0f} tokens/s")
  if len(results) == 2:
    stop, full = results.values()
    print(f"  speed-up of the truncated forward over the full one: {full / stop:.2f}x")
    weights = "random weights" if args.random_weights else "real weights"
    emit([Measurement(
        bench="lm_forward", name=f"forward to {site}, stop_at_layer={layer + 1}",
        shape=f"{args.batch}x{args.seq} {args.dtype}, {weights}", tokens_per_s=n_tok / stop,
        baseline="full forward with logits", baseline_tokens_per_s=n_tok / full,
        ratio=full / stop, machine=machine())], args.json)


def _compare_mesh(args, params, config, truncated, tokens, site: str, layer: int) -> None:
  """The truncated forward on one device, then on the `--mesh` LM mesh (same tokens)."""
  data, model = (int(n) for n in args.mesh.lower().split("x"))
  lm_mesh.check_mesh(config, data, model, jax.local_device_count())
  if args.batch % data:
    raise SystemExit(f"--batch {args.batch} must be a multiple of the data axis ({data}).")
  placed = lm_mesh.place(params, lm_mesh.make_mesh(data, model), jnp.dtype(args.dtype))
  n_tok = args.batch * args.seq
  print(f"Gemma 3 270M to {site}, {args.dtype}, batch {args.batch} x {args.seq}, median of"
        f" {args.repeats}")
  results = {}
  for name, p, t in (("one device", params, tokens),
                     (f"mesh data={data} x model={model}", placed,
                      lm_mesh.put_batch(placed, np.asarray(tokens)))):
    first, per_call = _time(truncated, p, t, args.repeats)
    results[name] = per_call
    print(f"  {name:36s} compile+first {first:6.2f}s   {per_call:6.2f}s/batch"
          f"   {n_tok / per_call:8.0f} tokens/s")
  one, many = results.values()
  flops = lm_flops_per_token(config, site, args.seq) * n_tok  # the model FLOPs of a batch
  print(f"  {flops / one / 1e9:.1f} GFLOP/s on one device, {flops / many / 1e9:.1f} on the"
        f" mesh ({one / many:.2f}x); fake CPU devices share the host's cores, so this"
        " measures the mesh's overhead and XLA:CPU's scheduling, not added compute")
  weights = "random weights" if args.random_weights else "real weights"
  emit([Measurement(
      bench="lm_forward", name=f"forward to {site} on a {data}x{model} LM mesh",
      shape=f"{args.batch}x{args.seq} {args.dtype}, {weights}", tokens_per_s=n_tok / many,
      baseline="one device", baseline_tokens_per_s=n_tok / one, ratio=one / many,
      detail=(f"{flops / many / 1e9:.0f} GFLOP/s"
              + ("; fake CPU devices share the cores: the mesh's overhead, not added compute"
                 if jax.default_backend() == "cpu" else "")),
      machine=machine())], args.json)


if __name__ == "__main__":
  main()
