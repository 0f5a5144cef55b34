"""Gemma 2 and Gemma 3 forward passes as pure functions, with named hook sites.

The model is a function of a params pytree (a nested dict of arrays, see
`param_shapes`) and a frozen `GemmaConfig`. Parameters are always jit
*arguments*: closing over ~1 GB of weights would bake them into the compiled
program as constants (and recompile them for every new input shape).

Architecture (both families): tied embeddings scaled by sqrt(d_model); per
block RMSNorm before *and* after attention and the MLP; grouped-query attention
with rotate-half RoPE; GeGLU MLP (tanh GELU); local sliding-window and global
attention layers. Gemma 2 adds attention-logit and final-logit soft-capping;
Gemma 3 adds RMSNorm on queries and keys (QK-norm) and a larger RoPE base on
global layers. Norm weights are zero-centred: the model multiplies by (1 + w).

Hook sites (`parse_site`):

  resid_post.L  residual stream after block L              [batch, seq, d_model]
  mlp_in.L      the MLP's input: the pre-MLP norm's output  [batch, seq, d_model]
  mlp_out.L     MLP output after the post-MLP norm, before  [batch, seq, d_model]
                it is added to the residual stream
  attn_z.L      per-head attention outputs, concatenated,   [batch, seq, n_heads * head_dim]
                before the output projection

Typical use (one compile per input shape; pad to a fixed length):

  cfg = get_config("gemma3_270m")
  harvest = jax.jit(functools.partial(
      forward, config=cfg, capture=("resid_post.9",), stop_at_layer=10))
  _, acts = harvest(params, tokens)          # acts["resid_post.9"]: [b, s, 640]

Splicing (e.g. an SAE reconstruction, to measure delta LM loss): the splice
functions are Python callables, so build them inside the jitted function and
let them close over *traced* arguments, never over big concrete arrays:

  @jax.jit
  def spliced_logits(params, sae_params, tokens):
    fn = lambda x: decode(sae_params, encode(sae_params, x))
    return forward(params, tokens, cfg, splice={"resid_post.9": fn})[0]

A transcoder replaces a whole MLP: `transcode={"mlp_out.9": fn}` computes the
block's MLP output as fn(mlp_in.9's activation), and the MLP is not run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "GemmaConfig", "get_config", "list_configs", "parse_site", "site_name",
    "param_shapes", "check_params", "init_params", "cast_params", "forward",
    "make_forward", "residual_before", "unembed", "token_nll", "mean_nll", "LOCAL", "GLOBAL", "SITE_KINDS",
]

LOCAL = "local"
GLOBAL = "global"
SITE_KINDS = ("resid_post", "mlp_in", "mlp_out", "attn_z")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_FAMILIES = ("gemma2", "gemma3")
# Finite (not -inf) so a query with no visible key (a padded query) gets a
# uniform softmax instead of NaNs; far below any soft-capped or real logit.
_MASKED_LOGIT = -1e30

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaConfig:
  """Hyperparameters of one Gemma 2 / Gemma 3 text model; hashable (jit-static).

  Attributes:
    name: registry name, informational.
    family: "gemma2" or "gemma3".
    vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, d_ff: sizes.
    attention_types: per layer, "local" (sliding window) or "global".
    sliding_window: keys more than `sliding_window - 1` positions back are
      invisible to local layers.
    rope_base_local, rope_base_global: RoPE base frequency per layer type.
    rope_scale_global: global-layer positions are divided by this (Gemma 3 4B+
      use 8; 1 elsewhere).
    query_scale: queries are multiplied by this (query_pre_attn_scalar ** -0.5).
    attn_logit_softcap: c in c * tanh(logits / c) on attention logits, or None.
    final_logit_softcap: the same on the output logits, or None.
    qk_norm: RMSNorm on queries and keys per head (Gemma 3).
    rms_eps: RMSNorm epsilon.
    max_seq_len: longest context the forward accepts.
    dtype: compute dtype, "float32" or "bfloat16" (norms, softmax and logits
      are always computed in float32).
  """

  name: str = "custom"
  family: str
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  attention_types: tuple[str, ...]
  sliding_window: int
  rope_base_local: float = 10_000.0
  rope_base_global: float = 10_000.0
  rope_scale_global: float = 1.0
  query_scale: float
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  qk_norm: bool = False
  rms_eps: float = 1e-6
  max_seq_len: int
  dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "attention_types", tuple(self.attention_types))
    if self.family not in _FAMILIES:
      raise ValueError(f"GemmaConfig.family: {self.family!r}; use one of {_FAMILIES}.")
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                  "head_dim", "d_ff", "sliding_window", "max_seq_len"):
      if int(getattr(self, field)) <= 0:
        raise ValueError(f"GemmaConfig.{field} must be > 0; got {getattr(self, field)}.")
    if len(self.attention_types) != self.n_layers:
      raise ValueError(
          f"GemmaConfig.attention_types has {len(self.attention_types)} entries"
          f" but n_layers={self.n_layers}; give one 'local'/'global' per layer.")
    bad = sorted(set(self.attention_types) - {LOCAL, GLOBAL})
    if bad:
      raise ValueError(f"GemmaConfig.attention_types: unknown {bad}; use 'local' or 'global'.")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"GemmaConfig: n_heads={self.n_heads} is not a multiple of"
          f" n_kv_heads={self.n_kv_heads} (grouped-query attention needs it).")
    if self.head_dim % 2:
      raise ValueError(f"GemmaConfig.head_dim must be even for RoPE; got {self.head_dim}.")
    if self.dtype not in _DTYPES:
      raise ValueError(f"GemmaConfig.dtype: {self.dtype!r}; use one of {tuple(_DTYPES)}.")

  @property
  def compute_dtype(self):
    """The jnp dtype of activations and matmuls."""
    return _DTYPES[self.dtype]

  def is_global(self, layer: int) -> bool:
    """Whether `layer` attends globally (else within the sliding window)."""
    return self.attention_types[layer] == GLOBAL

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable fields (inverse of `from_dict`)."""
    d = dataclasses.asdict(self)
    d["attention_types"] = list(self.attention_types)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "GemmaConfig":
    """Builds a config from `to_dict` output (e.g. parsed JSON)."""
    return cls(**d)

  def to_json(self) -> str:
    """The config as a JSON string."""
    return json.dumps(self.to_dict(), sort_keys=True)


def _pattern(n_layers: int, global_every: int) -> tuple[str, ...]:
  """Layers (i + 1) % global_every == 0 are global, the rest local."""
  return tuple(GLOBAL if (i + 1) % global_every == 0 else LOCAL for i in range(n_layers))


def _gemma2(name, *, d_model, n_layers, n_heads, n_kv_heads, head_dim, d_ff,
            query_pre_attn_scalar, vocab_size=256_000, sliding_window=4096,
            max_seq_len=8192) -> GemmaConfig:
  # Gemma 2 alternates local and global layers, starting with a local one.
  return GemmaConfig(
      name=name, family="gemma2", vocab_size=vocab_size, d_model=d_model,
      n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
      head_dim=head_dim, d_ff=d_ff, attention_types=_pattern(n_layers, 2),
      sliding_window=sliding_window, rope_base_local=10_000.0,
      rope_base_global=10_000.0, query_scale=query_pre_attn_scalar ** -0.5,
      attn_logit_softcap=50.0, final_logit_softcap=30.0, qk_norm=False,
      max_seq_len=max_seq_len)


def _gemma3(name, *, d_model, n_layers, n_heads, n_kv_heads, head_dim, d_ff,
            query_pre_attn_scalar, vocab_size=262_144, sliding_window=512,
            max_seq_len=32_768, global_every=6, rope_scale_global=1.0) -> GemmaConfig:
  return GemmaConfig(
      name=name, family="gemma3", vocab_size=vocab_size, d_model=d_model,
      n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
      head_dim=head_dim, d_ff=d_ff,
      attention_types=_pattern(n_layers, global_every),
      sliding_window=sliding_window, rope_base_local=10_000.0,
      rope_base_global=1_000_000.0, rope_scale_global=rope_scale_global,
      query_scale=query_pre_attn_scalar ** -0.5, qk_norm=True,
      max_seq_len=max_seq_len)


_CONFIGS: dict[str, Callable[[], GemmaConfig]] = {
    "gemma2_2b": lambda: _gemma2(
        "gemma2_2b", d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4,
        head_dim=256, d_ff=9216, query_pre_attn_scalar=256),
    "gemma2_9b": lambda: _gemma2(
        "gemma2_9b", d_model=3584, n_layers=42, n_heads=16, n_kv_heads=8,
        head_dim=256, d_ff=14336, query_pre_attn_scalar=256),
    # 27B scales queries by (d_model / n_heads) ** -0.5 = 144 ** -0.5, not head_dim.
    "gemma2_27b": lambda: _gemma2(
        "gemma2_27b", d_model=4608, n_layers=46, n_heads=32, n_kv_heads=16,
        head_dim=128, d_ff=36864, query_pre_attn_scalar=144),
    "gemma3_270m": lambda: _gemma3(
        "gemma3_270m", d_model=640, n_layers=18, n_heads=4, n_kv_heads=1,
        head_dim=256, d_ff=2048, query_pre_attn_scalar=256),
    "gemma3_1b": lambda: _gemma3(
        "gemma3_1b", d_model=1152, n_layers=26, n_heads=4, n_kv_heads=1,
        head_dim=256, d_ff=6912, query_pre_attn_scalar=256),
    # Tiny random-weight models for tests: small enough to check against a
    # loop-based NumPy reference, with windows shorter than test sequences.
    "tiny_gemma2": lambda: _gemma2(
        "tiny_gemma2", vocab_size=256, d_model=64, n_layers=4, n_heads=4,
        n_kv_heads=2, head_dim=16, d_ff=96, query_pre_attn_scalar=16,
        sliding_window=8, max_seq_len=64),
    "tiny_gemma3": lambda: _gemma3(
        "tiny_gemma3", vocab_size=256, d_model=64, n_layers=4, n_heads=4,
        n_kv_heads=1, head_dim=16, d_ff=96, query_pre_attn_scalar=16,
        sliding_window=8, max_seq_len=64, global_every=2),
}


def list_configs() -> tuple[str, ...]:
  """Names accepted by `get_config`."""
  return tuple(_CONFIGS)


def get_config(name: str | GemmaConfig) -> GemmaConfig:
  """The named config (a `GemmaConfig` is returned unchanged)."""
  if isinstance(name, GemmaConfig):
    return name
  if name not in _CONFIGS:
    raise ValueError(f"unknown Gemma config {name!r}; valid: {', '.join(_CONFIGS)}.")
  return _CONFIGS[name]()


# --------------------------------------------------------------------------- sites

_SITE_RE = re.compile(r"^(" + "|".join(SITE_KINDS) + r")\.(\d+)$")


def parse_site(name: str, config: GemmaConfig | None = None) -> tuple[str, int]:
  """'resid_post.9' -> ('resid_post', 9); checks the layer range when given a config."""
  m = _SITE_RE.match(name) if isinstance(name, str) else None
  n = config.n_layers if config is not None else None
  if m is None or (n is not None and int(m.group(2)) >= n):
    bound = f"0 <= L < {n}" if n is not None else "L a layer index"
    raise ValueError(
        f"unknown hook site {name!r}; valid: resid_post.L, mlp_in.L, mlp_out.L, attn_z.L"
        f" with {bound}.")
  return m.group(1), int(m.group(2))


def site_name(kind: str, layer: int) -> str:
  """('resid_post', 9) -> 'resid_post.9'."""
  if kind not in SITE_KINDS:
    raise ValueError(f"unknown hook site kind {kind!r}; valid: {', '.join(SITE_KINDS)}.")
  return f"{kind}.{layer}"


def _check_sites(names: Iterable[str], config: GemmaConfig, n_run: int,
                 stop_at_layer: int | None, what: str) -> None:
  for name in names:
    _, layer = parse_site(name, config)
    if layer >= n_run:
      raise ValueError(
          f"{what} site {name!r} is at or after stop_at_layer={stop_at_layer}, so"
          f" it is never computed; use stop_at_layer >= {layer + 1} or None.")


# -------------------------------------------------------------------------- params

def param_shapes(config: GemmaConfig) -> Params:
  """The params tree with shape tuples as leaves.

  Layout (d = d_model, H = n_heads, K = n_kv_heads, h = head_dim, f = d_ff):
    embed [vocab, d] (also the output matrix), final_norm [d],
    layers[i]: attn_norm [d], q [d, H, h], k [d, K, h], v [d, K, h],
      o [H, h, d], (Gemma 3: q_norm [h], k_norm [h]), post_attn_norm [d],
      mlp_norm [d], gate [d, f], up [d, f], down [f, d], post_mlp_norm [d].
  """
  c = config
  d, h = c.d_model, c.head_dim
  layer = {
      "attn_norm": (d,),
      "q": (d, c.n_heads, h),
      "k": (d, c.n_kv_heads, h),
      "v": (d, c.n_kv_heads, h),
      "o": (c.n_heads, h, d),
      "post_attn_norm": (d,),
      "mlp_norm": (d,),
      "gate": (d, c.d_ff),
      "up": (d, c.d_ff),
      "down": (c.d_ff, d),
      "post_mlp_norm": (d,),
  }
  if c.qk_norm:
    layer["q_norm"] = (h,)
    layer["k_norm"] = (h,)
  return {
      "embed": (c.vocab_size, d),
      "final_norm": (d,),
      "layers": [dict(layer) for _ in range(c.n_layers)],
  }


def _is_norm(key: str) -> bool:
  return key.endswith("norm")


def check_params(params: Params, config: GemmaConfig) -> None:
  """Raises ValueError naming the first missing or wrongly shaped tensor."""
  expected = param_shapes(config)
  if not isinstance(params, Mapping) or "layers" not in params:
    raise ValueError("params must be a dict with 'embed', 'final_norm' and 'layers'.")
  if len(params["layers"]) != config.n_layers:
    raise ValueError(
        f"params have {len(params['layers'])} layers but config {config.name!r}"
        f" has n_layers={config.n_layers}.")
  pairs = [(k, params.get(k), expected[k]) for k in ("embed", "final_norm")]
  for i, (lp, le) in enumerate(zip(params["layers"], expected["layers"])):
    pairs += [(f"layers[{i}].{k}", lp.get(k), shape) for k, shape in le.items()]
  for name, value, shape in pairs:
    if value is None:
      raise ValueError(f"params: missing tensor {name} (expected shape {shape}).")
    if tuple(value.shape) != tuple(shape):
      raise ValueError(
          f"params: tensor {name} has shape {tuple(value.shape)}, expected"
          f" {tuple(shape)} for config {config.name!r}.")


def init_params(key: jax.Array, config: GemmaConfig, *, norm_std: float = 0.1) -> Params:
  """Random float32 params for tests.

  Matrices are N(0, 1/fan_in), the embedding N(0, 1/d_model) (so tied logits
  are O(1)); norm weights are N(0, norm_std) rather than zero so that tests
  exercise the (1 + w) convention.
  """
  return _init_params(key, config, norm_std)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_params(key: jax.Array, config: GemmaConfig, norm_std: float) -> Params:
  # One flat normal draw sliced into tensors: a single RNG op compiles in a
  # fraction of the time of one op per tensor shape.
  shapes = param_shapes(config)
  named = [("embed", shapes["embed"]), ("final_norm", shapes["final_norm"])]
  named += [(k, shape) for layer in shapes["layers"] for k, shape in layer.items()]
  sizes = [math.prod(shape) for _, shape in named]
  flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
  offsets = np.cumsum([0] + sizes)

  def std(name: str, shape: tuple[int, ...]) -> float:
    if _is_norm(name):
      return norm_std
    if name == "embed":
      return config.d_model ** -0.5
    if name == "o":  # contracts over heads and head_dim
      return (shape[0] * shape[1]) ** -0.5
    return shape[0] ** -0.5

  arrays = iter([std(name, shape) * flat[a:b].reshape(shape)
                 for (name, shape), a, b in zip(named, offsets[:-1], offsets[1:])])
  return {
      "embed": next(arrays),
      "final_norm": next(arrays),
      "layers": [{k: next(arrays) for k in layer} for layer in shapes["layers"]],
  }


def cast_params(params: Params, dtype) -> Params:
  """Casts weight matrices to `dtype`; 1-D norm weights stay float32."""
  return jax.tree.map(lambda a: a if a.ndim == 1 else a.astype(dtype), params)


# ------------------------------------------------------------------------- layers

def _rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis with zero-centred weight (scales by 1 + w)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else cap * jnp.tanh(x / cap)


def _rope(x: jax.Array, positions: jax.Array, base: float, scale: float) -> jax.Array:
  """Rotate-half RoPE: dim i rotates with i + h/2.

  x: [batch, seq, heads, h]; positions: [batch, seq] int.
  """
  h = x.shape[-1]
  half = h // 2
  timescale = base ** (2.0 * jnp.arange(half, dtype=jnp.float32) / h)
  angle = (positions.astype(jnp.float32) / scale)[..., None] / timescale  # [b, s, half]
  sin = jnp.sin(angle)[:, :, None, :]
  cos = jnp.cos(angle)[:, :, None, :]
  x1 = x[..., :half].astype(jnp.float32)
  x2 = x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _attention_z(lp: Params, x: jax.Array, positions: jax.Array,
                 allowed: jax.Array, layer: int, c: GemmaConfig) -> jax.Array:
  """Per-head attention outputs, heads concatenated.

  x: [b, s, d] (already normed); allowed: [b or 1, s, s] bool (query, key).
  Returns z: [b, s, n_heads * head_dim].
  """
  dt = c.compute_dtype
  b, s, _ = x.shape
  kv, g, h = c.n_kv_heads, c.n_heads // c.n_kv_heads, c.head_dim
  q = jnp.einsum("bsd,dnh->bsnh", x, lp["q"].astype(dt))
  k = jnp.einsum("bsd,dkh->bskh", x, lp["k"].astype(dt))
  v = jnp.einsum("bsd,dkh->bskh", x, lp["v"].astype(dt))
  if c.qk_norm:
    q = _rms_norm(q, lp["q_norm"], c.rms_eps)
    k = _rms_norm(k, lp["k_norm"], c.rms_eps)
  if c.is_global(layer):
    base, scale = c.rope_base_global, c.rope_scale_global
  else:
    base, scale = c.rope_base_local, 1.0
  q = _rope(q, positions, base, scale) * jnp.asarray(c.query_scale, dt)
  k = _rope(k, positions, base, scale)
  # Query head n uses KV head n // g: group queries instead of repeating K/V.
  q = q.reshape(b, s, kv, g, h)
  logits = jnp.einsum("bskgh,btkh->bkgst", q, k).astype(jnp.float32)
  logits = _softcap(logits, c.attn_logit_softcap)
  logits = jnp.where(allowed[:, None, None], logits, _MASKED_LOGIT)
  probs = jax.nn.softmax(logits, axis=-1).astype(dt)
  z = jnp.einsum("bkgst,btkh->bskgh", probs, v)
  return z.reshape(b, s, c.n_heads * h)


def _mlp(lp: Params, x: jax.Array, c: GemmaConfig) -> jax.Array:
  """GeGLU: down(gelu_tanh(x @ gate) * (x @ up)). x: [b, s, d] -> [b, s, d]."""
  dt = c.compute_dtype
  gate = jnp.einsum("bsd,df->bsf", x, lp["gate"].astype(dt))
  up = jnp.einsum("bsd,df->bsf", x, lp["up"].astype(dt))
  return jnp.einsum("bsf,fd->bsd", jax.nn.gelu(gate, approximate=True) * up,
                    lp["down"].astype(dt))


def _attention_masks(tokens: jax.Array, mask: jax.Array | None, c: GemmaConfig):
  """Positions [b, s] and (global, local) allowed-key masks [b or 1, s, s]."""
  b, s = tokens.shape
  idx = jnp.arange(s)
  causal = idx[:, None] >= idx[None, :]
  if mask is None:
    positions = jnp.broadcast_to(idx, (b, s))
    allowed = causal[None]
    dist = (idx[:, None] - idx[None, :])[None]
  else:
    valid = mask.astype(bool)
    # Positions count real tokens, so left- and right-padded rows agree.
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    allowed = causal[None] & valid[:, None, :]
    dist = positions[:, :, None] - positions[:, None, :]
  return positions, allowed, allowed & (dist < c.sliding_window)


class _Hooks:
  """Records captured sites and applies splices (trace-time Python only)."""

  def __init__(self, capture: tuple[str, ...], splice: Mapping[str, Callable] | None,
               transcode: Mapping[str, Callable] | None = None):
    self.capture = capture
    self.splice = dict(splice or {})
    self.transcode = dict(transcode or {})
    self.captured: dict[str, jax.Array] = {}

  def __call__(self, name: str, value: jax.Array) -> jax.Array:
    if name in self.capture:
      self.captured[name] = value
    fn = self.splice.get(name)
    if fn is None:
      return value
    new = jnp.asarray(fn(value))
    if new.shape != value.shape:
      raise ValueError(
          f"splice function for {name!r} returned shape {new.shape}; it must"
          f" return the site's shape {value.shape}.")
    return new.astype(value.dtype)


def _block(lp: Params, x: jax.Array, positions, allowed_global, allowed_local,
           layer: int, c: GemmaConfig, hook: _Hooks) -> jax.Array:
  """One transformer block with hooks. x: [b, s, d] -> [b, s, d]."""
  b, s, _ = x.shape
  allowed = allowed_global if c.is_global(layer) else allowed_local
  y = _rms_norm(x, lp["attn_norm"], c.rms_eps)
  z = hook(f"attn_z.{layer}", _attention_z(lp, y, positions, allowed, layer, c))
  attn = jnp.einsum("bsnh,nhd->bsd", z.reshape(b, s, c.n_heads, c.head_dim),
                    lp["o"].astype(c.compute_dtype))
  x = x + _rms_norm(attn, lp["post_attn_norm"], c.rms_eps)
  y = hook(f"mlp_in.{layer}", _rms_norm(x, lp["mlp_norm"], c.rms_eps))
  out_site = f"mlp_out.{layer}"
  replacement = hook.transcode.get(out_site)
  if replacement is None:
    mlp = _rms_norm(_mlp(lp, y, c), lp["post_mlp_norm"], c.rms_eps)
  else:  # a transcoder in place of the MLP: the MLP is not run
    mlp = jnp.asarray(replacement(y))
    if mlp.shape != y.shape:
      raise ValueError(f"transcode function for {out_site!r} returned shape {mlp.shape}; it"
                       f" must return the MLP output's shape {y.shape}.")
    mlp = mlp.astype(y.dtype)
  mlp = hook(out_site, mlp)
  return hook(f"resid_post.{layer}", x + mlp)


def _check_static(c: GemmaConfig, capture, splice, stop_at_layer, start_layer: int = 0,
                  transcode=None) -> int:
  """Validates sites, start_layer and stop_at_layer; returns the number of blocks to run."""
  if stop_at_layer is not None and not 1 <= stop_at_layer <= c.n_layers:
    raise ValueError(
        f"stop_at_layer={stop_at_layer} is out of range; use 1 <= stop_at_layer"
        f" <= {c.n_layers} (the number of blocks to run) or None.")
  n_run = c.n_layers if stop_at_layer is None else stop_at_layer
  if not 0 <= start_layer < n_run:
    raise ValueError(f"start_layer={start_layer} is out of range; use 0 <= start_layer <"
                     f" {n_run} (the first block to run).")
  _check_sites(capture, c, n_run, stop_at_layer, "capture")
  _check_sites(splice or {}, c, n_run, stop_at_layer, "splice")
  _check_sites(transcode or {}, c, n_run, stop_at_layer, "transcode")
  for name in transcode or {}:
    if parse_site(name, c)[0] != "mlp_out" or name in (splice or {}):
      raise ValueError(f"transcode key {name!r}: a transcoder replaces an MLP, so the keys"
                       " are mlp_out.L sites (its input is mlp_in.L), each not also spliced.")
  for name in (*capture, *(splice or {}), *(transcode or {})):
    if parse_site(name, c)[1] < start_layer:
      raise ValueError(f"site {name!r} is before start_layer={start_layer}, so it is never"
                       f" computed; start at layer {parse_site(name, c)[1]} or earlier.")
  return n_run


def _check_inputs(tokens, mask, c: GemmaConfig) -> None:
  """Validates token and mask shapes against the config."""
  if tokens.ndim != 2:
    raise ValueError(
        f"tokens must be [batch, seq]; got shape {tuple(tokens.shape)} (add a"
        f" batch axis with tokens[None]).")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integer ids; got dtype {tokens.dtype}.")
  if tokens.shape[1] > c.max_seq_len:
    raise ValueError(
        f"context of {tokens.shape[1]} tokens exceeds {c.name!r}'s max_seq_len="
        f"{c.max_seq_len}; use shorter contexts (e.g. pack with seq_len <= {c.max_seq_len}).")
  if mask is not None and tuple(mask.shape) != tuple(tokens.shape):
    raise ValueError(
        f"mask has shape {tuple(mask.shape)}; it must match tokens"
        f" {tuple(tokens.shape)} (True at real tokens, False at padding).")


def forward(
    params: Params,
    tokens: jax.Array,
    config: GemmaConfig,
    *,
    mask: jax.Array | None = None,
    capture: Iterable[str] | str = (),
    splice: Mapping[str, Callable[[jax.Array], jax.Array]] | None = None,
    stop_at_layer: int | None = None,
    start_layer: int = 0,
    resid: jax.Array | None = None,
    logits: bool = True,
    transcode: Mapping[str, Callable[[jax.Array], jax.Array]] | None = None,
) -> tuple[jax.Array | None, dict[str, jax.Array]]:
  """Runs the LM, capturing and/or replacing activations at hook sites.

  Args:
    params: the params tree (`param_shapes`), float32 or `config.dtype`.
    tokens: [batch, seq] int token ids; seq <= config.max_seq_len.
    config: the model's `GemmaConfig` (static under jit).
    mask: optional [batch, seq] bool/int, True at real tokens; padded keys are
      never attended and positions count only real tokens (left or right
      padding both work). Not needed for right padding, which causal
      attention already hides. Not the harvest mask that excludes BOS.
    capture: site names to return, e.g. ("resid_post.9",) (static).
    splice: {site: fn} with fn(activation) -> activation of the same shape,
      replacing the site's value downstream; captured values are the ones
      before splicing.
    stop_at_layer: run only blocks [0, stop_at_layer) and skip the unembedding.
    start_layer: run from block `start_layer` on, with `resid` ([batch, seq,
      d_model], the residual stream entering that block, from
      `residual_before`) instead of the embedding: a prefix shared by many
      spliced suffixes is computed once.
    resid: the residual stream entering `start_layer` (required when > 0).
    logits: False returns the final-normed hidden states [batch, seq, d_model]
      (compute dtype) instead of the logits, for `unembed` to turn into logits
      a chunk of positions at a time (the [batch, seq, vocab] tensor is large).
    transcode: {"mlp_out.L": fn} with fn(mlp_in.L activation) -> block L's MLP
      output (a transcoder); the MLP is not run. Captured mlp_out.L is fn's value.

  Returns:
    (logits [batch, seq, vocab] float32 (or hidden states, see `logits`), or
     None with stop_at_layer; {site: activation} for each captured site).
  """
  capture = (capture,) if isinstance(capture, str) else tuple(capture)
  c = config
  n_run = _check_static(c, capture, splice, stop_at_layer, start_layer, transcode)
  _check_inputs(tokens, mask, c)
  hook = _Hooks(capture, splice, transcode)
  dt = c.compute_dtype
  positions, allowed_global, allowed_local = _attention_masks(tokens, mask, c)
  if start_layer == 0:
    x = params["embed"][tokens].astype(dt) * jnp.asarray(math.sqrt(c.d_model), dt)
  elif resid is None or tuple(resid.shape) != (*tokens.shape, c.d_model):
    raise ValueError(f"start_layer={start_layer} needs resid of shape"
                     f" {(*tokens.shape, c.d_model)} (from residual_before); got"
                     f" {None if resid is None else tuple(resid.shape)}.")
  else:
    x = resid.astype(dt)
  for layer in range(start_layer, n_run):
    x = _block(params["layers"][layer], x, positions, allowed_global,
               allowed_local, layer, c, hook)
  if stop_at_layer is not None:
    return None, hook.captured
  x = _rms_norm(x, params["final_norm"], c.rms_eps)
  return (unembed(params, x, c) if logits else x), hook.captured


def unembed(params: Params, hidden: jax.Array, config: GemmaConfig) -> jax.Array:
  """Logits float32 [..., vocab] (soft-capped) from final-normed `hidden` [..., d_model].

  The matmul's inputs are in `hidden`'s dtype (the compute dtype in `forward`); it
  accumulates and returns float32.
  """
  dt = hidden.dtype
  out = jnp.einsum("...d,vd->...v", hidden, params["embed"].astype(dt),
                   preferred_element_type=jnp.float32)
  return _softcap(out, config.final_logit_softcap)


def residual_before(params: Params, tokens: jax.Array, config: GemmaConfig, layer: int, *,
                    mask: jax.Array | None = None) -> jax.Array:
  """The residual stream entering block `layer`: [batch, seq, d_model] (compute dtype).

  The embedding for layer 0; otherwise resid_post of layer - 1. Feed it to
  `forward(..., start_layer=layer, resid=...)`.
  """
  if layer == 0:
    _check_inputs(tokens, mask, config)
    dt = config.compute_dtype
    return params["embed"][tokens].astype(dt) * jnp.asarray(math.sqrt(config.d_model), dt)
  site = f"resid_post.{layer - 1}"
  return forward(params, tokens, config, mask=mask, capture=(site,), stop_at_layer=layer)[1][site]


def make_forward(config: GemmaConfig, *, capture: Iterable[str] | str = (),
                 splice: Mapping[str, Callable] | None = None,
                 stop_at_layer: int | None = None) -> Callable:
  """A jitted `fn(params, tokens, mask=None) -> (logits | None, captured)`.

  Sites and layers are validated now rather than at the first call. Splice
  functions given here must not close over large concrete arrays (they would
  become compile-time constants); see the module docstring for the pattern
  with traced SAE params.
  """
  capture = (capture,) if isinstance(capture, str) else tuple(capture)
  _check_static(config, capture, splice, stop_at_layer)
  fn = functools.partial(forward, config=config, capture=capture, splice=splice,
                         stop_at_layer=stop_at_layer)

  @jax.jit
  def run(params, tokens, mask=None):
    return fn(params, tokens, mask=mask)

  return run


# --------------------------------------------------------------------------- loss

def token_nll(logits: jax.Array, tokens: jax.Array,
              loss_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Next-token negative log-likelihood per position.

  Position t predicts token t + 1, so outputs have seq - 1 columns.

  Args:
    logits: [batch, seq, vocab].
    tokens: [batch, seq] int.
    loss_mask: optional [batch, seq] bool, True where a token counts as a
      *target* (e.g. `TokenContexts.mask`: False at BOS/EOS/pad).

  Returns:
    (nll [batch, seq - 1] float32, zero where masked; weights [batch, seq - 1]
    float32 in {0, 1}).
  """
  if logits.shape[:2] != tokens.shape:
    raise ValueError(
        f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree"
        f" on [batch, seq].")
  logits = logits[:, :-1].astype(jnp.float32)
  targets = tokens[:, 1:]
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
  if loss_mask is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  else:
    if loss_mask.shape != tokens.shape:
      raise ValueError(
          f"loss_mask has shape {tuple(loss_mask.shape)}; it must match tokens"
          f" {tuple(tokens.shape)}.")
    weights = loss_mask[:, 1:].astype(jnp.float32)
  return nll * weights, weights


def mean_nll(logits: jax.Array, tokens: jax.Array,
             loss_mask: jax.Array | None = None) -> jax.Array:
  """Mean next-token NLL over counted targets (exp of it is the perplexity)."""
  nll, weights = token_nll(logits, tokens, loss_mask)
  return nll.sum() / jnp.maximum(weights.sum(), 1.0)
