"""The family contract every SAE family implements, and the registry by name.

A family is an object of pure functions over its own parameter pytree. The
trainer, the sharding rules, the SAE object and the formats ask the family and
know nothing of any family's specifics:

  fields                 its config fields (`Field`s under config.sae / config.loss)
  knob, knob_symbol      the field a sparsity sweep varies and how reports write it
  settings(config)       static, hashable hyperparameters (shapes, choices)
  hyperparams(config)    traced scalars, the sparsity knob among them, so that a
                         sweep can `vmap` over them
  init_kwargs(config)    `init`'s options from a config
  init(key, d_in=, d_sae=, ...)        fresh float32 parameters
  init_state(d_sae, settings)          the family's slot in TrainState (a
                                       running threshold, ...); `NoState()` if none
  loss(params, state, x, settings=, hparams=, dead=, step=, target=) -> (loss, Output)
  decode / predict                     f -> f W_dec + b_dec; plus a skip's x W_skip
  metrics(output, settings)            family scalars, on logging steps only
  constrain(params, settings)          back onto the constraint set after an update
  step_capacity / with_step_capacity   the sparse train step's capacity in settings
  adapts_capacity(config)              whether the trainer re-picks that capacity
  group_config(configs)                the one compiled config of a sweep group
  member_params(params, config)        a sweep member's params out of its group's
  param_specs / state_specs            PartitionSpecs per field: a field without
                                       one is an error, never silently replicated
  fold(params, state, norm_scale)      training form -> (inference family, params)
                                       in raw LM units; `canonical` the saved layout
  encode / decode                      the training-form forward (functional API)
  auto_fields / auto_values(pre, n)    what config.recipe='auto' derives for the
                                       family from its fresh pre-activations (jsae.recipe)

A transcoder is any family with another target (`d_out`, `target`, and with
`skip` an affine `W_skip [d_in, d_out]` in its params, None for SAEs).

Inference families (those an exported SAE can be: `inference_names()`) also
provide `infer(params, x)`, the forward in plain jnp ops (any autodiff mode),
`fold_decoder_norms` (unless `folds_decoder_norms` is False) and the
family-specific properties of the SAE object (`threshold_of`, `k_of`).
Nothing outside `jsae/saes/` names a family or a family's field except the
formats' own mappings to their architecture names.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct

from jsae import ops

Params = Any
P = jax.sharding.PartitionSpec

# Config fields every family shares (configs/default.py documents them).
COMMON_FIELDS = {
    "sae": ("family", "d_in", "d_sae", "pre_encoder_bias", "init_b_dec",
            "init_b_dec_batches", "compute_dtype", "target_site", "d_out", "skip"),
    "loss": ("dead_window_steps",),
}

# The latent-sharding layout of the parameters every family has; a transcoder's affine
# skip W_skip [d_in, d_out] (latent-free) is replicated.
LINEAR_SPECS = {"W_enc": P(None, "model"), "b_enc": P("model"),
                "W_dec": P("model", None), "b_dec": P(), "W_skip": P()}


class FamilyConfigError(ValueError):
  """A family's config field is missing, unknown or out of range (names field and fix)."""


class Field(NamedTuple):
  """One config field a family owns.

  Attributes:
    default: its default value (also fixes its type).
    doc: one line for configs and the README.
    traced: passed to the step as a traced scalar (a sweepable knob).
    init_only: read only at initialisation, so it may change on resume.
    resumable: changes how a step is computed, not its result (a sparse
      step's capacity), so it may change on resume.
  """

  default: Any
  doc: str
  traced: bool = False
  init_only: bool = False
  resumable: bool = False


@struct.dataclass
class NoState:
  """The family state of families that keep none."""


@struct.dataclass
class Output:
  """What a family's loss returns beside the scalar loss.

  Attributes:
    f: `[batch, d_sae]` latents (training forward).
    x_hat: `[batch, d_in]` reconstruction, normalised units.
    state: the family state after this batch.
    parts: {name: scalar} loss parts, logged every logging step.
    extras: family intermediates its `metrics` reads (e.g. pre-activations).
    fired: `[d_sae]` bool, latents non-zero in some row of the batch; None: the
      trainer derives it from `f` (a family whose sparse step never needs the
      dense `f` gives it, so that `f` is built only on logging steps).
  """

  f: jax.Array
  x_hat: jax.Array
  state: Any
  parts: dict
  extras: dict
  fired: Any = None


class Family:
  """Base class: shared behaviour; subclasses set the class attributes and math."""

  name: str = ""
  params_type: type = type(None)
  fields: dict[str, dict[str, Field]] = {}
  param_spec_table: dict[str, P] = {}
  inference_form: str = ""  # the inference family `fold` produces
  config_defaults: dict[str, Any] = {}  # other groups' defaults, e.g. optim.decoder_unit_norm
  # [batch, d_in] x [d_in, d_sae]-sized matmuls in one train step (FLOP accounting).
  step_matmuls: int = 5
  # 'group.field' of the sparsity knob a Pareto sweep varies, and its symbol in reports.
  knob: str = ""
  knob_symbol: str = ""
  # Inference families: whether `fold_decoder_norms` keeps which latents are active.
  folds_decoder_norms: bool = True
  # recipe 'auto': the 'group.field' names of the family's fields `auto_values` derives
  # (empty: the family has no recipe of its own).
  auto_fields: tuple[str, ...] = ()

  # -- config

  def knob_value(self, config) -> tuple[str, Any] | None:
    """(symbol, value) of the sparsity knob in `config` (a ConfigDict or its dict), or None."""
    if not self.knob:
      return None
    group, name = self.knob.split(".")
    return self.knob_symbol, config[group][name]

  def l0_target(self, config) -> float | None:
    """The L0 the lambda controller steered this run's lambda to (config or its dict), or
    None when the family has no controller or it was off."""
    loss = config["loss"]
    if "l0_control" not in self.fields.get("loss", {}) or not loss.get("l0_control", False):
      return None
    return float(loss["target_l0"])

  def resumable_names(self) -> tuple[str, ...]:
    """'group.field' names that may change on resume (init-only and resumable fields)."""
    return tuple(f"{g}.{n}" for g, fs in self.fields.items()
                 for n, f in fs.items() if f.init_only or f.resumable)

  def traced_names(self) -> tuple[str, ...]:
    """'group.field' names of the traced hyperparameters."""
    return tuple(f"{g}.{n}" for g, fs in self.fields.items()
                 for n, f in fs.items() if f.traced)

  def validate(self, config) -> None:
    """Raises FamilyConfigError for fields of another family, missing fields, bad values."""
    extra, missing = [], []
    for group, own in self.fields.items():
      present = set(config[group].keys())
      allowed = set(COMMON_FIELDS.get(group, ())) | set(own)
      extra += [(group, k) for k in sorted(present - allowed)]
      missing += [(group, k) for k in sorted(set(own) - present)]
    build = (f"--config=configs/default.py:family={self.name} (or"
             f" default.get_config('family={self.name}') in Python), which adds every field"
             " of the family")
    if missing:
      names = ", ".join(f"config.{g}.{k}" for g, k in missing)
      switched = (f"; the config holds fields of another family"
                  f" ({', '.join(f'config.{g}.{k}' for g, k in extra)}), so it was built for"
                  " that family and config.sae.family was changed afterwards" if extra else "")
      raise FamilyConfigError(
          f"{names} missing: family {self.name!r} needs {'them' if len(missing) > 1 else 'it'}"
          f"{switched}. Build the config with {build}.")
    for group, key in extra:
      own = self.fields[group]
      allowed = sorted(set(COMMON_FIELDS.get(group, ())) | set(own))
      owners = [f.name for f in _REGISTRY.values() if key in f.fields.get(group, {})]
      near = difflib.get_close_matches(key, allowed, n=1)
      hint = f" Did you mean config.{group}.{near[0]}?" if near else ""
      whose = (f" It belongs to the {'/'.join(owners)} famil{'ies' if len(owners) > 1 else 'y'};"
               f" to train that family build the config with"
               f" --config=configs/default.py:family={owners[0]}, or remove the field."
               if owners else "")
      raise FamilyConfigError(
          f"config.{group}.{key} is not a field of family {self.name!r}"
          f" (its fields: {', '.join(sorted(own)) or 'none'}).{whose}{hint}")
    self.check_values(config)

  def check_values(self, config) -> None:
    """Family-specific value checks (ranges, shapes); raises FamilyConfigError."""
    del config

  def settings(self, config):
    """Static hyperparameters from the config."""
    raise NotImplementedError

  def hyperparams(self, config) -> dict[str, jax.Array]:
    """{field: traced scalar} of the traced fields (float32, ints as int32)."""
    out = {}
    for group, fs in self.fields.items():
      for n, f in fs.items():
        if f.traced:
          v = config[group][n]
          dtype = jnp.int32 if isinstance(f.default, int) and not isinstance(f.default, bool) \
              else jnp.float32
          out[n] = jnp.asarray(v, dtype)
    return out

  def init_kwargs(self, config) -> dict:
    """`init`'s keyword options (beyond d_in, d_sae) from a config: the shared ones
    (`shape_kwargs`) and the family's own."""
    return shape_kwargs(config)

  def auto_values(self, pre, num_steps: int) -> dict[str, Any]:
    """{'group.field': value} of `auto_fields` from the fresh SAE's pre-activations `pre`
    (`[rows, d_sae]`, numpy, normalised units) and the run's steps."""
    raise NotImplementedError(f"family {self.name!r} has no recipe 'auto'")

  def group_config(self, configs: list):
    """The config one compiled step of a sweep group runs with, from its members'
    configs (which differ only in traced fields): a copy of the first member's,
    with the family's shape-affecting settings made to fit every member."""
    return ml_collections.ConfigDict(configs[0].to_dict())

  def member_params(self, params: Params, config) -> Params:
    """A sweep member's own parameters out of its group's (`group_config`) params."""
    del config
    return params

  # -- training

  def init(self, key: jax.Array, *, d_in: int, d_sae: int, **options) -> Params:
    """Fresh float32 parameters (`options` from `init_kwargs`)."""
    raise NotImplementedError

  def loss(self, params: Params, state: Any, x: jax.Array, *, settings, hparams: dict,
           dead: jax.Array, step: jax.Array, target: jax.Array | None = None
           ) -> tuple[jax.Array, "Output"]:
    """(scalar loss, Output) on `x: [batch, d_in]` normalised inputs, predicting
    `target: [batch, d_out]` (a transcoder; None: x itself, an SAE) with `predict`.

    `hparams` holds the traced fields, `dead: [d_sae]` the latents silent for
    `dead_window_steps`, `step` the update's step (warm-ups).
    """
    raise NotImplementedError

  def encode(self, params: Params, x: jax.Array, **options) -> jax.Array:
    """The training-form latents `[..., d_sae]` float32 of `x: [..., d_in]`."""
    raise NotImplementedError

  def init_state(self, d_sae: int, settings) -> Any:
    """The family's TrainState slot at step 0."""
    del d_sae, settings
    return NoState()

  def metrics(self, output: Output, settings) -> dict:
    """Family-specific scalars for the log (beyond `output.parts`)."""
    del output, settings
    return {}

  def step_capacity(self, settings) -> int:
    """Latents per row of the sparse train step these settings run (0: the dense step)."""
    return int(getattr(settings, "sparse_capacity", 0))

  def with_step_capacity(self, settings, capacity: int):
    """`settings` with the sparse step's capacity set to `capacity` (0: dense)."""
    if capacity == self.step_capacity(settings):
      return settings
    if not hasattr(settings, "sparse_capacity"):
      raise ValueError(f"family {self.name!r} has no sparse train step.")
    return dataclasses.replace(settings, sparse_capacity=int(capacity))

  def adapts_capacity(self, config) -> bool:
    """Whether the trainer re-picks the step's capacity (`with_step_capacity`) on logging
    steps from the logged `max_candidates` metric (`ops.sparse.adapt_capacity`)."""
    del config
    return False

  def constrain(self, params: Params, settings=None) -> Params:
    """Projects parameters back onto their constraint set after an update."""
    del settings
    return params

  # -- sharding

  def param_specs(self, params: Params) -> Params:
    """A params-shaped pytree of PartitionSpecs (latents on the 'model' axis)."""
    names = [n for n in array_fields(params) if getattr(params, n) is not None]
    missing = [n for n in names if n not in self.param_spec_table]
    if missing:
      raise ValueError(f"family {self.name!r} has no sharding spec for parameter(s)"
                       f" {missing}; add them to its param_spec_table.")
    return params.replace(**{n: self.param_spec_table[n] for n in names})

  def state_specs(self, state: Any) -> Any:
    """PartitionSpecs for the family state (scalars replicated by default)."""
    return jax.tree.map(lambda _: P(), state)

  # -- inference

  def fold(self, params: Params, state: Any, norm_scale) -> tuple[str, Params]:
    """(inference family name, its params in raw LM units) of trained params.

    `norm_scale`: C of the inputs, or (C_in, C_out) for a transcoder (`norm_scales`).
    """
    raise NotImplementedError

  def canonical(self, params: Params) -> Params:
    """The layout every format saves: the pre-encoder bias folded into b_enc."""
    return fold_pre_encoder_bias(params)

  def infer(self, params: Params, x: jax.Array) -> jax.Array:
    """Inference forward (plain jnp; defined by inference families)."""
    raise NotImplementedError(f"{self.name!r} is a training family; fold it first.")

  def fold_decoder_norms(self, params: Params) -> Params:
    """Unit-norm decoder rows with the norms moved into the encoder (inference families)."""
    raise NotImplementedError(f"{self.name!r} does not fold decoder norms.")

  def threshold_of(self, params: Params) -> jax.Array:
    """theta `[d_sae]` float32 of inference parameters (families with a threshold)."""
    raise AttributeError(f"a {self.name!r} SAE has no threshold.")

  def k_of(self, params: Params) -> int:
    """Latents kept per row of inference parameters (families with a fixed k)."""
    raise AttributeError(f"a {self.name!r} SAE has no k.")

  def decode(self, params: Params, f: jax.Array, *, compute_dtype="float32") -> jax.Array:
    """The latents' part of the output, `f @ W_dec + b_dec`: `[..., d_out]` (float32) of
    `f: [..., d_sae]` (the reconstruction of an SAE; a skip transcoder adds `skip`)."""
    return ops.matmul(f, params.W_dec, compute_dtype) + params.b_dec

  def predict(self, params: Params, f: jax.Array, x: jax.Array, *, compute_dtype="float32"
              ) -> jax.Array:
    """The output `[..., d_out]` of latents `f` for input `x`: `decode` plus the skip."""
    return self.decode(params, f, compute_dtype=compute_dtype) + skip(params, x, compute_dtype)

  def __repr__(self) -> str:
    return f"<SAE family {self.name!r}>"


def shape_kwargs(config) -> dict:
  """The `init` options every family takes: pre_encoder_bias, and a transcoder's
  d_out (the decoder's width; the input's when 0) and skip."""
  s = config.sae  # .get: a run saved before transcoders has no d_out / skip
  return dict(pre_encoder_bias=bool(s.pre_encoder_bias),
              d_out=int(s.get("d_out", 0) or s.d_in), skip=bool(s.get("skip", False)))


def is_transcoder(config) -> bool:
  """Whether `config` trains a transcoder (its decoder predicts `sae.target_site`)."""
  return bool(config.sae.get("target_site", ""))


def array_fields(params) -> list[str]:
  """Names of the pytree (array) fields of a params dataclass."""
  return [f.name for f in dataclasses.fields(params)
          if f.metadata.get("pytree_node", True)]


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
  """Adds a family to the registry under `family.name`."""
  _REGISTRY[family.name] = family
  return family


def get(name: str) -> Family:
  """The family registered as `name`, with a clear error for unknown names."""
  if name not in _REGISTRY:
    near = difflib.get_close_matches(str(name), sorted(_REGISTRY), n=1)
    raise ValueError(
        f"unknown SAE family {name!r}; known families: {sorted(_REGISTRY)}."
        + (f" Did you mean {near[0]!r}?" if near else "")
        + " Set config.sae.family (or --config=configs/default.py:family=NAME).")
  return _REGISTRY[name]


def names() -> list[str]:
  """Names of all registered families."""
  return sorted(_REGISTRY)


def inference_names() -> list[str]:
  """Names of the families an exported SAE can be (its `infer` is the forward)."""
  return sorted(n for n, f in _REGISTRY.items() if f.inference_form == n)


def family_of(params: Params) -> Family:
  """The family whose parameter type `params` is (exact type match)."""
  for family in _REGISTRY.values():
    if type(params) is family.params_type:  # pylint: disable=unidiomatic-typecheck
      return family
  raise TypeError(
      f"{type(params).__name__} is not the parameter type of any SAE family"
      f" ({names()}); create parameters with jsae.saes.get(name).init(...).")


def configure(config, name: str):
  """Sets `config.sae.family = name` and adds that family's fields with their defaults.

  `config` is an unlocked ConfigDict derived from configs/default.py; fields of
  the family's groups that belong to another family are removed, and the
  family's defaults for other groups (e.g. `optim.decoder_unit_norm`) applied.
  Returns `config`.
  """
  family = get(name)
  config.sae.family = name
  for group in ("sae", "loss"):
    common = set(COMMON_FIELDS[group])
    for key in [k for k in config[group].keys() if k not in common]:
      del config[group][key]
    for key, f in family.fields.get(group, {}).items():
      config[group][key] = f.default
  for dotted, value in family.config_defaults.items():
    group, key = dotted.split(".")
    config[group][key] = value
  return config


def fill_missing_fields(config):
  """Adds, with their defaults, the fields of `config.sae.family` that `config` lacks
  (a run saved before the field existed); returns `config` (unlocked ConfigDict)."""
  family = get(config.sae.family)
  for group, fields in family.fields.items():
    for key, f in fields.items():
      if key not in config[group]:
        config[group][key] = f.default
  return config


def field_defaults(name: str) -> dict[str, dict[str, Any]]:
  """{group: {field: default}} of family `name` (what configs add for it)."""
  return {g: {n: f.default for n, f in fs.items()} for g, fs in get(name).fields.items()}


# ----------------------------------------------------------------------------- shared math


def init_linear(key: jax.Array, d_in: int, d_sae: int, *, row_norm: float = 1.0,
                d_out: int | None = None):
  """Gemma Scope / Gao init: He-uniform decoder rows scaled to `row_norm`, W_enc = W_dec^T.

  A transcoder (`d_out` != d_in) cannot tie them: its encoder columns are drawn the
  same way from another key and scaled to the same norm.
  Returns (W_enc [d_in, d_sae], W_dec [d_sae, d_out]) float32.
  """
  d_out = d_in if d_out is None else d_out
  if d_in <= 0 or d_sae <= 0 or d_out <= 0:
    raise ValueError(f"d_in, d_sae and d_out must be positive; got d_in={d_in},"
                     f" d_sae={d_sae}, d_out={d_out}.")

  def rows(k, width):
    w = jax.nn.initializers.he_uniform()(k, (d_sae, width), jnp.float32)
    return row_norm * w / ops.decoder_norms(w)[:, None]
  W_dec = rows(key, d_out)
  if d_out == d_in:
    return W_dec.T, W_dec
  return rows(jax.random.fold_in(key, 1), d_in).T, W_dec


def init_skip(d_in: int, d_out: int, skip: bool):
  """A skip transcoder's W_skip `[d_in, d_out]` at zero (the latents explain the
  output at first, the skip learns the linear part), or None without a skip."""
  return jnp.zeros((d_in, d_out), jnp.float32) if skip else None


def skip(params, x: jax.Array, compute_dtype="float32"):
  """x @ W_skip `[..., d_out]` float32, or 0.0 for params without a skip."""
  if getattr(params, "W_skip", None) is None:
    return jnp.zeros((), jnp.float32)
  return ops.matmul(x, params.W_skip, compute_dtype)


def plain_skip(params, x: jax.Array):
  """`skip` for inference: plain jnp, weights' dtype, float32 accumulation."""
  if getattr(params, "W_skip", None) is None:
    return jnp.zeros((), jnp.float32)
  w = params.W_skip
  return jnp.matmul(x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def linear_pre_activations(params, x: jax.Array, *, compute_dtype="float32") -> jax.Array:
  """pi = (x - b_dec) @ W_enc + b_enc (b_dec only with `pre_encoder_bias`): `[..., d_sae]` f32."""
  if x.shape[-1] != params.W_enc.shape[-2]:
    raise ValueError(f"input has {x.shape[-1]} features but the SAE expects"
                     f" d_in={params.W_enc.shape[-2]}.")
  bias = params.b_dec if params.pre_encoder_bias else None
  return ops.matmul(x, params.W_enc, compute_dtype, input_bias=bias) + params.b_enc


def plain_pre_activations(params, x: jax.Array) -> jax.Array:
  """pi for inference: plain jnp (any autodiff mode), weights' dtype, f32 accumulation."""
  if x.shape[-1] != params.W_enc.shape[-2]:
    raise ValueError(f"input has {x.shape[-1]} features (shape {tuple(x.shape)}) but"
                     f" the SAE expects d_in={params.W_enc.shape[-2]}.")
  w = params.W_enc
  if getattr(params, "pre_encoder_bias", False):
    x = x.astype(jnp.float32) - params.b_dec.astype(jnp.float32)
  pre = jnp.matmul(x.astype(w.dtype), w, preferred_element_type=jnp.float32)
  return pre + params.b_enc.astype(jnp.float32)


def fold_pre_encoder_bias(params):
  """b_enc' = b_enc - b_dec @ W_enc, so `x @ W_enc + b_enc'` equals `(x - b_dec) @ W_enc + b_enc`.

  For any params with W_enc, b_enc, b_dec and a static `pre_encoder_bias`; a
  no-op when that is False.
  """
  if not params.pre_encoder_bias:
    return params
  shift = jnp.matmul(params.b_dec.astype(jnp.float32), params.W_enc.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
  b_enc = (params.b_enc.astype(jnp.float32) - shift).astype(params.b_enc.dtype)
  return params.replace(b_enc=b_enc, pre_encoder_bias=False)


def scale_biases(params, c: float, c_out: float | None = None):
  """The norm-scale fold of a linear encoder/decoder trained on x / c (and y / c_out).

  b_enc times c; b_dec times c_out; W_dec and W_skip times c_out / c (a transcoder's
  output has its own constant; for an SAE c_out = c and they are unchanged).
  """
  c_out = c if c_out is None else c_out
  out = params.replace(b_enc=params.b_enc * c, b_dec=params.b_dec * c_out)
  if c_out != c:
    out = out.replace(W_dec=_scaled(params.W_dec, c_out / c))
  if getattr(params, "W_skip", None) is not None:
    out = out.replace(W_skip=_scaled(params.W_skip, c_out / c))
  return out


def _scaled(a: jax.Array, s: float) -> jax.Array:
  return (a.astype(jnp.float32) * s).astype(a.dtype)


def check_norm_scale(norm_scale) -> float:
  """`norm_scale` as a float, or ValueError if it is not finite and > 0."""
  c = float(norm_scale)
  if not (jnp.isfinite(c) and c > 0):
    raise ValueError(f"norm_scale must be a finite number > 0; got {norm_scale!r}.")
  return c


def norm_scales(norm_scale) -> tuple[float, float]:
  """(C of the input, C of the output) from `C` (an SAE) or `(C_in, C_out)` (a transcoder)."""
  if isinstance(norm_scale, (tuple, list)):
    c_in, c_out = norm_scale
    return check_norm_scale(c_in), check_norm_scale(c_out)
  c = check_norm_scale(norm_scale)
  return c, c


def row_norm_factors(W_dec: jax.Array) -> jax.Array:
  """n_i = ||W_dec[i]|| `[d_sae]` float32, with 1 for rows of norm 0."""
  norms = ops.decoder_norms(W_dec)
  return jnp.where(norms > 0, norms, 1.0)


def fold_decoder_norms_linear(params):
  """Unit-norm decoder rows: W_enc[:, i] *= n_i, b_enc_i *= n_i, W_dec[i] /= n_i.

  Latent i becomes n_i times larger (its value is then its contribution's norm
  in input space); which latents are active and the reconstruction are unchanged
  for every family whose selection is positively homogeneous per latent.
  """
  n = row_norm_factors(params.W_dec)

  def scale(a, s):
    return (a.astype(jnp.float32) * s).astype(a.dtype)
  return params.replace(W_enc=scale(params.W_enc, n[None, :]), b_enc=scale(params.b_enc, n),
                        W_dec=scale(params.W_dec, 1.0 / n[:, None]))


def warmed_coeff(coeff: jax.Array, step: jax.Array, warmup_steps: int) -> jax.Array:
  """coeff * min(1, step / warmup_steps): the linear sparsity-coefficient warm-up."""
  coeff = jnp.asarray(coeff, jnp.float32)
  if warmup_steps <= 0:
    return coeff
  return coeff * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)
