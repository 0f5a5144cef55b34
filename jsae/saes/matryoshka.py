"""Matryoshka BatchTopK SAE family (Bussmann, Nabeshima, Karvonen, Nanda 2025).

One BatchTopK over all latents; the latents form nested groups (prefixes of
widths m_1 < ... < m_G = d_sae), and every prefix must reconstruct x alone:

  x_hat_g = f[:, :m_g] @ W_dec[:m_g] + b_dec
  loss    = sum_g ||x - x_hat_g||^2 + aux_coeff * AuxK (on the full residual)

`group_loss='sum'` is the paper's and SAELens's sum (weight 1 per level);
'mean' divides by G (dictionary_learning's default weights). The prefixes are
decoded as running sums of group slices, so all levels together cost one
decoder matmul. Inference: JumpReLU with the running BatchTopK threshold; the
group sizes survive only as metadata.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jsae import losses, ops
from jsae.saes import base, shared
from jsae.saes.base import Field
from jsae.saes.shared import LinearFamily
from jsae.saes.topk import BatchTopKFamily, BatchTopKParams, TopKSettings


@struct.dataclass
class MatryoshkaParams(BatchTopKParams):
  """Parameters of a Matryoshka BatchTopK SAE: as `BatchTopKParams`, plus the static group sizes.

  Attributes:
    group_sizes: sizes of the nested latent groups, in order (static; sum d_sae).
  """

  group_sizes: tuple = struct.field(pytree_node=False, default=())


@dataclasses.dataclass(frozen=True)
class MatryoshkaSettings(TopKSettings):
  """TopK settings plus the group loss.

  Attributes:
    group_loss: 'sum' (paper, SAELens) or 'mean' (dictionary_learning).
  """

  group_loss: str = "sum"


def default_group_sizes(d_sae: int) -> tuple[int, ...]:
  """d_sae split as 1/16, 1/16, 1/8, 1/4, 1/2 (Bussmann's repository), rest to the last."""
  sizes = [d_sae // 16, d_sae // 16, d_sae // 8, d_sae // 4]
  sizes = [s for s in sizes if s > 0]
  return tuple(sizes + [d_sae - sum(sizes)])


def group_sizes_of(config) -> tuple[int, ...]:
  """The configured group sizes (the default split when the field is empty)."""
  sizes = tuple(int(s) for s in (config.sae.group_sizes or ()))
  return sizes or default_group_sizes(config.sae.d_sae)


class MatryoshkaFamily(BatchTopKFamily):
  """Pure functions of the Matryoshka BatchTopK family (see the module docstring)."""

  name = "matryoshka"
  params_type = MatryoshkaParams
  fields = {
      # No sparse step: the nested prefix decodes are dense (`prefix_losses`).
      "sae": {**{k: v for k, v in BatchTopKFamily.fields["sae"].items()
                 if k != "sparse_capacity"},
              "group_sizes": Field((), "sizes of the nested latent groups, summing to d_sae"
                                   " (empty: d_sae/16, /16, /8, /4, /2)")},
      "loss": {**shared.AUX_FIELDS,
               "group_loss": Field("sum", "'sum' of the levels' losses (paper, SAELens) or"
                                   " their 'mean' (dictionary_learning)")},
  }

  def _check_sparse_capacity(self, config) -> None:
    del config  # the field does not exist here

  def check_values(self, config) -> None:
    super().check_values(config)
    raw = tuple(config.sae.group_sizes or ())
    if not all(isinstance(s, int) and s > 0 for s in raw):
      raise base.FamilyConfigError(
          f"config.sae.group_sizes: {raw!r} must be positive integers, e.g."
          " --config.sae.group_sizes='(256, 256, 512)'.")
    sizes = group_sizes_of(config)
    if sum(sizes) != config.sae.d_sae:
      raise base.FamilyConfigError(
          f"config.sae.group_sizes: {sizes} sums to {sum(sizes)}, not d_sae ="
          f" {config.sae.d_sae}; make the sizes add up to d_sae (or leave it empty for"
          " the default split).")
    if config.loss.group_loss not in ("sum", "mean"):
      raise base.FamilyConfigError(f"config.loss.group_loss: {config.loss.group_loss!r}"
                                   " is not 'sum' or 'mean'.")

  def settings(self, config) -> MatryoshkaSettings:
    s, l = config.sae, config.loss
    return MatryoshkaSettings(k_aux=int(s.k_aux), aux_coeff=float(l.aux_coeff),
                              aux_form=l.aux_form, threshold_ema=float(s.threshold_ema),
                              compute_dtype=s.compute_dtype, group_loss=l.group_loss)

  def init_kwargs(self, config) -> dict:
    return dict(super().init_kwargs(config), group_sizes=group_sizes_of(config))

  def init(self, key: jax.Array, *, d_in: int, d_sae: int, k: int = 32,
           pre_encoder_bias: bool = True, group_sizes: tuple = (), d_out: int | None = None,
           skip: bool = False):
    """As BatchTopK; `group_sizes` (default split when empty) must sum to d_sae."""
    sizes = tuple(int(s) for s in group_sizes) or default_group_sizes(d_sae)
    if sum(sizes) != d_sae or min(sizes) <= 0:
      raise ValueError(f"group_sizes {sizes} must be positive and sum to d_sae={d_sae}.")
    if not (isinstance(k, int) and 0 < k <= d_sae):
      raise ValueError(f"k must be an integer in [1, d_sae={d_sae}]; got {k!r}.")
    return LinearFamily.init(self, key, d_in=d_in, d_sae=d_sae,
                             pre_encoder_bias=pre_encoder_bias, d_out=d_out, skip=skip, k=k,
                             group_sizes=sizes)

  def loss(self, params: MatryoshkaParams, state, x: jax.Array, *,
           settings: MatryoshkaSettings, hparams: dict, dead: jax.Array, step: jax.Array,
           target: jax.Array | None = None):
    """Sum (or mean) over the nested prefixes of ||y - y_hat_g||^2, plus AuxK (y = x for
    an SAE, `target` for a transcoder, whose skip is part of every prefix's output)."""
    del step
    y = x if target is None else target
    cdt = settings.compute_dtype
    pre = self.pre_activations(params, x, compute_dtype=cdt)
    mask, kept = self.select(params, pre, hparams["k"], settings)
    f = jnp.where(mask, jax.nn.relu(pre), 0.0)
    level_losses, x_hat = prefix_losses(y, f, params.W_dec,
                                        params.b_dec + base.skip(params, x, cdt),
                                        params.group_sizes, cdt)
    rec = level_losses[-1]
    total = sum(level_losses)
    if settings.group_loss == "mean":
      total = total / len(level_losses)
    aux = shared.aux_loss(pre, y, x_hat, params.W_dec, dead, settings)
    parts = dict(reconstruction=rec, matryoshka=total, aux=aux,
                 **{f"reconstruction_level_{i}": v for i, v in enumerate(level_losses[:-1])})
    state = self.next_state(state, kept, settings)
    return total + settings.aux_coeff * aux, base.Output(f=f, x_hat=x_hat, state=state,
                                                         parts=parts, extras={})


def prefix_losses(x, f, W_dec, b_dec, group_sizes, compute_dtype):
  """([||x - x_hat_g||^2 batch mean for each level g], x_hat of the full width).

  x: the target `[batch, d_out]`; b_dec: what every level's output starts from
  (`[d_out]`, or `[batch, d_out]` with a transcoder's skip). x_hat_g = b_dec + sum
  of the group slices' decodes up to g: one decoder matmul's worth of FLOPs for all
  levels.
  """
  out, x_hat, start = [], b_dec, 0
  for size in group_sizes:
    part = ops.matmul(f[:, start:start + size], W_dec[start:start + size], compute_dtype)
    x_hat = x_hat + part
    out.append(losses.reconstruction(x, x_hat))
    start += size
  return out, x_hat


family = base.register(MatryoshkaFamily())
