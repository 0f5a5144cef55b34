"""Family code that several families share: the plain linear encoder and decoder,
the lambda-penalty fields and the lambda controller, AuxK's fields and loss, and the
sparse step's sweep rule.

Families build on these public names; no family reaches into another's module.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from jsae import losses
from jsae.saes import base
from jsae.saes.base import Field


# The controller's fields, in every lambda-penalised family's loss group.
CONTROL_FIELDS = {
    "l0_control": Field(False, "steer lambda to loss.target_l0 after the warm-up: integral"
                        " control of log lambda on each batch's L0"),
    "l0_control_rate": Field(0.03, "the controller's gain: log lambda moves by rate x"
                             " log((L0 + 1) / (target + 1)) a step, at most rate"),
}
# lambda stays within sparsity_coeff x e^(+-CONTROL_BOUND): 10^-4 .. 10^4 of the start.
CONTROL_BOUND = math.log(1e4)


def lambda_fields(coeff: float, doc: str) -> dict[str, Field]:
  """The loss fields every lambda-penalised family has: the coefficient, its warm-up, and
  the controller that can steer it to a target L0 (`CONTROL_FIELDS`)."""
  return {"sparsity_coeff": Field(coeff, doc, traced=True),
          "sparsity_warmup_steps": Field(10_000, "lambda rises linearly from 0 over these"
                                         " steps"),
          "target_l0": Field(50.0, "the L0 loss.l0_control steers to", traced=True),
          **CONTROL_FIELDS}


def check_lambda_fields(config) -> None:
  """Raises FamilyConfigError for a negative lambda or warm-up, or a controller whose
  target or gain cannot work."""
  for field in ("sparsity_coeff", "sparsity_warmup_steps"):
    if not config.loss[field] >= 0:
      raise base.FamilyConfigError(f"config.loss.{field}: must be >= 0; got"
                                   f" {config.loss[field]!r}.")
  check_control(config)


def check_control(config) -> None:
  """The controller's fields: a target L0 in (0, d_sae], a positive gain, a lambda to
  scale (FamilyConfigError naming the field)."""
  l = config.loss
  if not l.get("l0_control", False):
    return
  d_sae = config.sae.d_sae
  if not 0 < l.target_l0 <= d_sae:
    raise base.FamilyConfigError(
        f"config.loss.target_l0: {l.target_l0!r} cannot be reached: the controller steers"
        f" the mean number of active latents, which lies in (0, d_sae={d_sae}]; pick a"
        " target in that range.")
  if not l.l0_control_rate > 0:
    raise base.FamilyConfigError(f"config.loss.l0_control_rate: must be > 0; got"
                                 f" {l.l0_control_rate!r}.")
  if not l.sparsity_coeff > 0:
    raise base.FamilyConfigError(
        "config.loss.sparsity_coeff: the controller scales lambda from this starting value,"
        f" so it must be > 0; got {l.sparsity_coeff!r}.")


@struct.dataclass
class L0Control:
  """The lambda controller's state (a family state): lambda = sparsity_coeff x
  exp(log_scale), `log_scale: []` float32 (0 at the start)."""

  log_scale: jax.Array


def init_control(l0_control: bool):
  """The family state of a lambda-penalised family: `L0Control` when controlled."""
  return L0Control(log_scale=jnp.zeros([], jnp.float32)) if l0_control else base.NoState()


def controlled_coeff(hparams: dict, state, settings, step: jax.Array) -> jax.Array:
  """The step's lambda: sparsity_coeff (x exp(log_scale) under control), warmed up."""
  coeff = hparams["sparsity_coeff"]
  if settings.l0_control:
    coeff = coeff * jnp.exp(state.log_scale)
  return base.warmed_coeff(coeff, step, settings.sparsity_warmup_steps)


def control_update(state, l0: jax.Array, hparams: dict, settings, step: jax.Array):
  """The controller after a batch whose mean L0 was `l0` (integral control of log lambda).

  log_scale += rate x clip(log((L0 + 1) / (target + 1)), -1, 1): lambda grows while
  the L0 is above the target and shrinks below it, by at most `rate` in log a step, and
  stays within e^(+-CONTROL_BOUND) of sparsity_coeff. The +1 keeps the error finite when
  no latent fires. Frozen during the warm-up, whose lambda ramp it would fight.
  """
  if not settings.l0_control:
    return state
  error = jnp.log((jax.lax.stop_gradient(l0) + 1.0) / (hparams["target_l0"] + 1.0))
  delta = settings.l0_control_rate * jnp.clip(error, -1.0, 1.0)
  delta = jnp.where(step >= settings.sparsity_warmup_steps, delta, 0.0)
  return L0Control(log_scale=jnp.clip(state.log_scale + delta, -CONTROL_BOUND, CONTROL_BOUND))


AUX_FIELDS = {
    "aux_coeff": Field(1 / 32, "AuxK weight alpha (Gao, OpenAI, dictionary_learning: 1/32;"
                       " SAELens: 1.0)"),
    "aux_form": Field("gao", "AuxK form: 'gao' (ReLU'd, residual-variance-normalised) or"
                      " 'saelens' (pre-ReLU, unnormalised, scaled by min(n_dead/k_aux, 1))"),
}


def aux_loss(pre: jax.Array, x: jax.Array, x_hat: jax.Array, W_dec: jax.Array,
             dead: jax.Array, settings) -> jax.Array:
  """AuxK on the stopped residual x - x_hat, 0 when no latent is dead.

  `pre: [batch, d_sae]`, `x, x_hat: [batch, d_in]`, `dead: [d_sae]`; `settings`
  carries k_aux, aux_coeff, aux_form and compute_dtype.
  """
  k_aux = min(settings.k_aux, pre.shape[-1])
  if settings.aux_coeff <= 0 or k_aux <= 0:
    return jnp.zeros((), jnp.float32)
  residual = jax.lax.stop_gradient(x.astype(jnp.float32) - x_hat)

  def aux(operands):
    pre, W_dec = operands
    return losses.auxk(residual, pre, dead, W_dec, k_aux, form=settings.aux_form,
                       compute_dtype=settings.compute_dtype)
  return jax.lax.cond(jnp.any(dead), aux, lambda _: jnp.zeros((), jnp.float32),
                      (pre, W_dec))


def dense_when_auto(config):
  """`config` with an automatic sparse step (`sae.sparse_capacity=-1`) set to dense.

  A sweep group's members run under `vmap` or `lax.map`, where the sparse step's
  `lax.cond` fallback becomes a select that runs both paths, so "auto" means
  dense there; an explicit capacity is kept.
  """
  if config.sae.get("sparse_capacity", 0) == -1:
    config.sae.sparse_capacity = 0
  return config


class LinearFamily(base.Family):
  """What the families with a plain linear encoder share (ReLU, TopK, BatchTopK)."""

  param_spec_table = dict(base.LINEAR_SPECS)
  init_row_norm = 1.0  # decoder row norm at init

  def init(self, key: jax.Array, *, d_in: int, d_sae: int, pre_encoder_bias: bool = True,
           d_out: int | None = None, skip: bool = False, **static):
    """Decoder rows He-uniform at norm `init_row_norm`, W_enc = W_dec^T (a transcoder's
    drawn alike), zero biases and skip."""
    W_enc, W_dec = base.init_linear(key, d_in, d_sae, row_norm=self.init_row_norm, d_out=d_out)
    d_out = W_dec.shape[1]
    return self.params_type(W_enc=W_enc, b_enc=jnp.zeros((d_sae,), jnp.float32), W_dec=W_dec,
                            b_dec=jnp.zeros((d_out,), jnp.float32),
                            W_skip=base.init_skip(d_in, d_out, skip),
                            pre_encoder_bias=pre_encoder_bias, **static)

  def pre_activations(self, params, x: jax.Array, *, compute_dtype="float32") -> jax.Array:
    """pi(x): `x: [..., d_in]` -> `[..., d_sae]` float32."""
    return base.linear_pre_activations(params, x, compute_dtype=compute_dtype)

  def fold_linear(self, params, norm_scale):
    """Pre-encoder bias into b_enc, then the norm scales (`base.scale_biases`)."""
    return base.scale_biases(base.fold_pre_encoder_bias(params), *base.norm_scales(norm_scale))

  def fold_decoder_norms(self, params):
    """Unit-norm decoder rows, norms moved into the encoder (same on/off pattern)."""
    return base.fold_decoder_norms_linear(params)


__all__ = ["AUX_FIELDS", "CONTROL_BOUND", "CONTROL_FIELDS", "L0Control", "LinearFamily",
           "aux_loss", "check_control", "check_lambda_fields", "control_update",
           "controlled_coeff", "dense_when_auto", "init_control", "lambda_fields"]
