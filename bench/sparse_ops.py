"""The sparse JumpReLU step's gathers and scatters against the dense matmuls they replace.

At L0 ~ 50 of 16k latents, four of a JumpReLU step's five [batch, d_in, d_sae]
matmuls multiply mostly zeros: the decoder forward f @ W_dec, the decoder-weight
gradient f^T g, the gradient into the latents g @ W_dec^T and the encoder-weight
gradient x^T dpre. With per row the indices of its `capacity` possibly non-zero
latents, each becomes a gather or a scatter-add of `capacity` rows of d_in. This
times each dense matmul and its sparse form from `jsae.ops.sparse` (in the
chunked shapes that run well on XLA:CPU: a scan over the capacity for the
forward, batch chunks for the gradients) and the search that finds the indices
(`sparse.candidates` against one top_k over the mask),
and prints dense / sparse time (the speed-up; above 1 the sparse form wins) for
a few capacities, so the crossover is measured, not guessed.

  python bench/sparse_ops.py                    # 4096 x 640 x 16384, capacity 32..512
  python bench/sparse_ops.py --d_sae 65536 --capacities 64,256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's bench/
from bench.measurement import Measurement, emit, machine, median_seconds  # pylint: disable=wrong-import-position
from jsae.ops import sparse  # pylint: disable=wrong-import-position


def _time(fn, *args) -> float:
  return median_seconds(fn, *args, repeats=3)


def _sparse_fns(d_sae: int, chunk: int):
  """(decode, latent_grad, weight_grad) over (vals [B, cap], idx [B, cap]): the gathers and
  scatters of `jsae.ops.sparse` that the sparse step runs, jitted alone."""
  # pylint: disable=protected-access
  decode = jax.jit(sparse._gather_sum)  # sum_k vals[b, k] w[idx[b, k]] -> [B, d_in]
  latent_grad = jax.jit(lambda g, idx, w: sparse._gather_dot(g, idx, w, chunk))
  weight_grad = jax.jit(lambda vals, idx, g: sparse._scatter_outer(vals, idx, g, d_sae, chunk))
  return decode, latent_grad, weight_grad


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=4096)
  ap.add_argument("--d_in", type=int, default=640)
  ap.add_argument("--d_sae", type=int, default=16384)
  ap.add_argument("--capacities", default="32,64,128,256,512")
  ap.add_argument("--chunk", type=int, default=256, help="batch rows per gather/scatter step")
  ap.add_argument("--json", action="store_true", help="one JSON object per measurement")
  args = ap.parse_args()
  b, d, s = args.batch, args.d_in, args.d_sae
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((s, d)).astype(np.float32))
  g = jnp.asarray(rng.standard_normal((b, d)).astype(np.float32))
  decode, latent_grad, weight_grad = _sparse_fns(s, args.chunk)
  host = machine()
  print(f"batch {b}, d_in {d}, d_sae {s} ({host}); times in ms, ratio = dense / sparse (speed-up)")
  print(f"{'capacity':>8} {'op':<28} {'dense':>8} {'sparse':>8} {'ratio':>6}")
  for cap in (int(c) for c in args.capacities.split(",")):
    idx = np.stack([rng.choice(s, cap, replace=False) for _ in range(b)]).astype(np.int32)
    vals = rng.random((b, cap)).astype(np.float32)
    f = np.zeros((b, s), np.float32)
    np.put_along_axis(f, idx, vals, 1)
    f, idx, vals = jnp.asarray(f), jnp.asarray(idx), jnp.asarray(vals)
    # The sparse forms compute the same numbers (checked once per capacity).
    np.testing.assert_allclose(decode(vals, idx, w), f @ w, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(latent_grad(g, idx, w),
                               jnp.take_along_axis(g @ w.T, idx, 1), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(weight_grad(vals, idx, g), f.T @ g, rtol=1e-4, atol=1e-3)
    matmul = "the dense matmul it replaces"
    rows = [
        ("decoder forward f @ W_dec", matmul, _time(jax.jit(lambda f, w: f @ w), f, w),
         _time(decode, vals, idx, w)),
        ("latent grad g @ W_dec^T", matmul, _time(jax.jit(lambda g, w: g @ w.T), g, w),
         _time(latent_grad, g, idx, w)),
        ("weight grad f^T g", matmul, _time(jax.jit(lambda f, g: f.T @ g), f, g),
         _time(weight_grad, vals, idx, g)),
        # Finding each row's candidates: `sparse.candidates`' two passes (non-empty
        # blocks, then entries) against one top_k over the whole [batch, d_sae] mask.
        ("candidates (two passes)", "one top_k over the mask",
         _time(jax.jit(lambda m: jax.lax.top_k(m.astype(jnp.float32), cap)), f > 0),
         _time(jax.jit(lambda m: sparse.candidates(m, cap)), f > 0)),
    ]
    for op, baseline, dense_s, sparse_s in rows:
      ratio = dense_s / sparse_s  # the speed-up: above 1 the sparse form wins
      print(f"{cap:>8} {op:<28} {dense_s * 1e3:>8.1f} {sparse_s * 1e3:>8.1f} {ratio:>6.2f}")
      emit([Measurement(
          bench="sparse_ops", name=f"{op}, capacity {cap}", shape=f"{b}x{d}x{s}",
          tokens_per_s=b / sparse_s, baseline=baseline, baseline_tokens_per_s=b / dense_s,
          ratio=ratio, machine=host)], args.json)


if __name__ == "__main__":
  main()
