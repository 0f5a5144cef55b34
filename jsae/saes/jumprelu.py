"""The JumpReLU SAE family (Rajamanoharan et al. 2024; Gemma Scope recipe).

  pi(x)  = (x - b_dec) @ W_enc + b_enc        (pre-encoder bias on by default)
  f(x)   = JumpReLU_theta(pi(x))
  x_hat  = f @ W_dec + b_dec
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jsae import losses
from jsae import ops
from jsae.ops import jumprelu, step
from jsae.saes import base


@struct.dataclass
class JumpReLUParams:
  """Parameters of a JumpReLU SAE (float32).

  Attributes:
    W_enc: `[d_in, d_sae]` encoder.
    b_enc: `[d_sae]` encoder bias.
    W_dec: `[d_sae, d_in]` decoder; rows are latent directions.
    b_dec: `[d_in]` decoder bias.
    threshold: `[d_sae]` raw theta, or log theta when `log_threshold`.
    log_threshold: whether `threshold` stores log theta (static).
    pre_encoder_bias: whether `b_dec` is subtracted before encoding (static).
  """

  W_enc: jax.Array
  b_enc: jax.Array
  W_dec: jax.Array
  b_dec: jax.Array
  threshold: jax.Array
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


class JumpReLUFamily:
  """Pure functions of the JumpReLU family (see the module docstring)."""

  name = "jumprelu"
  params_type = JumpReLUParams

  def init(self, key: jax.Array, *, d_in: int, d_sae: int,
           init_threshold: float = 0.001, log_threshold: bool = False,
           pre_encoder_bias: bool = True) -> JumpReLUParams:
    """Gemma Scope init: He-uniform decoder rows scaled to unit norm, W_enc = W_dec^T, zero biases."""
    if d_in <= 0 or d_sae <= 0:
      raise ValueError(f"d_in and d_sae must be positive; got d_in={d_in}, d_sae={d_sae}.")
    if not init_threshold > 0:
      raise ValueError(f"init_threshold must be > 0; got {init_threshold}.")
    W_dec = jax.nn.initializers.he_uniform()(key, (d_sae, d_in), jnp.float32)
    W_dec = W_dec / ops.decoder_norms(W_dec)[:, None]
    theta0 = jnp.full((d_sae,), init_threshold, jnp.float32)
    return JumpReLUParams(
        W_enc=W_dec.T, b_enc=jnp.zeros((d_sae,), jnp.float32), W_dec=W_dec,
        b_dec=jnp.zeros((d_in,), jnp.float32),
        threshold=jnp.log(theta0) if log_threshold else theta0,
        log_threshold=log_threshold, pre_encoder_bias=pre_encoder_bias)

  def pre_activations(self, params: JumpReLUParams, x: jax.Array, *,
                      compute_dtype="float32") -> jax.Array:
    """pi(x): `x: [..., d_in]` -> `[..., d_sae]` float32."""
    if x.shape[-1] != params.d_in:
      raise ValueError(
          f"input has {x.shape[-1]} features but the SAE expects d_in={params.d_in}.")
    bias = params.b_dec if params.pre_encoder_bias else None
    return ops.matmul(x, params.W_enc, compute_dtype, input_bias=bias) + params.b_enc

  def encode(self, params: JumpReLUParams, x: jax.Array, *, bandwidth=0.001,
             ste_to_input: bool = False, compute_dtype="float32") -> jax.Array:
    """Latents `[..., d_sae]` (float32) of `x: [..., d_in]`."""
    pre = self.pre_activations(params, x, compute_dtype=compute_dtype)
    return jumprelu(pre, params.theta(), bandwidth, ste_to_input=ste_to_input)

  def decode(self, params: JumpReLUParams, f: jax.Array, *,
             compute_dtype="float32") -> jax.Array:
    """Reconstruction `[..., d_in]` (float32) of latents `f: [..., d_sae]`."""
    return ops.matmul(f, params.W_dec, compute_dtype) + params.b_dec

  def loss(self, params: JumpReLUParams, x: jax.Array, *,
           settings: base.LossSettings, sparsity_coeff: jax.Array,
           dead: jax.Array) -> tuple[jax.Array, dict]:
    """Reconstruction + sparsity_coeff * sparsity (+ pre-activation loss).

    Args:
      x: `[batch, d_in]` normalised inputs.
      settings: static loss hyperparameters.
      sparsity_coeff: lambda at this step (scalar).
      dead: `[d_sae]` bool, latents that have not fired for a while.

    Returns:
      The loss and a dict of its parts and intermediates (`pre`, `f`, `x_hat`).
    """
    eps, ste, cdt = settings.bandwidth, settings.ste_to_input, settings.compute_dtype
    pre = self.pre_activations(params, x, compute_dtype=cdt)
    theta = params.theta()
    f = jumprelu(pre, theta, eps, ste_to_input=ste)
    x_hat = self.decode(params, f, compute_dtype=cdt)
    gates = step(pre, theta, eps, ste_to_input=ste)
    rec = losses.reconstruction(x, x_hat)
    if settings.sparsity == "step":
      sparsity = losses.step_l0(gates)
    elif settings.sparsity == "tanh":
      sparsity = losses.tanh_penalty(f, ops.decoder_norms(params.W_dec),
                                     settings.tanh_scale)
    elif settings.sparsity == "quadratic":
      sparsity = losses.quadratic_l0(gates, settings.target_l0)
    else:
      raise ValueError(f"unknown sparsity penalty {settings.sparsity!r};"
                       " use 'step', 'tanh' or 'quadratic'.")
    total = rec + sparsity_coeff * sparsity
    pre_act = jnp.zeros((), jnp.float32)
    if settings.pre_act_coeff > 0:
      mask = dead if settings.pre_act_dead_only else None
      pre_act = losses.pre_activation(pre, theta, ops.decoder_norms(params.W_dec), mask)
      total = total + settings.pre_act_coeff * pre_act
    aux = dict(reconstruction=rec, sparsity=sparsity, pre_act=pre_act,
               pre=pre, f=f, x_hat=x_hat, theta=theta)
    return total, aux

  def constrain(self, params: JumpReLUParams) -> JumpReLUParams:
    """Keeps a raw threshold non-negative (theta = 0 makes JumpReLU a ReLU)."""
    if params.log_threshold:
      return params
    return params.replace(threshold=jnp.maximum(params.threshold, 0.0))


family = base.register(JumpReLUFamily())
