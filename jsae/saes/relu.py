"""The ReLU SAE family with the decoder-norm-weighted L1 penalty (Anthropic, April 2024).

  pi(x)  = (x - b_dec) @ W_enc + b_enc
  f(x)   = ReLU(pi(x))
  x_hat  = f @ W_dec + b_dec
  loss   = ||x - x_hat||^2 + lambda * sum_i f_i ||d_i||

The penalty is invariant to d_i -> c d_i with f_i -> f_i / c, so no decoder-norm
constraint is needed (`optim.decoder_unit_norm` defaults to False here, as in
SAELens's `standard` and dictionary_learning's April update). Exported to SAELens
as architecture `standard`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jsae import losses, ops
from jsae.saes import base
from jsae.saes.shared import (LinearFamily, check_lambda_fields, control_update,
                              controlled_coeff, init_control, lambda_fields)


@struct.dataclass
class ReLUParams:
  """Parameters of a ReLU SAE (float32).

  Attributes:
    W_enc: `[d_in, d_sae]` encoder.
    b_enc: `[d_sae]` encoder bias.
    W_dec: `[d_sae, d_out]` decoder; rows are latent directions (any norm).
    b_dec: `[d_out]` decoder bias.
    W_skip: `[d_in, d_out]` a skip transcoder's affine skip, or None.
    pre_encoder_bias: whether `b_dec` is subtracted before encoding (static).
  """

  W_enc: jax.Array
  b_enc: jax.Array
  W_dec: jax.Array
  b_dec: jax.Array
  W_skip: Any = None
  pre_encoder_bias: bool = struct.field(pytree_node=False, default=True)


@dataclasses.dataclass(frozen=True)
class ReLUSettings:
  """Static hyperparameters of the ReLU loss.

  Attributes:
    sparsity_warmup_steps: lambda rises linearly from 0 over these steps.
    compute_dtype: matmul dtype.
    l0_control: steer lambda to the target L0 (`shared.control_update`).
    l0_control_rate: the controller's gain.
  """

  sparsity_warmup_steps: int = 0
  compute_dtype: str = "float32"
  l0_control: bool = False
  l0_control_rate: float = 0.03


class ReLUFamily(LinearFamily):
  """Pure functions of the ReLU family (see the module docstring)."""

  name = "relu"
  params_type = ReLUParams
  inference_form = "relu"
  init_row_norm = 0.1  # Anthropic April 2024 / SAELens heuristic
  config_defaults = {"optim.decoder_unit_norm": False}
  knob, knob_symbol = "loss.sparsity_coeff", "λ"
  fields = {"sae": {},
            "loss": lambda_fields(0.05, "lambda of sum_i f_i ||d_i|| (inputs at E||x||^2 = 1)")}

  def check_values(self, config) -> None:
    check_lambda_fields(config)

  def settings(self, config) -> ReLUSettings:
    l = config.loss
    return ReLUSettings(sparsity_warmup_steps=int(l.sparsity_warmup_steps),
                        compute_dtype=config.sae.compute_dtype,
                        l0_control=bool(l.l0_control), l0_control_rate=float(l.l0_control_rate))

  def init_state(self, d_sae: int, settings: ReLUSettings):
    """The lambda controller's state when controlled (`NoState` otherwise)."""
    del d_sae
    return init_control(settings.l0_control)

  def encode(self, params: ReLUParams, x: jax.Array, *, compute_dtype="float32"
             ) -> jax.Array:
    """Latents ReLU(pi) `[..., d_sae]` float32."""
    return jax.nn.relu(self.pre_activations(params, x, compute_dtype=compute_dtype))

  def loss(self, params: ReLUParams, state, x: jax.Array, *, settings: ReLUSettings,
           hparams: dict, dead: jax.Array, step: jax.Array, target: jax.Array | None = None):
    """||y - y_hat||^2 + lambda sum_i f_i ||d_i|| on `x: [batch, d_in]` (y = x for an SAE,
    `target` for a transcoder)."""
    del dead
    y = x if target is None else target
    coeff = controlled_coeff(hparams, state, settings, step)
    f = self.encode(params, x, compute_dtype=settings.compute_dtype)
    x_hat = self.predict(params, f, x, compute_dtype=settings.compute_dtype)
    rec = losses.reconstruction(y, x_hat)
    sparsity = losses.weighted_l1(f, ops.decoder_norms(params.W_dec))
    parts = dict(reconstruction=rec, sparsity=sparsity, sparsity_coeff=coeff)
    state = control_update(state, jnp.mean(jnp.sum(f > 0, axis=-1)), hparams, settings, step)
    return rec + coeff * sparsity, base.Output(f=f, x_hat=x_hat, state=state, parts=parts,
                                               extras={})

  def fold(self, params: ReLUParams, state, norm_scale: float):
    del state
    return "relu", self.fold_linear(params, norm_scale)

  def infer(self, params: ReLUParams, x: jax.Array) -> jax.Array:
    """ReLU(x @ W_enc + b_enc), plain jnp."""
    return jax.nn.relu(base.plain_pre_activations(params, x))


family = base.register(ReLUFamily())
