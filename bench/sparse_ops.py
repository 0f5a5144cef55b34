"""Groundwork for a sparsity-aware train step: the dense matmuls against gather/scatter forms.

At L0 ~ 50 of 16k latents, four of a JumpReLU step's five [batch, d_in, d_sae]
matmuls multiply mostly zeros: the decoder forward f @ W_dec, the decoder-weight
gradient f^T g, the gradient into the latents g @ W_dec^T and the encoder-weight
gradient x^T dpre. With per row the indices of its `capacity` possibly non-zero
latents, each becomes a gather or a scatter-add of `capacity` rows of d_in. This
times each dense matmul and its sparse form (in the chunked shapes that run
well on XLA:CPU: a scan over the capacity for the forward, batch chunks for
the gradients) and the top_k that finds the indices, and prints sparse / dense
time ratios (below 1: the sparse form wins) for a few capacities, so the
crossover is measured, not guessed. The train step that uses them is not built
yet (issue 14, item 2).

  python bench/sparse_ops.py                    # 4096 x 640 x 16384, capacity 32..512
  python bench/sparse_ops.py --d_sae 65536 --capacities 64,256
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def _time(fn, *args, repeats: int = 3) -> float:
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - t0) / repeats


def _sparse_fns(batch: int, d_in: int, d_sae: int, chunk: int):
  """(decode, latent_grad, weight_grad) over (vals [B, cap], idx [B, cap]) -- see the docstring."""

  def decode(vals, idx, w):  # sum_k vals[b, k] w[idx[b, k]] -> [B, d_in]
    body = lambda acc, vi: (acc + vi[0][:, None] * w[vi[1]], None)
    return jax.lax.scan(body, jnp.zeros((batch, d_in)), (vals.T, idx.T))[0]

  def latent_grad(g, idx, w):  # g[b] . w[idx[b, k]] -> [B, cap]
    cap = idx.shape[1]
    one = lambda a: jnp.einsum("bd,bkd->bk", a[0], w[a[1]])
    return jax.lax.map(one, (g.reshape(-1, chunk, d_in), idx.reshape(-1, chunk, cap))
                       ).reshape(batch, cap)

  def weight_grad(vals, idx, g):  # dW[idx[b, k]] += vals[b, k] g[b] -> [d_sae, d_in]
    cap = idx.shape[1]

    def body(acc, a):
      v, i, gg = a
      return acc.at[i.reshape(-1)].add((v[..., None] * gg[:, None, :]).reshape(-1, d_in)), None

    return jax.lax.scan(body, jnp.zeros((d_sae, d_in)),
                        (vals.reshape(-1, chunk, cap), idx.reshape(-1, chunk, cap),
                         g.reshape(-1, chunk, d_in)))[0]

  return jax.jit(decode), jax.jit(latent_grad), jax.jit(weight_grad)


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
  decode, latent_grad, weight_grad = _sparse_fns(b, d, s, args.chunk)
  machine = f"{platform.node()} {jax.devices()[0].platform} x{jax.device_count()}"
  print(f"batch {b}, d_in {d}, d_sae {s} ({machine}); times in ms, ratio = sparse / dense")
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
    rows = [
        ("decoder forward f @ W_dec", _time(jax.jit(lambda f, w: f @ w), f, w),
         _time(decode, vals, idx, w)),
        ("latent grad g @ W_dec^T", _time(jax.jit(lambda g, w: g @ w.T), g, w),
         _time(latent_grad, g, idx, w)),
        ("weight grad f^T g", _time(jax.jit(lambda f, g: f.T @ g), f, g),
         _time(weight_grad, vals, idx, g)),
        ("top_k (finds the indices)", float("nan"),
         _time(jax.jit(lambda f: jax.lax.top_k(f, cap)), f)),
    ]
    for op, dense_s, sparse_s in rows:
      ratio = sparse_s / dense_s
      shown = ("-", "-") if np.isnan(dense_s) else (f"{dense_s * 1e3:.1f}", f"{ratio:.2f}")
      print(f"{cap:>8} {op:<28} {shown[0]:>8} {sparse_s * 1e3:>8.1f} {shown[1]:>6}")
      if args.json:
        print(json.dumps(dict(bench="sparse_ops", op=op, shape=[b, d, s], capacity=cap,
                              dense_s=None if np.isnan(dense_s) else dense_s,
                              sparse_s=sparse_s, ratio=None if np.isnan(ratio) else ratio,
                              machine=machine)))


if __name__ == "__main__":
  main()
