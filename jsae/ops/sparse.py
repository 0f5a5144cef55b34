"""Gathers and scatters for a train step in which few latents per row are non-zero.

At L0 ~ 50 of 16k latents, four of a JumpReLU step's five [batch, d_in, d_sae]
matmuls multiply mostly zeros: the decoder forward f @ W_dec, the decoder-weight
gradient f^T g, the gradient into the latents g @ W_dec^T and the encoder
gradient x^T dpre (the pre-encoder bias needs only the per-latent sums of dpre).
Given per row the indices of the at most `capacity` latents that may carry a
value or a gradient (`candidates`), each becomes a gather or a scatter-add of
`capacity` rows of d_in (`sparse_decode`, `gathered_encode`); only the encoder
forward stays dense (it decides which latents are candidates), and the
elementwise work runs on the `[batch, capacity]` entries alone.

The chunked shapes are the ones that run well on XLA:CPU (bench/sparse_ops.py):
a scan over the capacity for the forward, chunks of batch rows for the
gradients, so no [batch, capacity, d_in] tensor is built.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

__all__ = ["candidates", "sparse_decode", "gathered_encode", "latent_sums",
           "scatter_rows", "pre_activations_at", "fired_latents", "batch_chunk", "capacity_rule", "fit_capacity", "adapt_capacity"]

# On XLA:CPU the sparse step beats the dense one up to a capacity of about 1/24 of
# d_sae; 1/32 keeps a margin (bench/train_step.py --sparse, 640 x 16384 x 4096,
# sparse/dense: JumpReLU 2.34x at capacity 160 (L0 50), 1.81x at 288, 1.24x at 480,
# 0.85x at 832; TopK 1.49x at 256; BatchTopK 1.28x at 352, 0.89x at 576). Beyond it
# the gathers and scatter-adds cost more than the matmuls they replace.
MAX_CAPACITY_FRACTION = 1 / 32


# Gathered or scattered rows per step of the chunked loops: ~2k rows of d_in (a few
# MiB) ran fastest on XLA:CPU (bench/sparse_ops.py --chunk, capacities 64 and 256).
ROWS_PER_STEP = 2048

# Latents per block in `candidates`' first pass (tuned on XLA:CPU, bench/sparse_ops.py).
CANDIDATE_BLOCK = 4


def batch_chunk(batch: int, target: int = 256) -> int:
  """The largest divisor of `batch` that is at most `target` (at least 1): batch rows
  per gather/scatter step."""
  target = max(1, target)
  return max(c for c in range(1, min(batch, target) + 1) if batch % c == 0)


# Backends where the sparse step was measured to pay (docs/performance.md, `python -m
# bench`). On the others an automatic capacity (`sae.sparse_capacity=-1`) means the
# dense step: an accelerator runs the dense matmuls near its peak and the gathers may
# not pay there; it joins this list once the accelerator suite has measured it.
MEASURED_BACKENDS = ("cpu",)


def capacity_rule(d_sae: int, expected_l0: float | None, headroom: float = 4,
                  backend: str | None = None) -> int:
  """The sparse step's capacity for an expected L0, or 0 (dense) when it would not pay.

  `headroom` x the expected L0 (4: rows vary, and JumpReLU's straight-through
  window adds candidates; 1 for TopK, whose rows hold exactly k), rounded up to
  a power of two, at least 32; dense when the L0 is not known in advance, the
  capacity exceeds `MAX_CAPACITY_FRACTION` of d_sae, or `backend` (default JAX's)
  is not in `MEASURED_BACKENDS`.
  """
  if (backend or jax.default_backend()) not in MEASURED_BACKENDS:
    return 0
  if expected_l0 is None or expected_l0 <= 0:
    return 0
  cap = max(32, 1 << (int(math.ceil(headroom * expected_l0)) - 1).bit_length())
  return cap if cap <= MAX_CAPACITY_FRACTION * d_sae else 0


# Capacities the adaptive step picks are multiples of this (few recompiles, little
# padding: the gathers and scatters cost in proportion to the capacity).
CAPACITY_STEP = 32

# Headroom of the adaptive capacity over the largest row seen in a logged batch: the
# batches in between vary (one whose row exceeds it takes the dense path).
ADAPT_HEADROOM = 1.25


def fit_capacity(need: float, headroom: float = ADAPT_HEADROOM) -> int:
  """`headroom` x `need` candidates per row, rounded up to a multiple of `CAPACITY_STEP`."""
  return CAPACITY_STEP * max(1, math.ceil(headroom * need / CAPACITY_STEP))


def adapt_capacity(current: int, need: float, d_sae: int) -> int:
  """The adaptive sparse step's next capacity (0: dense), from `need`, the largest
  row's candidate count in the latest logged batch, and the `current` capacity.

  It grows at once to `fit_capacity(need)` when `need` outgrows the current
  headroom, and shrinks only when that fit is at most 3/4 of the current capacity
  (so a need wobbling around a boundary does not recompile the step back and
  forth); dense when the fit exceeds `MAX_CAPACITY_FRACTION` of d_sae,
  where the dense step is faster.
  """
  want = fit_capacity(need)
  if want > MAX_CAPACITY_FRACTION * d_sae:
    return 0
  if current <= 0 or want > current or want <= 0.75 * current:
    return want
  return current


def candidates(mask: jax.Array, capacity: int, block: int = CANDIDATE_BLOCK
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each row's True entries of `mask: [batch, d_sae]`, padded to `capacity`.

  In two `top_k`s over smaller arrays rather than one over `mask` (the largest
  cost of the sparse step's bookkeeping on CPU): first the row's non-empty
  blocks of `block` latents (at most `capacity` of them), then the True entries
  among those blocks' `capacity * block` latents. Padding entries point at
  distinct latents that are not candidates.

  Returns:
    (idx [batch, capacity] int32, valid [batch, capacity] bool (False on
    padding), overflow [] bool: some row has more than `capacity` True entries,
    so the gathers would drop some and the caller must take the dense path).
  """
  batch, d_sae = mask.shape
  overflow = jnp.any(mask.sum(-1) > capacity)
  if d_sae % block or d_sae // block <= capacity:
    top, idx = jax.lax.top_k(mask.astype(jnp.float32), capacity)
    return idx.astype(jnp.int32), top > 0, overflow
  blocks = mask.reshape(batch, d_sae // block, block)
  filled, block_idx = jax.lax.top_k(blocks.any(-1).astype(jnp.float32), capacity)
  bits = jnp.take_along_axis(blocks, block_idx[..., None], axis=1) & (filled[..., None] > 0)
  latent = block_idx[..., None] * block + jnp.arange(block)  # [batch, capacity, block]
  top, pos = jax.lax.top_k(bits.reshape(batch, -1).astype(jnp.float32), capacity)
  idx = jnp.take_along_axis(latent.reshape(batch, -1), pos, 1)
  return idx.astype(jnp.int32), top > 0, overflow


def _gather_sum(vals: jax.Array, idx: jax.Array, w: jax.Array) -> jax.Array:
  """sum_k vals[b, k] w[idx[b, k]]: [batch, cap] x [n, d] -> [batch, d] float32."""
  body = lambda acc, vi: (acc + vi[0][:, None] * w[vi[1]], None)
  init = jnp.zeros((vals.shape[0], w.shape[1]), jnp.float32)
  return jax.lax.scan(body, init, (vals.T, idx.T))[0]


def _gather_dot(g: jax.Array, idx: jax.Array, w: jax.Array, chunk: int) -> jax.Array:
  """g[b] . w[idx[b, k]]: [batch, d] x [n, d] -> [batch, cap], `chunk` rows at a time."""
  b, cap = idx.shape
  one = lambda a: jnp.einsum("bd,bkd->bk", a[0], w[a[1]])
  return jax.lax.map(one, (g.reshape(-1, chunk, g.shape[1]), idx.reshape(-1, chunk, cap))
                     ).reshape(b, cap)


def _scatter_outer(vals: jax.Array, idx: jax.Array, g: jax.Array, n: int,
                   chunk: int) -> jax.Array:
  """out[idx[b, k]] += vals[b, k] g[b]: -> [n, d] float32, `chunk` rows at a time."""
  cap, d = idx.shape[1], g.shape[1]

  def body(acc, a):
    v, i, gg = a
    return acc.at[i.reshape(-1)].add((v[..., None] * gg[:, None, :]).reshape(-1, d)), None

  return jax.lax.scan(body, jnp.zeros((n, d), jnp.float32),
                      (vals.reshape(-1, chunk, cap), idx.reshape(-1, chunk, cap),
                       g.reshape(-1, chunk, d)))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def sparse_decode(vals: jax.Array, idx: jax.Array, w_dec: jax.Array, chunk: int) -> jax.Array:
  """f @ W_dec for f non-zero only at `idx`: `vals, idx: [batch, cap]`, `w_dec: [d_sae, d_in]`.

  `vals[b, k]` is f[b, idx[b, k]] (0 on padding). Gradients: into `vals` by
  gathered dot products, into `w_dec` by a scatter-add (`idx` gets none).
  """
  del chunk
  return _gather_sum(vals, idx, w_dec)


def _sparse_decode_fwd(vals, idx, w_dec, chunk):
  del chunk
  return _gather_sum(vals, idx, w_dec), (vals, idx, w_dec)


def _sparse_decode_bwd(chunk, residuals, g):
  vals, idx, w_dec = residuals
  g = g.astype(jnp.float32)
  d_vals = _gather_dot(g, idx, w_dec, chunk)
  d_w = _scatter_outer(vals, idx, g, w_dec.shape[0], chunk)
  return d_vals, None, d_w.astype(w_dec.dtype)


sparse_decode.defvjp(_sparse_decode_fwd, _sparse_decode_bwd)


def latent_sums(vals: jax.Array, idx: jax.Array, n: int) -> jax.Array:
  """out[j] = sum of vals[b, k] over the entries with idx[b, k] == j: [batch, cap] -> [n]."""
  return jax.ops.segment_sum(vals.reshape(-1), idx.reshape(-1), num_segments=n)


def scatter_rows(vals: jax.Array, idx: jax.Array, n: int) -> jax.Array:
  """The dense `[batch, n]` array that is `vals[b, k]` at `idx[b, k]` and 0 elsewhere
  (a row's indices are distinct, as `candidates` returns them)."""
  rows = jnp.arange(vals.shape[0])[:, None]
  return jnp.zeros((vals.shape[0], n), vals.dtype).at[rows, idx].set(vals)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def gathered_encode(x: jax.Array, b: jax.Array, w: jax.Array, idx: jax.Array,
                    value: jax.Array, chunk: int) -> jax.Array:
  """`(x - b) @ w` at each row's `idx` only: `x: [batch, d_in]`, `b: [d_in]`,
  `w: [d_in, d_sae]`, `idx, value: [batch, cap]` -> `[batch, cap]`.

  `value` is that result, already gathered from the caller's dense matmul
  (which also chose `idx`), and is returned as is. The backward scatters dw
  from the `cap` entries per row alone and gives db = -(per-latent sums of the
  cotangent) @ w.T; `x` is data and gets no gradient. The cotangent must be 0
  on padding entries (mask them before the loss uses them).
  """
  del x, b, w, idx, chunk
  return value


def _gathered_encode_fwd(x, b, w, idx, value, chunk):
  del chunk
  return value, (x, b, w, idx)


def _gathered_encode_bwd(chunk, residuals, g):
  x, b, w, idx = residuals
  g = g.astype(jnp.float32)
  x_in = x.astype(jnp.float32) - b.astype(jnp.float32)
  dw = _scatter_outer(g, idx, x_in, w.shape[1], chunk).T
  db = -jnp.matmul(latent_sums(g, idx, w.shape[1]), w.T.astype(jnp.float32))
  return jnp.zeros_like(x), db.astype(b.dtype), dw.astype(w.dtype), None, jnp.zeros_like(g)


gathered_encode.defvjp(_gathered_encode_fwd, _gathered_encode_bwd)


def pre_activations_at(x: jax.Array, b_in: jax.Array, w_enc: jax.Array, b_enc: jax.Array,
                       value: jax.Array, idx: jax.Array, chunk: int) -> jax.Array:
  """pi = (x - b_in) @ w_enc + b_enc at each row's `idx`: `[batch, cap]`, from the dense
  `value: [batch, d_sae]` (= (x - b_in) @ w_enc, no gradient) with `gathered_encode`'s
  sparse backward."""
  value_c = jnp.take_along_axis(value, idx, 1)
  return gathered_encode(x, b_in, w_enc, idx, value_c, chunk) + b_enc[idx]


def fired_latents(vals: jax.Array, idx: jax.Array, n: int) -> jax.Array:
  """`[n]` bool: latents non-zero in some row, from the entries `vals, idx: [batch, cap]`."""
  return latent_sums((vals != 0).astype(jnp.float32), idx, n) > 0
