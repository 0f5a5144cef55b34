"""The SAE object: a trained JumpReLU SAE that takes the LM's own activations.

    sae = jsae.load("layer_20/width_16k/average_l0_71")   # or jsae.SAE.from_run(workdir)
    f = sae.encode(x)                  # x: [..., d_in] raw LM units -> [..., d_sae]
    x_hat = sae.decode(f)              # [..., d_in]; sae(x) does both
    top = sae.encode_topk(x, k=64)     # top.values, top.indices: [..., 64]
    lm_site = sae.splice_fn(keep_error=True)   # x -> x_hat + stop_gradient(x - x_hat)

An `SAE` is a pytree (`flax.struct.dataclass`): its arrays are leaves, so
`jax.jit(lambda s, x: s.encode(x))(sae, x)` works and shardings on the arrays
apply; the provenance is static metadata (a canonical JSON string).

Inference semantics (Gemma Scope release, SAELens `JumpReLUSAE`):

    pi    = x @ W_enc + b_enc                      (no b_dec subtraction)
    f     = pi * 1[pi > max(theta, 0)]             (= mask * relu(pi) for theta >= 0)
    x_hat = f @ W_dec + b_dec

Folding (Gemma Scope App. A). Training divides inputs by one constant C
(E||x/C||^2 = 1) and subtracts b_dec before the encoder:

    pi = (x/C - b_dec) @ W_enc + b_enc,   x_hat/C = JumpReLU_theta(pi) @ W_dec + b_dec

`fold_pre_encoder_bias` then `fold_norm_scale` rewrite the parameters for raw x:

    b_enc' = C (b_enc - b_dec @ W_enc),   theta' = C theta,   b_dec' = C b_dec,   W unchanged

so pi' = C pi: the same latents fire, their values are C times the
training-time values, and x_hat' = C x_hat is the same reconstruction in raw units.

Decoder-norm folding (`fold_decoder_norms`), for decoders whose rows are not
unit norm: with n_i = ||W_dec[i]||, W_enc[:, i] *= n_i, b_enc_i *= n_i,
theta_i *= n_i, W_dec[i] /= n_i. The same latents fire, latent i becomes n_i
times larger (its value is then its contribution's norm in input space), and the
reconstruction is unchanged. Rows of norm 0 are left as they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jsae.saes.jumprelu import JumpReLUParams

P = jax.sharding.PartitionSpec


class TopK(NamedTuple):
  """The k largest latents of each row.

  Attributes:
    values: `[..., k]` float32, in decreasing order (zeros when fewer than k fire).
    indices: `[..., k]` int32 latent indices of `values`.
  """

  values: jax.Array
  indices: jax.Array


# ----------------------------------------------------------------------------- sharding


def _explicit(a) -> tuple[Any, tuple] | None:
  """(abstract mesh, full spec) when `a` is sharded over explicit mesh axes, else None.

  Meshes from `jax.make_mesh` have explicit axes: there, a contraction over a
  sharded dimension and `top_k` along one need their output sharding spelled out.
  """
  try:
    sharding = jax.typeof(a).sharding
  except (AttributeError, TypeError):
    return None
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or not mesh.explicit_axes:
    return None
  spec = tuple(sharding.spec) + (None,) * (a.ndim - len(sharding.spec))
  return mesh, spec


def _last_axis_replicated(a) -> jax.sharding.NamedSharding | None:
  """The sharding of `a` with its last axis unsharded, on explicit meshes only."""
  ex = _explicit(a)
  if ex is None:
    return None
  mesh, spec = ex
  return jax.sharding.NamedSharding(mesh, P(*spec[:-1], None))


# ----------------------------------------------------------------------------- folding


def raw_threshold(params: JumpReLUParams) -> JumpReLUParams:
  """The same SAE with a raw float32 threshold theta (converts a log threshold)."""
  return params.replace(threshold=params.theta().astype(jnp.float32), log_threshold=False)


def fold_pre_encoder_bias(params: JumpReLUParams) -> JumpReLUParams:
  """Folds the pre-encoder bias into b_enc: b_enc' = b_enc - b_dec @ W_enc.

  The result encodes `x @ W_enc + b_enc'`, equal to `(x - b_dec) @ W_enc + b_enc`.
  A no-op when `params.pre_encoder_bias` is False.
  """
  if not params.pre_encoder_bias:
    return params
  shift = jnp.matmul(params.b_dec.astype(jnp.float32), params.W_enc.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
  b_enc = (params.b_enc.astype(jnp.float32) - shift).astype(params.b_enc.dtype)
  return params.replace(b_enc=b_enc, pre_encoder_bias=False)


def fold_norm_scale(params: JumpReLUParams, norm_scale: float) -> JumpReLUParams:
  """Parameters for raw inputs x of an SAE trained on x / norm_scale.

  Scales b_enc, b_dec and theta by C = norm_scale (W unchanged); latents become
  C times larger and the reconstruction is in raw units. Works with or without
  a pre-encoder bias: (x - C b_dec) @ W + C b_enc = C ((x/C - b_dec) @ W + b_enc).

  Args:
    params: training-time parameters (raw or log threshold).
    norm_scale: C > 0, the constant the training inputs were divided by.
  """
  c = float(norm_scale)
  if not (np.isfinite(c) and c > 0):
    raise ValueError(f"norm_scale must be a finite number > 0; got {norm_scale!r}.")
  params = raw_threshold(params)
  return params.replace(b_enc=params.b_enc * c, b_dec=params.b_dec * c,
                        threshold=params.threshold * c)


def fold_decoder_norms(params: JumpReLUParams) -> JumpReLUParams:
  """Unit-norm decoder rows with the norms moved into the encoder (module docstring).

  The on/off pattern and the reconstruction are unchanged; latent i is scaled by
  n_i = ||W_dec[i]||. Rows of norm 0 keep n_i = 1.
  """
  params = raw_threshold(params)
  norms = jnp.sqrt(jnp.sum(jnp.square(params.W_dec.astype(jnp.float32)), axis=-1))
  n = jnp.where(norms > 0, norms, 1.0)  # [d_sae]
  def scale(a, s):
    return (a.astype(jnp.float32) * s).astype(a.dtype)
  return params.replace(
      W_enc=scale(params.W_enc, n[None, :]), b_enc=scale(params.b_enc, n),
      threshold=params.threshold * n, W_dec=scale(params.W_dec, 1.0 / n[:, None]))


def fold_training(params: JumpReLUParams, norm_scale: float, *,
                  fold_decoder_norm: bool = False) -> JumpReLUParams:
  """Training-time parameters -> raw-unit inference parameters (module docstring)."""
  params = fold_norm_scale(fold_pre_encoder_bias(params), norm_scale)
  return fold_decoder_norms(params) if fold_decoder_norm else params


# ----------------------------------------------------------------------------- provenance


def _json_default(obj):
  if isinstance(obj, (np.generic,)):
    return obj.item()
  if isinstance(obj, (np.ndarray, jax.Array)):
    return np.asarray(obj).tolist()
  if isinstance(obj, (Path, os.PathLike)):
    return os.fspath(obj)
  raise TypeError(f"{type(obj).__name__} {obj!r} is not JSON-serialisable")


def provenance_json(provenance: dict | None) -> str:
  """Canonical JSON text of a provenance dict (hashable static metadata)."""
  if provenance is None:
    return "{}"
  if not isinstance(provenance, dict):
    raise TypeError(f"provenance must be a dict; got {type(provenance).__name__}.")
  try:
    return json.dumps(provenance, sort_keys=True, default=_json_default)
  except (TypeError, ValueError) as e:
    raise TypeError(f"provenance must be JSON-serialisable: {e}.") from e


# ----------------------------------------------------------------------------- the SAE


@struct.dataclass
class SAE:
  """A JumpReLU SAE for raw LM activations (see the module docstring).

  Attributes:
    params: `JumpReLUParams` in raw activation units. `from_params` and
      `from_training` store them canonically (raw float32 threshold,
      `pre_encoder_bias=False`, the form every format saves); other forms still
      compute the same function.
    provenance_json: where the activations came from and how the SAE was made,
      as canonical JSON (static, so the pytree stays hashable); read it as
      `sae.provenance`.
  """

  params: JumpReLUParams
  provenance_json: str = struct.field(pytree_node=False, default="{}")

  # -- construction

  @classmethod
  def from_params(cls, params: JumpReLUParams, provenance: dict | None = None) -> "SAE":
    """An SAE from JumpReLU parameters already in raw units (folds b_dec, log theta)."""
    if not isinstance(params, JumpReLUParams):
      raise TypeError(f"SAE needs JumpReLUParams; got {type(params).__name__}.")
    params = fold_pre_encoder_bias(raw_threshold(params))
    return cls(params=params, provenance_json=provenance_json(provenance))

  @classmethod
  def from_training(cls, params: JumpReLUParams, norm_scale: float,
                    provenance: dict | None = None, *,
                    fold_decoder_norm: bool = False) -> "SAE":
    """An SAE for raw activations from training-time parameters.

    Args:
      params: the trainer's JumpReLU parameters (inputs divided by C).
      norm_scale: C, the data's normalisation constant.
      provenance: JSON-able dict; `norm_scale` is recorded in it.
      fold_decoder_norm: also move decoder row norms into the encoder.
    """
    prov = dict(provenance or {})
    prov.setdefault("norm_scale", float(norm_scale))
    prov["units"] = "raw"
    if fold_decoder_norm:
      prov["decoder_norm_folded"] = True
    folded = fold_training(params, norm_scale, fold_decoder_norm=fold_decoder_norm)
    return cls.from_params(folded, prov)

  @classmethod
  def from_run(cls, workdir: str | os.PathLike, *, step: int | None = None,
               fold_decoder_norm: bool | None = None) -> "SAE":
    """The SAE of a jsae run directory's latest (or `step`'s) checkpoint, folded.

    Args:
      workdir: a directory `jsae train` wrote (config.json, checkpoints/).
      step: checkpoint step; default the latest finished one.
      fold_decoder_norm: fold decoder row norms; default True exactly when the
        run did not keep decoder rows at unit norm (`config.optim.decoder_unit_norm`).

    Raises:
      FileNotFoundError: no checkpoints/ folder or no finished checkpoint in it.
    """
    from jsae import interop  # local: reading a run pulls in Orbax and the trainer
    params, meta, provenance = interop.read_run(workdir, step=step)
    if fold_decoder_norm is None:
      fold_decoder_norm = not bool(meta["config"].get("optim", {}).get(
          "decoder_unit_norm", True))
    return cls.from_training(params, meta["norm_scale"], provenance,
                             fold_decoder_norm=fold_decoder_norm)

  # -- metadata

  @property
  def d_in(self) -> int:
    """Input width."""
    return self.params.W_enc.shape[-2]

  @property
  def d_sae(self) -> int:
    """Number of latents."""
    return self.params.W_enc.shape[-1]

  @property
  def dtype(self) -> jnp.dtype:
    """The weights' dtype (the threshold is always float32)."""
    return jnp.dtype(self.params.W_enc.dtype)

  @property
  def provenance(self) -> dict:
    """A fresh copy of the provenance dict."""
    return json.loads(self.provenance_json)

  @property
  def threshold(self) -> jax.Array:
    """theta `[d_sae]` float32 in raw activation units."""
    return self.params.theta().astype(jnp.float32)

  def with_provenance(self, **updates: Any) -> "SAE":
    """The same SAE with provenance entries added or replaced."""
    return self.replace(provenance_json=provenance_json({**self.provenance, **updates}))

  def __repr__(self) -> str:
    p = self.provenance
    what = ", ".join(f"{k}={p[k]!r}" for k in ("model", "hook_site", "layer") if p.get(k)
                     not in (None, ""))
    return (f"SAE(d_in={self.d_in}, d_sae={self.d_sae}, dtype={self.dtype.name}"
            + (f", {what}" if what else "") + ")")

  # -- inference

  def _check_input(self, x: jax.Array) -> None:
    if x.shape[-1] != self.d_in:
      raise ValueError(f"input has {x.shape[-1]} features (shape {tuple(x.shape)}) but"
                       f" the SAE expects d_in={self.d_in}.")

  def pre_activations(self, x: jax.Array) -> jax.Array:
    """pi = x @ W_enc + b_enc: `[..., d_in]` -> `[..., d_sae]` float32.

    The matmul runs in the weights' dtype with float32 accumulation.
    """
    self._check_input(x)
    w = self.params.W_enc
    if self.params.pre_encoder_bias:  # only for SAEs built without from_params
      x = x.astype(jnp.float32) - self.params.b_dec.astype(jnp.float32)
    pre = jnp.matmul(x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    return pre + self.params.b_enc.astype(jnp.float32)

  def encode(self, x: jax.Array) -> jax.Array:
    """Latents `[..., d_sae]` float32 of raw activations `x: [..., d_in]`.

    The threshold comparison is in float32 whatever the weights' dtype.
    """
    pre = self.pre_activations(x)
    theta = jnp.maximum(self.threshold, 0.0)
    return jnp.where(pre > theta, pre, 0.0)

  def decode(self, f: jax.Array) -> jax.Array:
    """Reconstruction `[..., d_in]` float32 of latents `f: [..., d_sae]`."""
    if f.shape[-1] != self.d_sae:
      raise ValueError(f"latents have {f.shape[-1]} entries (shape {tuple(f.shape)}) but"
                       f" the SAE has d_sae={self.d_sae}.")
    w = self.params.W_dec
    out = jnp.matmul(f.astype(w.dtype), w, preferred_element_type=jnp.float32,
                     out_sharding=_last_axis_replicated(f))
    return out + self.params.b_dec.astype(jnp.float32)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Reconstruction `[..., d_in]` float32 of `x: [..., d_in]`."""
    return self.decode(self.encode(x))

  def encode_topk(self, x: jax.Array, k: int, *, approx: bool = False,
                  recall_target: float = 0.95) -> TopK:
    """The k largest latents of each row of `x: [..., d_in]` as (values, indices) `[..., k]`.

    Args:
      x: raw activations.
      k: latents kept per row (static under jit).
      approx: use `jax.lax.approx_max_k` (fast on TPU; exact elsewhere).
      recall_target: expected recall of `approx_max_k`.

    Rows with fewer than k active latents are padded with zero values (their
    indices are then arbitrary inactive latents).
    """
    if not (isinstance(k, (int, np.integer)) and 0 < k <= self.d_sae):
      raise ValueError(f"k must be an int in [1, d_sae={self.d_sae}]; got {k!r}.")
    f = self.encode(x)
    gathered = _last_axis_replicated(f)
    if gathered is not None:  # top_k runs along an unsharded axis
      f = jax.sharding.reshard(f, gathered)
    if approx:
      values, indices = jax.lax.approx_max_k(f, int(k), recall_target=recall_target)
    else:
      values, indices = jax.lax.top_k(f, int(k))
    return TopK(values=values, indices=indices.astype(jnp.int32))

  def decode_topk(self, top: TopK) -> jax.Array:
    """Reconstruction `[..., d_in]` float32 from sparse latents (`encode_topk`'s output).

    Gathers the k decoder rows of each row instead of a dense `[..., d_sae]` matmul.
    """
    w, idx = self.params.W_dec, top.indices
    ex_w, ex_i = _explicit(w), _explicit(idx)
    if ex_w is None and ex_i is None:
      rows = jnp.take(w, idx, axis=0)  # [..., k, d_in]
    else:  # explicit mesh: rows follow the indices' sharding, d_in unsharded
      mesh = (ex_i or ex_w)[0]
      spec = ex_i[1] if ex_i else (None,) * idx.ndim
      rows = w.at[idx].get(out_sharding=jax.sharding.NamedSharding(mesh, P(*spec, None)))
    out = jnp.einsum("...k,...kd->...d", top.values.astype(rows.dtype), rows,
                     preferred_element_type=jnp.float32)
    return out + self.params.b_dec.astype(jnp.float32)

  # -- splicing into a user's model

  def reconstruct_with_error(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x_hat, error) with error = x - x_hat, both `[..., d_in]` in x's dtype.

    Computed in float32, then cast; x_hat + error == x up to that cast.
    """
    x_hat = self(x)
    error = x.astype(jnp.float32) - x_hat
    return x_hat.astype(x.dtype), error.astype(x.dtype)

  def splice_fn(self, keep_error: bool = False) -> Callable[[jax.Array], jax.Array]:
    """A function to put at a hook site of the user's model.

    Args:
      keep_error: if False the site's activation is replaced by the SAE's
        reconstruction x_hat (fidelity / delta-loss evals). If True the output
        is x_hat + stop_gradient(x - x_hat): the forward pass is unchanged,
        gradients flow only through the SAE's latents (attribution).

    Returns:
      `fn(x: [..., d_in]) -> [..., d_in]` in x's dtype; jit-able.
    """
    def splice(x):
      x_hat = self(x)
      if keep_error:
        x_hat = x_hat + jax.lax.stop_gradient(x.astype(jnp.float32) - x_hat)
      return x_hat.astype(x.dtype)
    return splice

  # -- dtype, sharding, folding

  def astype(self, dtype) -> "SAE":
    """The SAE with weights and biases in `dtype` (e.g. bfloat16); theta stays float32."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"dtype must be a floating type; got {dtype}.")
    p = self.params
    params = p.replace(W_enc=p.W_enc.astype(dtype), b_enc=p.b_enc.astype(dtype),
                       W_dec=p.W_dec.astype(dtype), b_dec=p.b_dec.astype(dtype),
                       threshold=p.threshold.astype(jnp.float32))
    return self.replace(params=params)

  def fold_decoder_norms(self) -> "SAE":
    """The SAE with unit-norm decoder rows (latents rescaled; see the module docstring)."""
    return self.replace(params=fold_decoder_norms(self.params)).with_provenance(
        decoder_norm_folded=True)

  def partition_specs(self, model_axis: str = "model") -> "SAE":
    """An SAE-shaped pytree of PartitionSpecs: latents sharded over `model_axis`.

    W_enc `P(None, model)`, W_dec `P(model, None)`, b_enc and threshold
    `P(model)`, b_dec replicated (the jsae convention).
    """
    specs = self.params.replace(W_enc=P(None, model_axis), b_enc=P(model_axis),
                                W_dec=P(model_axis, None), b_dec=P(),
                                threshold=P(model_axis))
    return self.replace(params=specs)

  def shard(self, mesh: jax.sharding.Mesh, model_axis: str = "model") -> "SAE":
    """The SAE placed on `mesh` with latents sharded over `model_axis`."""
    if model_axis not in mesh.axis_names:
      raise ValueError(f"mesh has axes {mesh.axis_names}; no {model_axis!r} axis to"
                       " shard the latents over.")
    size = mesh.shape[model_axis]
    if self.d_sae % size:
      raise ValueError(f"d_sae={self.d_sae} is not divisible by the {model_axis!r} axis"
                       f" size {size}.")
    shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s),
                             self.partition_specs(model_axis),
                             is_leaf=lambda s: isinstance(s, P))
    return jax.device_put(self, shardings)
