"""TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024) SAE families, with AuxK.

  pi(x)  = (x - b_dec) @ W_enc + b_enc
  TopK:       f = ReLU(pi) on each row's k largest pi, 0 elsewhere (L0 <= k per row)
  BatchTopK:  f = ReLU(pi) on the floor(k * batch) largest pi of the whole batch
  x_hat  = f @ W_dec + b_dec
  loss   = ||x - x_hat||^2 + aux_coeff * AuxK (dead latents model the residual)

Ties go to the lower index (`lax.top_k`; row-major over the batch for
BatchTopK). The selection runs along the latent axis as one global operation,
so on a latent-sharded mesh it is the global top k, not a per-shard one.

The sparsity knob k is shape-affecting: the params carry a static k (the
capacity of `top_k`) and the step takes a traced `k <= capacity`, keeping the
first k of the sorted selection (`lax.top_k` sorts, so its first k are the top
k), so a sweep can vmap over k with the capacity at the sweep's largest k.

BatchTopK keeps a running threshold theta in the family state: an exponential
moving average of the smallest positive kept activation per batch (rate
`threshold_ema`, SAELens's 0.01), bias-corrected so the first batch's value is
taken as it is (dictionary_learning's start, without SAELens's slow rise from
0). Its inference form is JumpReLU with theta for every latent.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jsae import losses, ops
from jsae.ops import sparse
from jsae.saes import base, shared
from jsae.saes.base import Field
from jsae.saes.jumprelu import JumpReLUParams, fold_norm_scale
from jsae.saes.shared import LinearFamily


@struct.dataclass
class TopKParams:
  """Parameters of a TopK SAE (float32).

  Attributes:
    W_enc: `[d_in, d_sae]` encoder.
    b_enc: `[d_sae]` encoder bias.
    W_dec: `[d_sae, d_out]` decoder (rows kept at unit norm by default).
    b_dec: `[d_out]` decoder bias.
    W_skip: `[d_in, d_out]` a skip transcoder's affine skip, or None.
    k: latents kept per row (static; the traced k of a step may be smaller).
    pre_encoder_bias: whether `b_dec` is subtracted before encoding (static).
  """

  W_enc: jax.Array
  b_enc: jax.Array
  W_dec: jax.Array
  b_dec: jax.Array
  W_skip: Any = None
  k: int = struct.field(pytree_node=False, default=32)
  pre_encoder_bias: bool = struct.field(pytree_node=False, default=True)


@struct.dataclass
class BatchTopKParams(TopKParams):
  """Parameters of a BatchTopK SAE: as `TopKParams`, with k per row on average.

  A type of its own so that `jsae.encode` dispatches to the batch-level selection.
  """


@struct.dataclass
class ThresholdState:
  """BatchTopK's running threshold.

  Attributes:
    threshold: `[]` float32, the bias-corrected moving average of the smallest
      positive kept activation (normalised units; 0 before any update).
    count: `[]` int32, batches that updated it.
  """

  threshold: jax.Array
  count: jax.Array


@dataclasses.dataclass(frozen=True)
class TopKSettings:
  """Static hyperparameters of TopK / BatchTopK / Matryoshka losses.

  Attributes:
    k_aux: dead latents per row in AuxK (capped at d_sae).
    aux_coeff: weight of AuxK (0 disables it).
    aux_form: 'gao' (OpenAI / dictionary_learning) or 'saelens' (see `losses.auxk`).
    threshold_ema: BatchTopK threshold moving-average rate.
    compute_dtype: matmul dtype.
    sparse_capacity: latents per row of the sparse step (0: the dense step; TopK's
      is its static k).
  """

  k_aux: int = 512
  aux_coeff: float = 1 / 32
  aux_form: str = "gao"
  threshold_ema: float = 0.01
  compute_dtype: str = "float32"
  sparse_capacity: int = 0


# ----------------------------------------------------------------------------- selection


def topk_indices(pre: jax.Array, capacity: int, k: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each row's `capacity` largest entries of `pre: [rows, d_sae]` (indices `[rows,
  capacity]` int32) and which of them are kept (`[capacity]` bool: the first k <= capacity).

  `lax.top_k` returns values sorted with ties to the lower index, so keeping
  the first k of a capacity-wide selection equals `top_k(pre, k)` exactly.
  """
  _, idx = jax.lax.top_k(pre, capacity)
  return idx.astype(jnp.int32), jnp.arange(capacity) < k


def topk_mask(pre: jax.Array, capacity: int, k: jax.Array) -> jax.Array:
  """Bool `[..., d_sae]`: each row's k largest entries of `pre` (k <= capacity, traced)."""
  flat = pre.reshape(-1, pre.shape[-1])
  idx, keep = topk_indices(flat, capacity, k)
  rows = jnp.arange(flat.shape[0])[:, None]
  mask = jnp.zeros(flat.shape, bool).at[rows, idx].set(jnp.broadcast_to(keep, idx.shape))
  return mask.reshape(pre.shape)


def _sort_key(v: jax.Array) -> jax.Array:
  """uint32 keys that order like the float32 values `v` (-0.0 and +0.0 alike)."""
  v = v.astype(jnp.float32) + 0.0  # -0.0 + 0.0 = +0.0: one key for both zeros
  u = jax.lax.bitcast_convert_type(v, jnp.uint32)
  sign = u >> 31
  return jnp.where(sign == 1, ~u, u | jnp.uint32(0x80000000))


def _nth_largest_key(keys: jax.Array, n: jax.Array) -> jax.Array:
  """The largest key T with #{keys >= T} >= n (the n-th largest, with multiplicity).

  Exact: 32 halvings of the uint32 key range, each a count over `keys`.
  """
  def body(_, bounds):
    lo, hi = bounds  # invariant: count(keys >= lo) >= n; the answer is in [lo, hi]
    mid = lo + (hi - lo) // 2 + jnp.uint32(1)
    ok = (hi > lo) & (jnp.sum(keys >= mid) >= n)
    return jnp.where(ok, mid, lo), jnp.where(ok | (hi <= lo), hi, mid - jnp.uint32(1))
  lo, _ = jax.lax.fori_loop(0, 33, body, (jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))
  return lo


def batch_topk_mask(pre: jax.Array, capacity: int, k: jax.Array, candidates_per_row: int = 4
                    ) -> tuple[jax.Array, jax.Array]:
  """The floor(k * rows) largest entries of the whole batch `pre: [..., d_sae]`.

  Exact, with ties to the lower row-major index. Each row's
  `candidates_per_row * capacity` largest entries are the candidates; the cut
  (the n-th largest candidate, found by counting, no sort) and its ties (taken in
  row-major order) give the selection. When some row's last candidate reaches
  the cut, entries beyond the candidates could belong to the top, and one
  `top_k` over the flat batch decides instead (`lax.cond`: only one branch runs).
  At [4096, 16384], k = 32 the candidates path costs half the flat `top_k`.

  Returns:
    (mask `[..., d_sae]` bool, the smallest positive selected value `[]`, +inf
    when none is positive).
  """
  flat = jax.lax.stop_gradient(pre).reshape(-1, pre.shape[-1]).astype(jnp.float32)
  rows, d_sae = flat.shape
  n_max = min(int(capacity * rows), rows * d_sae)
  n = jnp.minimum(jnp.floor(jnp.asarray(k, jnp.float32) * rows).astype(jnp.int32), n_max)
  cap = min(d_sae, max(int(candidates_per_row) * int(capacity), int(capacity)))
  row_ids = jnp.arange(rows)[:, None]

  def from_flat(_):
    values, pos = jax.lax.top_k(flat.reshape(-1), n_max)
    keep = jnp.arange(n_max) < n
    mask = jnp.zeros(flat.shape, bool).at[pos // d_sae, pos % d_sae].set(keep)
    return mask, jnp.min(jnp.where(keep & (values > 0), values, jnp.inf))

  if cap == d_sae:
    mask, smallest = from_flat(None)
    return mask.reshape(pre.shape), smallest
  v1, i1 = jax.lax.top_k(flat, cap)  # [rows, cap], each row sorted, ties by index
  keys = _sort_key(v1)
  cut = _nth_largest_key(keys, n)
  above, at = keys > cut, keys == cut
  need = n - jnp.sum(above)
  tie_rank = jnp.cumsum(at.reshape(-1)).reshape(at.shape)  # row-major order of ties
  keep = above | (at & (tie_rank <= need))

  def from_candidates(_):
    mask = jnp.zeros(flat.shape, bool).at[row_ids, i1].set(keep)
    return mask, jnp.min(jnp.where(keep & (v1 > 0), v1, jnp.inf))

  safe = jnp.all(keys[:, cap - 1] < cut)
  mask, smallest = jax.lax.cond(safe, from_candidates, from_flat, None)
  return mask.reshape(pre.shape), smallest


# ----------------------------------------------------------------------------- families

class TopKFamily(LinearFamily):
  """Pure functions of the TopK family (see the module docstring)."""

  name = "topk"
  params_type = TopKParams
  inference_form = "topk"
  config_defaults = {"optim.decoder_unit_norm": True}
  knob, knob_symbol = "sae.k", "k"
  folds_decoder_norms = False  # rescaling latents changes which k win
  fields = {
      "sae": {"k": Field(32, "latents kept per token (Gao: 32; SAELens: 100)", traced=True),
              "k_aux": Field(512, "dead latents per token in AuxK (Gao: 512), capped at"
                             " d_sae"),
              "sparse_capacity": Field(-1, "sparse train step: -1 auto (ops.sparse."
                                       "capacity_rule on k), 0 dense, >= k on (TopK's rows"
                                       " hold exactly k latents: the capacity is k)",
                                       resumable=True)},
      "loss": dict(shared.AUX_FIELDS),
  }

  def check_values(self, config) -> None:
    s, l = config.sae, config.loss
    k = s.k
    if not (isinstance(k, int) and 0 < k <= s.d_sae):
      raise base.FamilyConfigError(
          f"config.sae.k: must be an integer in [1, d_sae={s.d_sae}]; got {k!r}. Lower k"
          " or raise config.sae.d_sae.")
    if not (isinstance(s.k_aux, int) and s.k_aux >= 0):
      raise base.FamilyConfigError(f"config.sae.k_aux: must be an integer >= 0; got"
                                   f" {s.k_aux!r}.")
    if l.aux_form not in ("gao", "saelens"):
      raise base.FamilyConfigError(f"config.loss.aux_form: {l.aux_form!r} is not 'gao' or"
                                   " 'saelens'.")
    if not l.aux_coeff >= 0:
      raise base.FamilyConfigError(f"config.loss.aux_coeff: must be >= 0; got"
                                   f" {l.aux_coeff!r}.")
    self._check_sparse_capacity(config)

  def _check_sparse_capacity(self, config) -> None:
    s, k = config.sae, config.sae.k
    cap = s.sparse_capacity
    if not (isinstance(cap, int) and (cap in (-1, 0) or self._min_capacity(k) <= cap <= s.d_sae)):
      raise base.FamilyConfigError(
          f"config.sae.sparse_capacity: must be -1 (auto), 0 (dense) or"
          f" {self._min_capacity(k)}..d_sae={s.d_sae}; got {cap!r}.")

  def _min_capacity(self, k: int) -> int:
    """The smallest explicit sparse capacity for this k (TopK: k, which it then uses)."""
    return k

  def settings(self, config) -> TopKSettings:
    s, l = config.sae, config.loss
    return TopKSettings(k_aux=int(s.k_aux), aux_coeff=float(l.aux_coeff),
                        aux_form=l.aux_form, compute_dtype=s.compute_dtype,
                        sparse_capacity=self.sparse_capacity(config),
                        **self._extra_settings(config))

  def sparse_capacity(self, config) -> int:
    """The sparse step's capacity (0: dense): TopK's static k, on when the config asks or,
    with -1, when `ops.sparse.capacity_rule` finds k small enough to pay (no headroom:
    every row holds exactly k)."""
    s = config.sae
    if s.sparse_capacity == 0:
      return 0
    if s.sparse_capacity == -1 and not sparse.capacity_rule(s.d_sae, s.k, headroom=1):
      return 0
    return int(s.k)

  def _extra_settings(self, config) -> dict:
    del config
    return {}

  def init_kwargs(self, config) -> dict:
    return dict(super().init_kwargs(config), k=int(config.sae.k))

  def group_config(self, configs: list):
    """The first member's config at the largest k (the selection's capacity; each member
    keeps the first k of it, which equals its own top k), the automatic sparse step dense."""
    config = shared.dense_when_auto(super().group_config(configs))
    config.sae.k = max(int(c.sae.k) for c in configs)
    return config

  def member_params(self, params, config):
    """The params with the member's own k (the group's are at the largest k)."""
    return params.replace(k=int(config.sae.k))

  def init(self, key: jax.Array, *, d_in: int, d_sae: int, k: int = 32,
           pre_encoder_bias: bool = True, d_out: int | None = None, skip: bool = False):
    """Unit-norm He-uniform decoder rows, W_enc = W_dec^T (Gao), zero biases."""
    if not (isinstance(k, (int,)) and 0 < k <= d_sae):
      raise ValueError(f"k must be an integer in [1, d_sae={d_sae}]; got {k!r}.")
    return super().init(key, d_in=d_in, d_sae=d_sae, pre_encoder_bias=pre_encoder_bias,
                        d_out=d_out, skip=skip, k=k)

  def select(self, params, pre: jax.Array, k: jax.Array, settings: TopKSettings | None):
    """(mask `[..., d_sae]`, selection info) of the kept latents."""
    del settings
    return topk_mask(pre, params.k, k), None

  def encode(self, params, x: jax.Array, *, k=None, compute_dtype="float32") -> jax.Array:
    """Latents `[..., d_sae]` float32 (BatchTopK: over every row of `x` together)."""
    pre = self.pre_activations(params, x, compute_dtype=compute_dtype)
    mask, _ = self.select(params, pre, params.k if k is None else k, None)
    return jnp.where(mask, jax.nn.relu(pre), 0.0)

  def loss(self, params, state, x: jax.Array, *, settings: TopKSettings, hparams: dict,
           dead: jax.Array, step: jax.Array, target: jax.Array | None = None):
    """||y - y_hat||^2 + aux_coeff * AuxK on `x: [batch, d_in]` (y = x for an SAE,
    `target` for a transcoder)."""
    del step
    y = x if target is None else target
    if settings.sparse_capacity:
      pre, f, x_hat, kept, fired = self._sparse_forward(params, x, hparams["k"], dead,
                                                        settings)
    else:
      pre, f, x_hat, kept, fired = self._dense_forward(params, x, hparams["k"], settings)
    rec = losses.reconstruction(y, x_hat)
    aux = shared.aux_loss(pre, y, x_hat, params.W_dec, dead, settings)
    parts = dict(reconstruction=rec, aux=aux)
    state = self.next_state(state, kept, settings)
    return rec + settings.aux_coeff * aux, base.Output(f=f, x_hat=x_hat, state=state,
                                                       parts=parts, extras={}, fired=fired)

  def _dense_forward(self, params, x, k, settings):
    """(pre, f, x_hat, selection info, fired `[d_sae]`) with dense matmuls."""
    cdt = settings.compute_dtype
    pre = self.pre_activations(params, x, compute_dtype=cdt)
    mask, kept = self.select(params, pre, k, settings)
    f = jnp.where(mask, jax.nn.relu(pre), 0.0)
    return pre, f, self.predict(params, f, x, compute_dtype=cdt), kept, jnp.any(f != 0, axis=0)

  def sparse_select(self, params, pre: jax.Array, k: jax.Array, capacity: int):
    """(idx `[batch, capacity]`, valid `[batch, capacity]`, selection info, overflow `[]`)
    of the kept latents of `pre: [batch, d_sae]` (TopK: each row's first k of its top
    `params.k`; never overflows)."""
    del capacity
    idx, keep = topk_indices(pre, params.k, k)
    return idx, jnp.broadcast_to(keep, idx.shape), None, jnp.zeros((), bool)

  def _sparse_forward(self, params, x, k, dead, settings):
    """`_dense_forward` with the decoder and the encoder's gradients over each row's kept
    latents; the dense path when a row keeps more than the capacity (BatchTopK) or when
    AuxK runs (some latent is dead: its gradient reaches the dead latents' pre-activations).

    Exact because the loss reaches the pre-activations only through the kept latents
    (the selection itself carries no gradient). After the encoder matmul and the
    selection everything runs on the kept entries; the dense `pre` it returns carries
    no gradient into W_enc, which AuxK, the one reader of it, never needs here (AuxK
    is 0 without dead latents, and with them this path is not taken).
    """
    cdt, d_sae = settings.compute_dtype, params.W_enc.shape[1]
    b_in = params.b_dec if params.pre_encoder_bias else jnp.zeros((x.shape[-1],), x.dtype)
    value = jax.lax.stop_gradient(ops.matmul(x, params.W_enc, cdt, input_bias=b_in))
    idx, valid, kept, overflow = self.sparse_select(
        params, value + jax.lax.stop_gradient(params.b_enc), k, settings.sparse_capacity)
    chunk = sparse.batch_chunk(x.shape[0], sparse.ROWS_PER_STEP // idx.shape[1])
    if settings.aux_coeff > 0 and settings.k_aux > 0:
      overflow = overflow | jnp.any(dead)

    def sparse_path():
      pre_c = sparse.pre_activations_at(x, b_in, params.W_enc, params.b_enc, value, idx, chunk)
      vals = jnp.where(valid, jax.nn.relu(pre_c), 0.0)
      x_hat = (sparse.sparse_decode(vals, idx, params.W_dec, chunk) + params.b_dec
               + base.skip(params, x, cdt))
      fired = sparse.fired_latents(vals, idx, d_sae)
      return (value + params.b_enc, sparse.scatter_rows(vals, idx, d_sae), x_hat, kept,
              fired)

    return jax.lax.cond(overflow, lambda: self._dense_forward(params, x, k, settings),
                        sparse_path)

  def next_state(self, state, kept, settings):
    """The family state after a batch (TopK keeps none)."""
    del kept, settings
    return state

  def fold(self, params: TopKParams, state, norm_scale):
    del state
    return "topk", self.fold_linear(params, norm_scale)

  def fold_decoder_norms(self, params):
    """Refused: TopK compares pre-activations across latents, so rescaling them changes the winners."""
    raise ValueError(
        "a TopK SAE's selection compares pre-activations across latents, so moving"
        " decoder-row norms into the encoder would change which latents win. Train TopK"
        " with optim.decoder_unit_norm=True (its default) and export without folding.")

  def k_of(self, params: TopKParams) -> int:
    """Latents kept per row."""
    return int(params.k)

  def infer(self, params: TopKParams, x: jax.Array) -> jax.Array:
    """ReLU of each row's k largest pre-activations, plain jnp."""
    pre = base.plain_pre_activations(params, x)
    return jnp.where(topk_mask(pre, params.k, params.k), jax.nn.relu(pre), 0.0)


class BatchTopKFamily(TopKFamily):
  """BatchTopK: TopK over the whole batch, JumpReLU at inference (module docstring)."""

  name = "batchtopk"
  params_type = BatchTopKParams
  inference_form = "jumprelu"
  fields = {
      "sae": {"k": Field(32, "mean latents kept per token over the batch (BatchTopK: 16-64)",
                         traced=True),
              "k_aux": TopKFamily.fields["sae"]["k_aux"],
              "threshold_ema": Field(0.01, "rate of the running inference threshold's"
                                     " moving average (SAELens: 0.01), bias-corrected"),
              "sparse_capacity": Field(-1, "latents per row of the sparse train step; 0:"
                                       " dense; -1: auto (ops.sparse.capacity_rule on k)",
                                       resumable=True)},
      "loss": dict(shared.AUX_FIELDS),
  }

  def check_values(self, config) -> None:
    super().check_values(config)
    if not 0 < config.sae.threshold_ema <= 1:
      raise base.FamilyConfigError(f"config.sae.threshold_ema: must lie in (0, 1]; got"
                                   f" {config.sae.threshold_ema!r}.")

  def _extra_settings(self, config) -> dict:
    return dict(threshold_ema=float(config.sae.threshold_ema))

  def init_state(self, d_sae: int, settings) -> ThresholdState:
    del d_sae, settings
    return ThresholdState(threshold=jnp.zeros((), jnp.float32),
                          count=jnp.zeros((), jnp.int32))

  def select(self, params, pre, k, settings):
    del settings
    return batch_topk_mask(pre, params.k, k)  # (mask, smallest positive kept value)

  def _min_capacity(self, k: int) -> int:
    return 1

  def sparse_capacity(self, config) -> int:
    """The sparse step's capacity (0: dense): the config's, or with -1 the rule's on k
    (rows keep k on average, some many more: a row over the capacity takes the dense path)."""
    s = config.sae
    if s.sparse_capacity >= 0:
      return int(s.sparse_capacity)
    return sparse.capacity_rule(s.d_sae, s.k)

  def sparse_select(self, params, pre, k, capacity):
    mask, smallest = batch_topk_mask(pre, params.k, k)
    idx, valid, overflow = sparse.candidates(mask, capacity)
    return idx, valid, smallest, overflow

  def next_state(self, state: ThresholdState, smallest: jax.Array, settings: TopKSettings
                 ) -> ThresholdState:
    """Bias-corrected EMA of the smallest positive kept value.

    theta_n = theta_{n-1} + (r / (1 - (1 - r)^n)) (v_n - theta_{n-1}), which is the
    EMA m_n = (1 - r) m_{n-1} + r v_n divided by 1 - (1 - r)^n: theta_1 = v_1.
    Batches that keep nothing positive leave it unchanged.
    """
    smallest = jax.lax.stop_gradient(smallest)
    update = jnp.isfinite(smallest)
    count = state.count + update.astype(jnp.int32)
    rate = settings.threshold_ema
    gain = rate / (1.0 - (1.0 - rate) ** jnp.maximum(count, 1).astype(jnp.float32))
    theta = jnp.where(update, state.threshold + gain * (smallest - state.threshold),
                      state.threshold)
    return ThresholdState(threshold=theta, count=count)

  def metrics(self, output: base.Output, settings) -> dict:
    return dict(threshold=output.state.threshold)

  def fold(self, params: BatchTopKParams, state: ThresholdState, norm_scale):
    """JumpReLU with theta_i = the running threshold, in raw units."""
    if state is None:
      raise ValueError("folding a BatchTopK SAE needs its family state (the running"
                       " threshold); read it from the run with jsae.runs.read_run.")
    theta = jnp.full((params.W_enc.shape[-1],), state.threshold, jnp.float32)
    jr = JumpReLUParams(W_enc=params.W_enc, b_enc=params.b_enc, W_dec=params.W_dec,
                        b_dec=params.b_dec, threshold=theta, W_skip=params.W_skip,
                        pre_encoder_bias=params.pre_encoder_bias)
    return "jumprelu", fold_norm_scale(base.fold_pre_encoder_bias(jr), norm_scale)

  def infer(self, params, x):
    raise NotImplementedError("BatchTopK is a training family; fold it to JumpReLU.")


topk_family = base.register(TopKFamily())
batchtopk_family = base.register(BatchTopKFamily())
