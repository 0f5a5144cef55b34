"""The Gated SAE family (Rajamanoharan et al. 2024, arXiv 2404.16014), with RI-L1.

  z        = (x - b_dec) @ W_enc                  one encoder matmul for both paths
  pi_gate  = z + b_gate                           which latents are on
  pi_mag   = z * exp(r_mag) + b_mag               how large they are (r_mag tie)
  f        = 1[pi_gate > 0] * ReLU(pi_mag)        no gradient through the Heaviside
  x_hat    = f @ W_dec + b_dec
  loss     = ||x - x_hat||^2 + lambda * penalty(ReLU(pi_gate))
             + ||x - (ReLU(pi_gate) @ W_dec + b_dec)||^2        (the auxiliary loss)

`penalty='ri_l1'` (default, the reparameterisation-invariant L1 of the JumpReLU
paper's Gated baselines and SAELens): sum_i ReLU(pi_gate)_i ||d_i||, the
auxiliary loss through the decoder, no decoder-norm constraint. `penalty='l1'`
(the Gated paper): unweighted L1, auxiliary loss with the decoder frozen
(stop-gradient on W_dec and b_dec), unit-norm decoder rows (set
`optim.decoder_unit_norm=True`).

Inference: exactly a JumpReLU (GAT section 3.2.1, App. E): W_enc' = W_enc
diag(exp r_mag), b_enc' = b_mag, theta = b_mag - exp(r_mag) * b_gate (theta may
be negative; JumpReLU's ReLU keeps the equivalence exact).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jsae import losses, ops
from jsae.saes import base
from jsae.saes.base import Field
from jsae.saes.jumprelu import JumpReLUParams, fold_norm_scale
from jsae.saes.shared import (check_lambda_fields, control_update, controlled_coeff,
                              init_control, lambda_fields)

P = jax.sharding.PartitionSpec


@struct.dataclass
class GatedParams:
  """Parameters of a Gated SAE (float32).

  Attributes:
    W_enc: `[d_in, d_sae]` gate encoder (the magnitude encoder is W_enc diag(exp r_mag)).
    b_gate: `[d_sae]` gate bias.
    r_mag: `[d_sae]` log scale of the magnitude encoder.
    b_mag: `[d_sae]` magnitude bias.
    W_dec: `[d_sae, d_out]` decoder.
    b_dec: `[d_out]` decoder bias.
    W_skip: `[d_in, d_out]` a skip transcoder's affine skip, or None.
    pre_encoder_bias: whether `b_dec` is subtracted before encoding (static).
  """

  W_enc: jax.Array
  b_gate: jax.Array
  r_mag: jax.Array
  b_mag: jax.Array
  W_dec: jax.Array
  b_dec: jax.Array
  W_skip: Any = None
  pre_encoder_bias: bool = struct.field(pytree_node=False, default=True)


@dataclasses.dataclass(frozen=True)
class GatedSettings:
  """Static hyperparameters of the Gated loss.

  Attributes:
    penalty: 'ri_l1' or 'l1' (module docstring).
    sparsity_warmup_steps: lambda rises linearly from 0 over these steps.
    compute_dtype: matmul dtype.
    l0_control: steer lambda to the target L0 (`shared.control_update`).
    l0_control_rate: the controller's gain.
  """

  penalty: str = "ri_l1"
  sparsity_warmup_steps: int = 0
  compute_dtype: str = "float32"
  l0_control: bool = False
  l0_control_rate: float = 0.03


class GatedFamily(base.Family):
  """Pure functions of the Gated family (see the module docstring)."""

  name = "gated"
  params_type = GatedParams
  inference_form = "jumprelu"
  param_spec_table = {"W_enc": P(None, "model"), "b_gate": P("model"), "r_mag": P("model"),
                      "b_mag": P("model"), "W_dec": P("model", None), "b_dec": P(),
                      "W_skip": P()}
  config_defaults = {"optim.decoder_unit_norm": False}
  knob, knob_symbol = "loss.sparsity_coeff", "λ"
  step_matmuls = 8  # one encoder matmul for both paths, two decodes (+ their gradients)
  fields = {
      "sae": {},
      "loss": {**lambda_fields(0.05, "lambda of the gate penalty (inputs at E||x||^2 = 1)"),
               "penalty": Field("ri_l1", "'ri_l1' (||d||-weighted, SAELens, JumpReLU paper's"
                                " baselines) or 'l1' (Gated paper: frozen-decoder aux,"
                                " needs optim.decoder_unit_norm)")},
  }

  def check_values(self, config) -> None:
    check_lambda_fields(config)
    penalty = config.loss.penalty
    if penalty not in ("ri_l1", "l1"):
      raise base.FamilyConfigError(f"config.loss.penalty: {penalty!r} is not 'ri_l1' or"
                                   " 'l1'.")
    if penalty == "l1" and not config.optim.decoder_unit_norm:
      raise base.FamilyConfigError(
          "config.loss.penalty: 'l1' is not invariant to decoder-row scale; it needs"
          " --config.optim.decoder_unit_norm=True (or use penalty='ri_l1').")

  def settings(self, config) -> GatedSettings:
    l = config.loss
    return GatedSettings(penalty=l.penalty, sparsity_warmup_steps=int(l.sparsity_warmup_steps),
                         compute_dtype=config.sae.compute_dtype,
                         l0_control=bool(l.l0_control), l0_control_rate=float(l.l0_control_rate))

  def init_state(self, d_sae: int, settings: GatedSettings):
    """The lambda controller's state when controlled (`NoState` otherwise)."""
    del d_sae
    return init_control(settings.l0_control)

  def init(self, key: jax.Array, *, d_in: int, d_sae: int, pre_encoder_bias: bool = True,
           d_out: int | None = None, skip: bool = False) -> GatedParams:
    """Unit-norm He-uniform decoder rows, W_enc = W_dec^T, r_mag and biases 0 (dictionary_learning)."""
    W_enc, W_dec = base.init_linear(key, d_in, d_sae, d_out=d_out)
    d_out = W_dec.shape[1]
    zeros = jnp.zeros((d_sae,), jnp.float32)
    return GatedParams(W_enc=W_enc, b_gate=zeros, r_mag=zeros, b_mag=zeros, W_dec=W_dec,
                       b_dec=jnp.zeros((d_out,), jnp.float32),
                       W_skip=base.init_skip(d_in, d_out, skip),
                       pre_encoder_bias=pre_encoder_bias)

  def pre_activations(self, params: GatedParams, x: jax.Array, *, compute_dtype="float32"
                      ) -> tuple[jax.Array, jax.Array]:
    """(pi_gate, pi_mag), each `[..., d_sae]` float32, from one encoder matmul."""
    if x.shape[-1] != params.W_enc.shape[-2]:
      raise ValueError(f"input has {x.shape[-1]} features but the SAE expects"
                       f" d_in={params.W_enc.shape[-2]}.")
    bias = params.b_dec if params.pre_encoder_bias else None
    z = ops.matmul(x, params.W_enc, compute_dtype, input_bias=bias)
    return z + params.b_gate, z * jnp.exp(params.r_mag) + params.b_mag

  def encode(self, params: GatedParams, x: jax.Array, *, compute_dtype="float32"
             ) -> jax.Array:
    """Latents 1[pi_gate > 0] ReLU(pi_mag), `[..., d_sae]` float32."""
    pi_gate, pi_mag = self.pre_activations(params, x, compute_dtype=compute_dtype)
    return jnp.where(jax.lax.stop_gradient(pi_gate) > 0, jax.nn.relu(pi_mag), 0.0)

  def loss(self, params: GatedParams, state, x: jax.Array, *, settings: GatedSettings,
           hparams: dict, dead: jax.Array, step: jax.Array, target: jax.Array | None = None):
    """Reconstruction + lambda * gate penalty + auxiliary reconstruction from the gate,
    of y = x (an SAE) or `target` (a transcoder, whose skip joins both outputs)."""
    del dead
    y = x if target is None else target
    cdt = settings.compute_dtype
    coeff = controlled_coeff(hparams, state, settings, step)
    pi_gate, pi_mag = self.pre_activations(params, x, compute_dtype=cdt)
    f = jnp.where(jax.lax.stop_gradient(pi_gate) > 0, jax.nn.relu(pi_mag), 0.0)
    x_skip = base.skip(params, x, cdt)
    x_hat = self.decode(params, f, compute_dtype=cdt) + x_skip
    gate = jax.nn.relu(pi_gate)
    if settings.penalty == "ri_l1":
      sparsity = losses.weighted_l1(gate, ops.decoder_norms(params.W_dec))
      W_aux, b_aux = params.W_dec, params.b_dec
    else:
      sparsity = jnp.mean(jnp.sum(gate, axis=-1))
      W_aux, b_aux = jax.lax.stop_gradient((params.W_dec, params.b_dec))
      x_skip = jax.lax.stop_gradient(x_skip)
    x_gate = ops.matmul(gate, W_aux, cdt) + b_aux + x_skip
    rec, aux = losses.reconstruction(y, x_hat), losses.reconstruction(y, x_gate)
    parts = dict(reconstruction=rec, sparsity=sparsity, aux=aux, sparsity_coeff=coeff)
    l0 = jnp.mean(jnp.sum(pi_gate > 0, axis=-1))  # the gate decides which latents fire
    state = control_update(state, l0, hparams, settings, step)
    return rec + coeff * sparsity + aux, base.Output(f=f, x_hat=x_hat, state=state,
                                                     parts=parts, extras={})

  def as_jumprelu(self, params: GatedParams) -> JumpReLUParams:
    """The exactly equivalent JumpReLU parameters (same units, module docstring)."""
    scale = jnp.exp(params.r_mag.astype(jnp.float32))
    return JumpReLUParams(
        W_enc=(params.W_enc.astype(jnp.float32) * scale[None, :]).astype(params.W_enc.dtype),
        b_enc=params.b_mag, W_dec=params.W_dec, b_dec=params.b_dec,
        threshold=(params.b_mag - scale * params.b_gate).astype(jnp.float32),
        W_skip=params.W_skip, pre_encoder_bias=params.pre_encoder_bias)

  def fold(self, params: GatedParams, state, norm_scale):
    """The JumpReLU form in raw units."""
    del state
    return "jumprelu", fold_norm_scale(base.fold_pre_encoder_bias(self.as_jumprelu(params)),
                                       norm_scale)


family = base.register(GatedFamily())
