"""The JumpReLU SAE family (Rajamanoharan et al. 2024; Gemma Scope recipe).

  pi(x)  = (x - b_dec) @ W_enc + b_enc        (pre-encoder bias on by default)
  f(x)   = JumpReLU_theta(pi(x))               straight-through gradients to theta
  x_hat  = f @ W_dec + b_dec
  loss   = ||x - x_hat||^2 + lambda * sparsity (+ pre-activation loss on dead latents)

JumpReLU is also the inference form of BatchTopK, Matryoshka and Gated SAEs:
there f = pi * 1[pi > max(theta, 0)] (= ReLU(pi) 1[pi > theta], SAELens's
`JumpReLUSAE`), which `infer` computes in plain jnp ops.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jsae import losses, ops
from jsae.ops import jumprelu, sparse
from jsae.ops import step as heaviside
from jsae.saes import base, shared
from jsae.saes.base import Field
from jsae.saes.shared import (CONTROL_FIELDS, check_control, control_update, controlled_coeff,
                              init_control)

P = jax.sharding.PartitionSpec

# recipe 'auto' (jsae.recipe): theta_0 and the straight-through window from the fresh
# encoder's pre-activations, lambda's warm-up from the budget (measured: README, "The
# recipe and its knobs").
AUTO_FIRING = 0.2  # share of the initial pre-activations above theta_0
AUTO_WINDOW = 0.5  # share of them inside the initial window [theta_0 - eps/2, theta_0 + eps/2]
AUTO_SPARSITY_WARMUP = 0.05  # lambda's warm-up, as a share of the run's steps


@struct.dataclass
class JumpReLUParams:
  """Parameters of a JumpReLU SAE (float32).

  Attributes:
    W_enc: `[d_in, d_sae]` encoder.
    b_enc: `[d_sae]` encoder bias.
    W_dec: `[d_sae, d_out]` decoder; rows are latent directions.
    b_dec: `[d_out]` decoder bias.
    threshold: `[d_sae]` raw theta, or log theta when `log_threshold`.
    W_skip: `[d_in, d_out]` a skip transcoder's affine skip, or None.
    log_threshold: whether `threshold` stores log theta (static).
    pre_encoder_bias: whether `b_dec` is subtracted before encoding (static).
  """

  W_enc: jax.Array
  b_enc: jax.Array
  W_dec: jax.Array
  b_dec: jax.Array
  threshold: jax.Array
  W_skip: Any = None
  log_threshold: bool = struct.field(pytree_node=False, default=False)
  pre_encoder_bias: bool = struct.field(pytree_node=False, default=True)

  @property
  def d_in(self) -> int:
    """Input width."""
    return self.W_enc.shape[-2]

  @property
  def d_sae(self) -> int:
    """Number of latents."""
    return self.W_enc.shape[-1]

  def theta(self) -> jax.Array:
    """The threshold in input units, `[d_sae]` float32, whatever the parameterisation."""
    return jnp.exp(self.threshold) if self.log_threshold else self.threshold


@dataclasses.dataclass(frozen=True)
class JumpReLUSettings:
  """Static hyperparameters of the JumpReLU loss (hashable, so jit-static).

  Attributes:
    ste_to_input: pass the estimator's gradient to the pre-activations too.
    sparsity: 'step' (L0), 'tanh' (Anthropic) or 'quadratic' (target L0).
    tanh_scale: c in tanh(c * |f_i| * ||d_i||).
    pre_act_coeff: weight of the pre-activation loss (0 disables it).
    pre_act_dead_only: apply the pre-activation loss to dead latents only.
    sparsity_warmup_steps: lambda rises linearly from 0 over these steps.
    compute_dtype: dtype of the encoder/decoder matmuls ('float32'/'bfloat16').
    sparse_capacity: latents per row the sparse step keeps (0: the dense step).
    l0_control: steer lambda to the target L0 (`shared.control_update`).
    l0_control_rate: the controller's gain.
  """

  ste_to_input: bool = False
  sparsity: str = "step"
  tanh_scale: float = 4.0
  pre_act_coeff: float = 0.0
  pre_act_dead_only: bool = True
  sparsity_warmup_steps: int = 0
  compute_dtype: str = "float32"
  sparse_capacity: int = 0
  l0_control: bool = False
  l0_control_rate: float = 0.03


class _Latents(NamedTuple):
  """One forward's results. `values`, `gates` and `dec_norms` are what the sparsity
  penalties sum over the last axis: `[batch, d_sae]` (dense; `dec_norms: [d_sae]`)
  or each row's candidates `[batch, capacity]` (sparse)."""

  pre: jax.Array  # [batch, d_sae] pre-activations (metrics, the pre-activation loss)
  f: jax.Array  # [batch, d_sae] latents
  x_hat: jax.Array  # [batch, d_out]
  values: jax.Array
  gates: jax.Array
  dec_norms: jax.Array
  fired: jax.Array  # [d_sae] bool


def candidate_floor(theta: jax.Array, bandwidth) -> jax.Array:
  """Pre-activations above this may carry a value or a gradient: the straight-through
  window's lower edge theta - eps/2, less eps/64 so that rounding never leaves a latent
  of the window out (a spare candidate costs only a slot of the sparse step)."""
  return theta - bandwidth / 2 - bandwidth / 64


def auto_threshold(pre) -> float:
  """theta_0: the (1 - AUTO_FIRING) quantile of `pre` (numpy, any shape), at least 1e-6
  (theta must be positive)."""
  return max(float(np.quantile(np.asarray(pre, np.float64), 1 - AUTO_FIRING)), 1e-6)


def auto_bandwidth(pre, theta0: float) -> float:
  """eps such that [theta0 - eps/2, theta0 + eps/2] holds AUTO_WINDOW of `pre`: twice the
  AUTO_WINDOW quantile of |pre - theta0| (at least 1e-6)."""
  spread = np.abs(np.asarray(pre, np.float64) - theta0)
  return max(2 * float(np.quantile(spread, AUTO_WINDOW)), 1e-6)


def raw_threshold(params: JumpReLUParams) -> JumpReLUParams:
  """The same SAE with a raw float32 threshold theta (converts a log threshold)."""
  return params.replace(threshold=params.theta().astype(jnp.float32), log_threshold=False)


def canonical(params: JumpReLUParams) -> JumpReLUParams:
  """The inference layout: raw threshold, pre-encoder bias folded into b_enc."""
  return base.fold_pre_encoder_bias(raw_threshold(params))


class JumpReLUFamily(base.Family):
  """Pure functions of the JumpReLU family (see the module docstring)."""

  name = "jumprelu"
  params_type = JumpReLUParams
  inference_form = "jumprelu"
  param_spec_table = {**base.LINEAR_SPECS, "threshold": P("model")}
  config_defaults = {"optim.decoder_unit_norm": True}
  knob, knob_symbol = "loss.sparsity_coeff", "λ"
  auto_fields = ("sae.init_threshold", "sae.bandwidth", "loss.sparsity_warmup_steps")
  fields = {
      "sae": {
          "threshold_param": Field("raw", "'raw' theta or 'log' theta (GDM; log freezes"
                                   " under Adam on short runs, see README)"),
          "init_threshold": Field(0.001, "theta_0 for every latent (Gemma Scope)",
                                  init_only=True),
          "bandwidth": Field(0.001, "straight-through kernel width eps (Gemma Scope)",
                             traced=True),
          "ste_to_input": Field(False, "Anthropic variant: pass the estimator to the"
                                " pre-activations too"),
          "sparse_capacity": Field(-1, "latents per row of the sparse train step (active or"
                                   " in the window); 0: dense; -1: auto (from the target L0, then"
                                   " the logged max_candidates: ops.sparse.adapt_capacity)",
                                   resumable=True),
      },
      "loss": {
          "sparsity": Field("step", "'step' (L0, Gemma Scope), 'tanh' (Anthropic),"
                            " 'quadratic' (target L0)"),
          "sparsity_coeff": Field(6e-4, "lambda; 6e-4 gives L0 ~ 50 on Gemma 2 9B layer 20",
                                  traced=True),
          "sparsity_warmup_steps": Field(10_000, "lambda rises linearly from 0 over"
                                         " these steps"),
          "tanh_scale": Field(4.0, "c in tanh(c |f| ||d||) for sparsity='tanh'"),
          "target_l0": Field(50.0, "T for sparsity='quadratic', and the L0 loss.l0_control"
                             " steers to", traced=True),
          **CONTROL_FIELDS,
          "pre_act_coeff": Field(0.0, "pre-activation loss weight (Anthropic: 3e-6);"
                                 " 0 disables"),
          "pre_act_dead_only": Field(True, "apply it to dead latents only (SAELens) or"
                                     " to all"),
      },
  }

  # -- config

  def check_values(self, config) -> None:
    s, l = config.sae, config.loss
    checks = [
        (s.threshold_param in ("raw", "log"), "sae.threshold_param",
         f"{s.threshold_param!r} is not 'raw' or 'log'."),
        (l.sparsity in ("step", "tanh", "quadratic"), "loss.sparsity",
         f"{l.sparsity!r} is not one of 'step', 'tanh', 'quadratic'."),
        (s.bandwidth > 0, "sae.bandwidth", f"must be > 0; got {s.bandwidth!r}."),
        (s.init_threshold > 0, "sae.init_threshold",
         f"must be > 0; got {s.init_threshold!r}."),
        (l.sparsity_coeff >= 0, "loss.sparsity_coeff",
         f"must be >= 0; got {l.sparsity_coeff!r}."),
        (l.pre_act_coeff >= 0, "loss.pre_act_coeff",
         f"must be >= 0; got {l.pre_act_coeff!r}."),
        (l.sparsity_warmup_steps >= 0, "loss.sparsity_warmup_steps",
         f"must be >= 0; got {l.sparsity_warmup_steps!r}."),
        (l.target_l0 > 0, "loss.target_l0", f"must be > 0; got {l.target_l0!r}."),
        (isinstance(s.sparse_capacity, int) and -1 <= s.sparse_capacity <= s.d_sae,
         "sae.sparse_capacity", f"must be -1 (auto), 0 (dense) or 1..d_sae={s.d_sae};"
         f" got {s.sparse_capacity!r}."),
        (s.sparse_capacity <= 0 or not (s.ste_to_input or l.pre_act_coeff > 0),
         "sae.sparse_capacity", "the sparse step needs gradients into the pre-activations"
         " only where latents are active: set it to 0 (dense) with sae.ste_to_input or"
         " loss.pre_act_coeff > 0."),
    ]
    for ok, field, message in checks:
      if not ok:
        raise base.FamilyConfigError(f"config.{field}: {message}")
    if l.l0_control and l.sparsity == "quadratic":
      raise base.FamilyConfigError(
          "config.loss.l0_control: sparsity='quadratic' already aims at loss.target_l0 with a"
          " fixed lambda; the controller is the other way (with 'step' or 'tanh'): use one.")
    check_control(config)

  def init_state(self, d_sae: int, settings: JumpReLUSettings):
    """The lambda controller's state when controlled (`NoState` otherwise)."""
    del d_sae
    return init_control(settings.l0_control)

  def settings(self, config) -> JumpReLUSettings:
    s, l = config.sae, config.loss
    return JumpReLUSettings(
        ste_to_input=bool(s.ste_to_input), sparsity=l.sparsity,
        tanh_scale=float(l.tanh_scale), pre_act_coeff=float(l.pre_act_coeff),
        pre_act_dead_only=bool(l.pre_act_dead_only),
        sparsity_warmup_steps=int(l.sparsity_warmup_steps),
        compute_dtype=s.compute_dtype, sparse_capacity=self.sparse_capacity(config),
        l0_control=bool(l.l0_control), l0_control_rate=float(l.l0_control_rate))

  def sparse_capacity(self, config) -> int:
    """The sparse step's capacity (0: dense): the config's, or with -1 the rule's on the
    expected L0 (known in advance for sparsity='quadratic' and under the controller: the
    target)."""
    s, l = config.sae, config.loss
    if s.ste_to_input or l.pre_act_coeff > 0:
      return 0
    if s.sparse_capacity >= 0:
      return int(s.sparse_capacity)
    expected = l.target_l0 if l.sparsity == "quadratic" or l.l0_control else None
    return sparse.capacity_rule(s.d_sae, expected)

  def init_kwargs(self, config) -> dict:
    """`init` options from the config."""
    s = config.sae
    return dict(super().init_kwargs(config), init_threshold=s.init_threshold,
                log_threshold=s.threshold_param == "log")

  def auto_values(self, pre, num_steps: int) -> dict:
    """theta_0 (`auto_threshold`), the bandwidth (`auto_bandwidth`) and lambda's warm-up
    (AUTO_SPARSITY_WARMUP of the steps)."""
    theta0 = auto_threshold(pre)
    return {"sae.init_threshold": theta0, "sae.bandwidth": auto_bandwidth(pre, theta0),
            "loss.sparsity_warmup_steps": int(round(AUTO_SPARSITY_WARMUP * num_steps))}

  # -- training

  def init(self, key: jax.Array, *, d_in: int, d_sae: int,
           init_threshold: float = 0.001, log_threshold: bool = False,
           pre_encoder_bias: bool = True, d_out: int | None = None,
           skip: bool = False) -> JumpReLUParams:
    """Gemma Scope init: He-uniform decoder rows scaled to unit norm, W_enc = W_dec^T, zero
    biases (a transcoder's W_enc drawn alike, its skip at zero)."""
    if not init_threshold > 0:
      raise ValueError(f"init_threshold must be > 0; got {init_threshold}.")
    W_enc, W_dec = base.init_linear(key, d_in, d_sae, d_out=d_out)
    d_out = W_dec.shape[1]
    theta0 = jnp.full((d_sae,), init_threshold, jnp.float32)
    return JumpReLUParams(
        W_enc=W_enc, b_enc=jnp.zeros((d_sae,), jnp.float32), W_dec=W_dec,
        b_dec=jnp.zeros((d_out,), jnp.float32),
        threshold=jnp.log(theta0) if log_threshold else theta0,
        W_skip=base.init_skip(d_in, d_out, skip),
        log_threshold=log_threshold, pre_encoder_bias=pre_encoder_bias)

  def pre_activations(self, params: JumpReLUParams, x: jax.Array, *,
                      compute_dtype="float32") -> jax.Array:
    """pi(x): `x: [..., d_in]` -> `[..., d_sae]` float32."""
    return base.linear_pre_activations(params, x, compute_dtype=compute_dtype)

  def encode(self, params: JumpReLUParams, x: jax.Array, *, bandwidth=0.001,
             ste_to_input: bool = False, compute_dtype="float32") -> jax.Array:
    """Latents `[..., d_sae]` (float32) of `x: [..., d_in]` (straight-through gradients)."""
    pre = self.pre_activations(params, x, compute_dtype=compute_dtype)
    return jumprelu(pre, params.theta(), bandwidth, ste_to_input=ste_to_input)

  def loss(self, params: JumpReLUParams, state, x: jax.Array, *,
           settings: JumpReLUSettings, hparams: dict, dead: jax.Array,
           step: jax.Array, target: jax.Array | None = None) -> tuple[jax.Array, base.Output]:
    """Reconstruction + lambda * sparsity (+ pre-activation loss).

    Args:
      params: the family's parameters.
      state: the lambda controller's `L0Control` (`NoState` without it).
      x: `[batch, d_in]` normalised inputs.
      settings: static loss hyperparameters.
      hparams: traced `sparsity_coeff`, `bandwidth`, `target_l0` (scalars).
      dead: `[d_sae]` bool, latents that have not fired for a while.
      step: `[]` the update's step (for the lambda warm-up).
      target: `[batch, d_out]` what a transcoder predicts (None: x, an SAE).
    """
    eps = hparams["bandwidth"]
    coeff = controlled_coeff(hparams, state, settings, step)
    theta = params.theta()
    y = x if target is None else target
    terms = lambda latents: self._loss_terms(params, y, latents, theta, coeff, hparams,
                                             dead, settings)
    dense = lambda: terms(self._dense_latents(params, x, theta, eps, settings))
    if settings.sparse_capacity:
      overflow, sparse_latents = self._sparse_latents(params, x, theta, eps, settings)
      total, parts, (pre, f, x_hat, fired, l0) = jax.lax.cond(
          overflow, dense, lambda: terms(sparse_latents()))
    else:
      total, parts, (pre, f, x_hat, fired, l0) = dense()
    state = control_update(state, l0, hparams, settings, step)
    return total, base.Output(f=f, x_hat=x_hat, state=state, parts=parts,
                              extras=dict(pre=pre, theta=theta, bandwidth=eps), fired=fired)

  def _loss_terms(self, params, y, latents: "_Latents", theta, coeff, hparams, dead,
                  settings):
    """(total loss, its parts, (pre, f, x_hat, fired, L0)) of one forward (dense or sparse)
    predicting `y`: the same shapes either way, so that a `lax.cond` can choose."""
    rec = losses.reconstruction(y, latents.x_hat)
    if settings.sparsity == "step":
      sparsity = losses.step_l0(latents.gates)
    elif settings.sparsity == "tanh":
      sparsity = losses.tanh_penalty(latents.values, latents.dec_norms, settings.tanh_scale)
    elif settings.sparsity == "quadratic":
      sparsity = losses.quadratic_l0(latents.gates, hparams["target_l0"])
    else:
      raise ValueError(f"unknown sparsity penalty {settings.sparsity!r};"
                       " use 'step', 'tanh' or 'quadratic'.")
    total = rec + coeff * sparsity
    pre_act = jnp.zeros((), jnp.float32)
    if settings.pre_act_coeff > 0:  # dense forward only (`check_values`)
      mask = dead if settings.pre_act_dead_only else None
      pre_act = losses.pre_activation(latents.pre, theta, ops.decoder_norms(params.W_dec), mask)
      total = total + settings.pre_act_coeff * pre_act
    parts = dict(reconstruction=rec, sparsity=sparsity, pre_act=pre_act, sparsity_coeff=coeff)
    l0 = losses.step_l0(latents.gates)  # the batch's mean L0 (the gates are 0/1 forward)
    return total, parts, (latents.pre, latents.f, latents.x_hat, latents.fired, l0)

  def _dense_latents(self, params, x, theta, eps, settings) -> "_Latents":
    """The forward with dense matmuls; the penalties see every latent."""
    cdt, ste = settings.compute_dtype, settings.ste_to_input
    pre = self.pre_activations(params, x, compute_dtype=cdt)
    f = jumprelu(pre, theta, eps, ste_to_input=ste)
    return _Latents(pre=pre, f=f, x_hat=self.predict(params, f, x, compute_dtype=cdt),
                    values=f, gates=heaviside(pre, theta, eps, ste_to_input=ste),
                    dec_norms=ops.decoder_norms(params.W_dec), fired=jnp.any(f != 0, axis=0))

  def _sparse_latents(self, params, x, theta, eps, settings):
    """(overflow `[]` bool, the sparse forward as a thunk): the dense encoder matmul picks
    each row's candidate latents (active or in the straight-through window:
    pi > theta - eps/2); everything after it runs on those `sparse_capacity`
    entries per row, so no `[batch, d_sae]` array is built (the dense `f` and `pre`
    only when metrics read them). `overflow`: a row has more candidates than the
    capacity, and the caller takes the dense forward instead.

    Exact because only candidates carry a value (f) or a gradient (df reaches theta
    inside the window; dpi = df where active, as `ste_to_input` is off).
    """
    cap, cdt, d_sae = settings.sparse_capacity, settings.compute_dtype, params.d_sae
    b_in = params.b_dec if params.pre_encoder_bias else jnp.zeros((x.shape[-1],), x.dtype)
    value = jax.lax.stop_gradient(ops.matmul(x - b_in, params.W_enc, cdt))
    low = jax.lax.stop_gradient(candidate_floor(theta, eps) - params.b_enc)
    idx, valid, overflow = sparse.candidates(value > low, cap)
    chunk = sparse.batch_chunk(x.shape[0], sparse.ROWS_PER_STEP // cap)

    def forward() -> _Latents:
      pre_c = sparse.pre_activations_at(x, b_in, params.W_enc, params.b_enc, value, idx, chunk)
      theta_c = theta[idx]
      f_c = jnp.where(valid, jumprelu(pre_c, theta_c, eps), 0.0)
      x_hat = (sparse.sparse_decode(f_c, idx, params.W_dec, chunk) + params.b_dec
               + base.skip(params, x, cdt))
      fired = sparse.fired_latents(f_c, idx, d_sae)
      return _Latents(
          pre=value + params.b_enc, f=sparse.scatter_rows(f_c, idx, d_sae), x_hat=x_hat,
          values=f_c, gates=jnp.where(valid, heaviside(pre_c, theta_c, eps), 0.0),
          dec_norms=ops.decoder_norms(params.W_dec)[idx], fired=fired)

    return overflow, forward

  def metrics(self, output: base.Output, settings) -> dict:
    """Threshold health: share of pre-activations in the window, theta quantiles."""
    pre, theta = output.extras["pre"], output.extras["theta"]
    in_window = jnp.abs(pre - theta) < output.extras["bandwidth"] / 2
    q10, q50, q90 = jnp.quantile(theta, jnp.array([0.1, 0.5, 0.9]))
    candidates = pre > candidate_floor(theta, output.extras["bandwidth"])
    return dict(window_frac=jnp.mean(in_window.astype(jnp.float32)),
                theta_p10=q10, theta_p50=q50, theta_p90=q90,
                max_candidates=jnp.max(jnp.sum(candidates, -1)).astype(jnp.float32))

  def group_config(self, configs: list):
    """The first member's config; an automatic sparse step is dense in a sweep."""
    return shared.dense_when_auto(super().group_config(configs))

  def adapts_capacity(self, config) -> bool:
    """With `sae.sparse_capacity=-1` (auto) wherever the sparse step applies."""
    return config.sae.sparse_capacity == -1 and not (config.sae.ste_to_input
                                                     or config.loss.pre_act_coeff > 0)

  def constrain(self, params: JumpReLUParams, settings=None) -> JumpReLUParams:
    """Keeps a raw threshold non-negative (theta = 0 makes JumpReLU a ReLU)."""
    if params.log_threshold:
      return params
    return params.replace(threshold=jnp.maximum(params.threshold, 0.0))

  # -- inference

  def fold(self, params: JumpReLUParams, state, norm_scale) -> tuple[str, JumpReLUParams]:
    """Raw-unit parameters: b_enc' = C (b_enc - b_dec W_enc), theta' = C theta, b_dec' = C b_dec
    (a transcoder's output side: `base.scale_biases`)."""
    del state
    return "jumprelu", fold_norm_scale(canonical(params), norm_scale)

  def canonical(self, params: JumpReLUParams) -> JumpReLUParams:
    """Raw float32 threshold and the pre-encoder bias folded into b_enc."""
    return canonical(params)

  def infer(self, params: JumpReLUParams, x: jax.Array) -> jax.Array:
    """f = pi * 1[pi > max(theta, 0)] in float32, plain jnp."""
    pre = base.plain_pre_activations(params, x)
    theta = jnp.maximum(params.theta().astype(jnp.float32), 0.0)
    return jnp.where(pre > theta, pre, 0.0)

  def fold_decoder_norms(self, params: JumpReLUParams) -> JumpReLUParams:
    """Unit-norm decoder rows; theta_i scales with latent i (n_i = ||W_dec[i]||)."""
    params = raw_threshold(params)
    n = base.row_norm_factors(params.W_dec)
    return base.fold_decoder_norms_linear(params).replace(threshold=params.threshold * n)

  def threshold_of(self, params: JumpReLUParams) -> jax.Array:
    """theta `[d_sae]` float32, whatever the parameterisation."""
    return params.theta().astype(jnp.float32)


def fold_norm_scale(params: JumpReLUParams, norm_scale) -> JumpReLUParams:
  """Parameters for raw inputs x of an SAE trained on x / norm_scale.

  Scales b_enc, b_dec and theta by C = norm_scale (W unchanged); latents become
  C times larger and the reconstruction is in raw units. Works with or without
  a pre-encoder bias: (x - C b_dec) @ W + C b_enc = C ((x/C - b_dec) @ W + b_enc).
  A transcoder's `(C_in, C_out)` also scales the output side (`base.scale_biases`).
  """
  c_in, c_out = base.norm_scales(norm_scale)
  params = raw_threshold(params)
  return base.scale_biases(params, c_in, c_out).replace(threshold=params.threshold * c_in)


family = base.register(JumpReLUFamily())
