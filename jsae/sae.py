"""The SAE object: a trained SAE of any family that takes the LM's own activations.

    sae = jsae.load("layer_20/width_16k/average_l0_71")   # or a training run's workdir
    f = sae.encode(x)                  # x: [..., d_in] raw LM units -> [..., d_sae]
    x_hat = sae.decode(f)              # [..., d_in]; sae(x) does both
    top = sae.encode_topk(x, k=64)     # top.values, top.indices: [..., 64]
    lm_site = sae.splice_fn(keep_error=True)   # x -> x_hat + stop_gradient(x - x_hat)

An `SAE` is a pytree: its arrays are leaves, so
`jax.jit(lambda s, x: s.encode(x))(sae, x)` works and shardings on the arrays
apply. The family is static metadata; SAEs of one family and shape share one
compiled function, and `stack` puts several on a leading axis for `vmap`:

    batch = jsae.stack([jsae.load(p) for p in paths])
    f = jax.vmap(lambda s: s.encode(x))(batch)       # [n, ..., d_sae]

The provenance (where the activations came from, how the SAE was made) is
kept beside the tree, not in it: it would otherwise split compiled functions
per SAE and stop stacking. It belongs to the object `load` returns and to the
SAEs its methods make (`astype`, `shard`, ...); an SAE rebuilt by a JAX
transformation (a `jit` output, `jax.tree.map`, `jax.device_put`) has none.

`sae.family` is the *inference* family, one of

    jumprelu  f = pi * 1[pi > max(theta, 0)]       (JumpReLU; also BatchTopK,
                                                    Matryoshka and Gated SAEs)
    relu      f = ReLU(pi)
    topk      f = ReLU(pi) on each row's k largest pi
    with pi = x @ W_enc + b_enc,   x_hat = f @ W_dec + b_dec

The training family (e.g. 'batchtopk') is recorded in the provenance.

Folding (Gemma Scope App. A). Training divides inputs by one constant C
(E||x/C||^2 = 1) and subtracts b_dec before the encoder:

    pi = (x/C - b_dec) @ W_enc + b_enc,   x_hat/C = f(pi) @ W_dec + b_dec

Each family's `fold` rewrites the parameters for raw x:

    b_enc' = C (b_enc - b_dec @ W_enc),   theta' = C theta,   b_dec' = C b_dec,   W unchanged

so pi' = C pi: the same latents fire, their values are C times the
training-time values, and x_hat' = C x_hat is the same reconstruction in raw units.

Decoder-norm folding (`fold_decoder_norms`), for decoders whose rows are not
unit norm: with n_i = ||W_dec[i]||, W_enc[:, i] *= n_i, b_enc_i *= n_i,
theta_i *= n_i, W_dec[i] /= n_i. The same latents fire, latent i becomes n_i
times larger (its value is then its contribution's norm in input space), and the
reconstruction is unchanged. Rows of norm 0 are left as they are. TopK refuses
it (rescaling changes which latents win).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsae import saes
from jsae.saes import base as saes_base

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


def canonical(params):
  """The inference layout every format saves (the family's: pre-encoder bias folded, ...)."""
  return saes.family_of(params).canonical(params)


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


@dataclasses.dataclass(frozen=True, eq=False)
class SAE:
  """An SAE of any inference family for raw LM activations (see the module docstring).

  Attributes:
    params: the inference family's parameters in raw activation units.
      `from_params` and `from_training` store them canonically (raw float32
      threshold, `pre_encoder_bias=False`, the form every format saves).
    family: the inference family's name (static; `jsae.saes.inference_names()`).
    provenance_json: where the activations came from and how the SAE was made,
      as canonical JSON, outside the pytree (module docstring); read it as
      `sae.provenance`.
    transcoder: (static) its decoder predicts another site than it reads (an MLP's
      output from its input): `sae(x)` is that prediction, with the affine skip
      `x @ W_skip` of a skip transcoder; the provenance names both sites.
  """

  params: Any
  family: str
  provenance_json: str = "{}"
  transcoder: bool = False

  def replace(self, **changes) -> "SAE":
    """A copy with the named attributes replaced (the provenance kept unless named)."""
    return dataclasses.replace(self, **changes)

  # -- construction

  @classmethod
  def from_params(cls, params, provenance: dict | None = None, *,
                  transcoder: bool | None = None) -> "SAE":
    """An SAE from an inference family's parameters already in raw units (folds b_dec, log theta).

    `transcoder`: whether the decoder predicts another site (default: when the
    params have a skip or their output width is not their input's).
    """
    family = saes.family_of(params)
    if family.name not in saes.inference_names():
      raise TypeError(
          f"{type(params).__name__} are training parameters of family {family.name!r};"
          f" an SAE holds {', '.join(saes.inference_names())} parameters. Use"
          " SAE.from_training(params, norm_scale, state=...) to fold them.")
    if transcoder is None:
      transcoder = (getattr(params, "W_skip", None) is not None
                    or params.W_dec.shape[-1] != params.W_enc.shape[-2])
    return cls(params=canonical(params), family=family.name,
               provenance_json=provenance_json(provenance), transcoder=bool(transcoder))

  @classmethod
  def from_training(cls, params, norm_scale, provenance: dict | None = None, *,
                    state: Any = None, fold_decoder_norm: bool = False,
                    transcoder: bool | None = None) -> "SAE":
    """An SAE for raw activations from any family's training-time parameters.

    Args:
      params: the trainer's parameters (inputs divided by C).
      norm_scale: C, the data's normalisation constant; a transcoder's
        (C of its input, C of its output).
      provenance: JSON-able dict; `norm_scale` and the training family are recorded.
      state: the family state (BatchTopK / Matryoshka need their running threshold).
      fold_decoder_norm: also move decoder row norms into the encoder.
      transcoder: see `from_params`.
    """
    family = saes.family_of(params)
    c_in, c_out = saes_base.norm_scales(norm_scale)
    prov = dict(provenance or {})
    prov.setdefault("norm_scale", c_in)
    if isinstance(norm_scale, (tuple, list)):
      prov.setdefault("target_norm_scale", c_out)
    prov.setdefault("training_family", family.name)
    prov["units"] = "raw"
    name, folded = family.fold(params, state, norm_scale)
    if fold_decoder_norm:
      folded = saes.get(name).fold_decoder_norms(folded)
      prov["decoder_norm_folded"] = True
    return cls.from_params(folded, prov, transcoder=transcoder)

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
  def d_out(self) -> int:
    """Output width (d_in for an SAE)."""
    return self.params.W_dec.shape[-1]

  @property
  def dtype(self) -> jnp.dtype:
    """The weights' dtype (a threshold is always float32)."""
    return jnp.dtype(self.params.W_enc.dtype)

  @property
  def provenance(self) -> dict:
    """A fresh copy of the provenance dict."""
    return json.loads(self.provenance_json)

  @property
  def threshold(self) -> jax.Array:
    """theta `[d_sae]` float32 in raw activation units (families with a threshold)."""
    return saes.get(self.family).threshold_of(self.params)

  @property
  def k(self) -> int:
    """Latents kept per row (families with a fixed k)."""
    return saes.get(self.family).k_of(self.params)

  def with_provenance(self, **updates: Any) -> "SAE":
    """The same SAE with provenance entries added or replaced."""
    return self.replace(provenance_json=provenance_json({**self.provenance, **updates}))

  def __repr__(self) -> str:
    p = self.provenance
    what = ", ".join(f"{k}={p[k]!r}" for k in ("model", "hook_site", "layer") if p.get(k)
                     not in (None, ""))
    trained = p.get("training_family")
    fam = self.family + (f" (trained as {trained})" if trained not in (None, self.family)
                         else "")
    kind = "Transcoder" if self.transcoder else "SAE"
    out = (f", d_out={self.d_out}" + (", skip" if self.params.W_skip is not None else "")
           if self.transcoder else "")
    return (f"{kind}({fam}, d_in={self.d_in}, d_sae={self.d_sae}{out},"
            f" dtype={self.dtype.name}" + (f", {what}" if what else "") + ")")

  # -- inference

  def pre_activations(self, x: jax.Array) -> jax.Array:
    """pi = x @ W_enc + b_enc: `[..., d_in]` -> `[..., d_sae]` float32.

    The matmul runs in the weights' dtype with float32 accumulation.
    """
    return saes_base.plain_pre_activations(self.params, x)

  def encode(self, x: jax.Array) -> jax.Array:
    """Latents `[..., d_sae]` float32 of raw activations `x: [..., d_in]`.

    A threshold comparison is in float32 whatever the weights' dtype.
    """
    return saes.get(self.family).infer(self.params, x)

  def decode(self, f: jax.Array) -> jax.Array:
    """The latents' output `f @ W_dec + b_dec`: `[..., d_out]` float32 of `f: [..., d_sae]`
    (an SAE's reconstruction; a skip transcoder's output adds `x @ W_skip`: `predict`)."""
    if f.shape[-1] != self.d_sae:
      raise ValueError(f"latents have {f.shape[-1]} entries (shape {tuple(f.shape)}) but"
                       f" the SAE has d_sae={self.d_sae}.")
    w = self.params.W_dec
    out = jnp.matmul(f.astype(w.dtype), w, preferred_element_type=jnp.float32,
                     out_sharding=_last_axis_replicated(f))
    return out + self.params.b_dec.astype(jnp.float32)

  def predict(self, f: jax.Array, x: jax.Array) -> jax.Array:
    """The output `[..., d_out]` float32 of latents `f` (of input `x`): `decode(f)` plus a
    skip transcoder's `x @ W_skip`."""
    return self.decode(f) + saes_base.plain_skip(self.params, x)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Reconstruction (a transcoder's prediction) `[..., d_out]` float32 of `x: [..., d_in]`."""
    return self.predict(self.encode(x), x)

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

    Computed in float32, then cast; x_hat + error == x up to that cast. An SAE's
    only: a transcoder's error is against its target, which `x` is not.
    """
    self._refuse_transcoder("reconstruct_with_error")
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
      `fn(x: [..., d_in]) -> [..., d_in]` in x's dtype; jit-able. For a transcoder
      (keep_error=False only) `fn(x: [..., d_in]) -> [..., d_out]`: its prediction of
      the target site, to put in place of the MLP (`jsae.lm.gemma.forward`'s `transcode`).
    """
    if keep_error:
      self._refuse_transcoder("splice_fn(keep_error=True)")

    def splice(x):
      x_hat = self(x)
      if keep_error:
        x_hat = x_hat + jax.lax.stop_gradient(x.astype(jnp.float32) - x_hat)
      return x_hat.astype(x.dtype)
    return splice

  def _refuse_transcoder(self, what: str) -> None:
    if self.transcoder:
      raise ValueError(f"{what} is for SAEs: a transcoder predicts another site, so its"
                       " error is y - sae(x) with the target y (read both sites).")

  # -- dtype, sharding, folding

  def astype(self, dtype) -> "SAE":
    """The SAE with weights and biases in `dtype` (e.g. bfloat16); a threshold stays float32."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"dtype must be a floating type; got {dtype}.")
    cast = {name: getattr(self.params, name).astype(
        jnp.float32 if name == "threshold" else dtype)
            for name in saes_base.array_fields(self.params)
            if getattr(self.params, name) is not None}
    return self.replace(params=self.params.replace(**cast))

  def fold_decoder_norms(self) -> "SAE":
    """The SAE with unit-norm decoder rows (latents rescaled; see the module docstring)."""
    folded = saes.get(self.family).fold_decoder_norms(self.params)
    return self.replace(params=folded).with_provenance(decoder_norm_folded=True)

  def partition_specs(self, model_axis: str = "model") -> "SAE":
    """An SAE-shaped pytree of PartitionSpecs: latents sharded over `model_axis`.

    The family's table: W_enc `P(None, model)`, W_dec `P(model, None)`, per-latent
    vectors (b_enc, threshold) `P(model)`, b_dec replicated.
    """
    specs = saes.get(self.family).param_specs(self.params)
    if model_axis != "model":
      specs = jax.tree.map(
          lambda s: P(*(model_axis if a == "model" else a for a in s)), specs,
          is_leaf=lambda s: isinstance(s, P))
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
    return self.replace(params=jax.device_put(self, shardings).params)


def _flatten(sae: SAE):
  return (sae.params,), (sae.family, sae.transcoder)


def _flatten_with_keys(sae: SAE):
  return ((jax.tree_util.GetAttrKey("params"), sae.params),), (sae.family, sae.transcoder)


def _unflatten(static: tuple, children) -> SAE:
  # The provenance is not part of the tree (module docstring): rebuilt SAEs have none.
  family, transcoder = static
  return SAE(params=children[0], family=family, transcoder=transcoder)


jax.tree_util.register_pytree_with_keys(SAE, _flatten_with_keys, _unflatten, _flatten)


# ----------------------------------------------------------------------------- batches


def stack(members: Sequence[SAE]) -> SAE:
  """SAEs of one family and shape on a leading `[n]` axis, for `jax.vmap`.

  `jax.vmap(lambda s: s.encode(x))(stack(members))` gives `[n, ..., d_sae]`, the
  members' encodings. The result's provenance lists the members' (`unstack`
  gives them back).

  Raises:
    ValueError: no SAEs, or SAEs of other families, static settings or shapes.
  """
  members = list(members)
  if not members:
    raise ValueError("stack needs at least one SAE.")
  first = members[0]
  for i, m in enumerate(members[1:], 1):
    if not isinstance(m, SAE):
      raise TypeError(f"stack takes jsae.SAE objects; item {i} is a {type(m).__name__}.")
    if jax.tree.structure(m) != jax.tree.structure(first):
      raise ValueError(
          f"SAE {i} ({m!r}) is not of SAE 0's family and settings ({first!r}); stack"
          " SAEs of one family and one static layout (e.g. TopK SAEs of one k).")
    shapes = [(a.shape, a.dtype) for a in jax.tree.leaves(m)]
    if shapes != [(a.shape, a.dtype) for a in jax.tree.leaves(first)]:
      raise ValueError(f"SAE {i} ({m!r}) has other shapes or dtypes than SAE 0"
                       f" ({first!r}); stack SAEs of one d_in, d_sae and dtype"
                       " (SAE.astype converts).")
  params = jax.tree.map(lambda *xs: jnp.stack(xs), *[m.params for m in members])
  return SAE(params=params, family=first.family, transcoder=first.transcoder,
             provenance_json=provenance_json({"stacked": [m.provenance for m in members]}))


def unstack(batch: SAE) -> list[SAE]:
  """The SAEs of a `stack`ed batch, each with its provenance."""
  n = jax.tree.leaves(batch.params)[0].shape[0]
  provenances = batch.provenance.get("stacked") or [{}] * n
  return [SAE(params=jax.tree.map(lambda a, i=i: a[i], batch.params), family=batch.family,
              transcoder=batch.transcoder, provenance_json=provenance_json(provenances[i]))
          for i in range(n)]
