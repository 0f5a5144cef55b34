"""The language model on a device mesh: one spec per parameter, placement, batches.

The LM is sharded Megatron-style (Shoeybi et al., 2019) over the mesh's `model` axis
and its batch over `data`:

  embed [vocab, d]     -> P("model", None)     vocabulary-parallel: the embedding
                                               lookup is a local masked gather and one
                                               all-reduce; the tied unembedding gives
                                               logits sharded over the vocabulary, whose
                                               log-sum-exp and target logit are reduced
                                               across devices (no device holds [.., vocab])
  q [d, H, h], o [H, h, d]   -> by heads       attention is local to a device's heads;
  k, v [d, K, h]       -> by KV heads          o's output needs one all-reduce
                          (replicated when K is not a multiple of `model`)
  gate, up [d, f]      -> P(None, "model")     the MLP is local to a device's d_ff slice;
  down [f, d]          -> P("model", None)     down's output needs one all-reduce
  norms                -> P()
  tokens [b, s]        -> P("data", None)

XLA's SPMD partitioner (GSPMD) inserts the collectives from the parameters'
shardings, so `gemma.forward` itself is unchanged. A mesh lives on one process's
devices (`jax.local_devices()`): several processes each run their own LM mesh on their
own share of the contexts, as the multi-process harvest and evaluation split them.

The params carry their placement: `mesh_of(params)` recovers the mesh, so the harvest,
the evaluation and the browser put their batches where the params are
(`put_batch`) without a mesh argument.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jsae.lm import gemma

__all__ = ["LMMeshError", "TABLE", "param_specs", "valid_model_sizes", "check_mesh", "resolve_shape", "shape_for", "smallest_fitting_model",
           "make_mesh", "place", "mesh_of", "data_size", "put_batch", "replicate",
           "per_device_param_bytes", "round_batch"]



class LMMeshError(ValueError):
  """An LM mesh that does not fit the devices or does not divide the model."""


# Every parameter's split, by the name of the dimension split over `model`, per axis:
# 'vocab', 'heads', 'kv_heads' or 'ff' (None: that axis is whole on every device).
TABLE: dict[str, tuple[str | None, ...]] = {
    "embed": ("vocab", None),
    "final_norm": (None,),
    "attn_norm": (None,),
    "q": (None, "heads", None),
    "k": (None, "kv_heads", None),
    "v": (None, "kv_heads", None),
    "o": ("heads", None, None),
    "q_norm": (None,),
    "k_norm": (None,),
    "post_attn_norm": (None,),
    "mlp_norm": (None,),
    "gate": (None, "ff"),
    "up": (None, "ff"),
    "down": ("ff", None),
    "post_mlp_norm": (None,),
}


def _sizes(config: gemma.GemmaConfig) -> dict[str, int]:
  return dict(vocab=config.vocab_size, heads=config.n_heads, kv_heads=config.n_kv_heads,
              ff=config.d_ff)


def _sizes_of(params: gemma.Params) -> dict[str, int]:
  """The split dimensions' sizes read off a params tree."""
  layer = params["layers"][0]
  return dict(vocab=params["embed"].shape[0], heads=layer["q"].shape[1],
              kv_heads=layer["k"].shape[1], ff=layer["gate"].shape[1])


def _spec(name: str, sizes: dict[str, int], model: int) -> P:
  if name not in TABLE:
    raise ValueError(f"jsae.lm.mesh.TABLE has no sharding for the LM parameter {name!r};"
                     " add one (every parameter is named, never replicated by default).")
  # KV heads fewer than the model axis (Gemma 3's single KV head) stay whole: each
  # device's query heads read the same K and V.
  split = lambda dim: dim is not None and model > 1 and sizes[dim] % model == 0
  return P(*("model" if split(dim) else None for dim in TABLE[name]))


def param_specs(config: gemma.GemmaConfig, model: int) -> gemma.Params:
  """PartitionSpecs of `gemma.param_shapes(config)` on a mesh with `model` devices on
  the model axis (a tree of the params' structure)."""
  return _specs_of(gemma.param_shapes(config), _sizes(config), model)


def _specs_of(tree: gemma.Params, sizes: dict[str, int], model: int) -> gemma.Params:
  return {"embed": _spec("embed", sizes, model),
          "final_norm": _spec("final_norm", sizes, model),
          "layers": [{k: _spec(k, sizes, model) for k in layer} for layer in tree["layers"]]}


def valid_model_sizes(config: gemma.GemmaConfig, n_devices: int) -> list[int]:
  """The model-axis sizes that divide `n_devices`, the heads, d_ff and the vocabulary."""
  return [m for m in range(1, n_devices + 1) if n_devices % m == 0 and not
          (config.n_heads % m or config.d_ff % m or config.vocab_size % m)]


def check_mesh(config: gemma.GemmaConfig, data: int, model: int, n_devices: int) -> None:
  """Raises LMMeshError (naming the axis, the sizes and the sizes that work) when a
  data x model LM mesh does not fit `n_devices` or does not divide the model."""
  if data < 1 or model < 1 or data * model > n_devices:
    raise LMMeshError(
        f"config.lm.mesh: data={data} x model={model} needs {data * model} devices, but this"
        f" process has {n_devices}; choose sizes whose product is at most {n_devices}"
        f" (model sizes that work for {config.name}: {valid_model_sizes(config, n_devices)}).")
  for what, size in (("n_heads", config.n_heads), ("d_ff", config.d_ff),
                     ("vocab_size", config.vocab_size)):
    if size % model:
      raise LMMeshError(
          f"config.lm.mesh.model={model} does not divide {config.name}'s {what}={size}: the"
          f" model axis splits the attention heads, the MLP's d_ff and the vocabulary. Model"
          f" sizes that work on {n_devices} devices: {valid_model_sizes(config, n_devices)}.")


def per_device_param_bytes(config: gemma.GemmaConfig, model: int, dtype="float32") -> int:
  """Bytes of LM parameters on one device of a mesh with `model` devices on its model
  axis: matrices in `dtype`, norm vectors float32 (as `place` stores them)."""
  specs = param_specs(config, model)
  total = 0
  for shape, spec in zip(jax.tree.leaves(gemma.param_shapes(config), is_leaf=_is_shape),
                         jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))):
    itemsize = 4 if len(shape) == 1 else np.dtype(jnp.dtype(dtype)).itemsize
    per = [-(-n // (model if axis == "model" else 1)) for n, axis in
           zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))]
    total += math.prod(per) * itemsize
  return int(total)


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def resolve_shape(mesh_config: Mapping[str, Any] | Any, config: gemma.GemmaConfig,
                  devices, *, dtype="float32", headroom: float = 0.5) -> tuple[int, int]:
  """(data, model) of the LM mesh from `config.lm.mesh` on this process's `devices`
  (`shape_for` with their count, memory and platform)."""
  on_cpu = devices[0].platform == "cpu"
  memory = None if on_cpu else (devices[0].memory_stats() or {}).get("bytes_limit")
  return shape_for(mesh_config, config, n_devices=len(devices), memory_bytes=memory,
                   on_cpu=on_cpu, dtype=dtype, headroom=headroom)


def shape_for(mesh_config: Mapping[str, Any] | Any, config: gemma.GemmaConfig, *,
              n_devices: int, memory_bytes: int | None, on_cpu: bool = False,
              dtype="float32", headroom: float = 0.5) -> tuple[int, int]:
  """(data, model) of `config.lm.mesh` on `n_devices` devices of `memory_bytes` each.

  0 means auto. On CPU, auto is one device for both axes: CPU devices share the host's
  cores and memory, so splitting the LM over them gains nothing. Elsewhere, auto model
  is the smallest valid size at which the weights take at most `headroom` of a device's
  memory (the rest is for activations), and auto data is every device `model` leaves
  (-1 means that too). Explicit sizes are checked, never changed; a model axis whose
  weight share does not fit a device is refused, naming the smallest that fits.
  """
  data, model = int(mesh_config["data"]), int(mesh_config["model"])
  room = n_devices // data if data > 0 else n_devices  # an explicit data axis leaves this
  if model == 0:
    sizes = [m for m in valid_model_sizes(config, n_devices) if m <= room] or [1]
    fitting = None if on_cpu or not memory_bytes else smallest_fitting_model(
        config, n_devices, memory_bytes, dtype, headroom, max_model=room)
    # Unknown memory: one device's worth; nothing fits with headroom: the widest split.
    model = fitting or (1 if on_cpu or not memory_bytes else sizes[-1])
  if data == 0:
    data = 1 if on_cpu else n_devices // model
  elif data == -1:
    data = n_devices // model
  check_mesh(config, data, model, n_devices)
  weights = per_device_param_bytes(config, model, dtype)
  if memory_bytes and weights > memory_bytes:
    fitting = smallest_fitting_model(config, n_devices, memory_bytes, dtype, 1.0,
                                     max_model=room)
    fix = (f"the smallest model axis that fits is {fitting} (--config.lm.mesh.model={fitting})"
           if fitting else f"no model axis of {n_devices} devices fits: use more devices per"
           " process or a narrower dtype (config.lm.dtype=bfloat16)")
    raise LMMeshError(
        f"config.lm.mesh.model={model}: {config.name}'s {dtype} weights take"
        f" {weights / 2**30:.1f} GiB on each device, more than its {memory_bytes / 2**30:.1f}"
        f" GiB; {fix}.")
  return data, model


def smallest_fitting_model(config: gemma.GemmaConfig, n_devices: int, memory_bytes: int,
                           dtype="float32", headroom: float = 0.5,
                           max_model: int | None = None) -> int | None:
  """The smallest valid model axis (at most `max_model`) whose weight share is at most
  `headroom` of a device's `memory_bytes` (None: none is)."""
  return next((m for m in valid_model_sizes(config, n_devices)
               if (max_model is None or m <= max_model)
               and per_device_param_bytes(config, m, dtype) <= headroom * memory_bytes), None)


def make_mesh(data: int, model: int, devices=None) -> Mesh:
  """A ('data', 'model') mesh over the first data x model of `devices` (default: this
  process's devices)."""
  devices = list(jax.local_devices() if devices is None else devices)
  grid = np.asarray(devices[:data * model]).reshape(data, model)
  return Mesh(grid, ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))


def place(params: gemma.Params, mesh: Mesh, dtype=jnp.float32) -> gemma.Params:
  """The params (host NumPy or device arrays) on `mesh` by `param_specs`: matrices in
  `dtype`, norms float32.

  From the host, each device receives only its slice, cut from the one host copy: no
  device ever holds a whole sharded tensor. Device arrays (an Orbax restore onto the
  mesh) are cast and laid out where they are.
  """
  specs = _specs_of(params, _sizes_of(params), mesh.shape["model"])

  def put(a, spec):
    want = jnp.float32 if np.ndim(a) == 1 else dtype
    sharding = NamedSharding(mesh, spec)
    if isinstance(a, jax.Array):  # already on devices: cast and lay out there
      return jax.device_put(a.astype(want) if a.dtype != want else a, sharding)
    host = np.asarray(a)
    host = host.astype(want) if host.dtype != want else host
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree.map(put, params, specs, is_leaf=lambda x: hasattr(x, "shape"))


def mesh_of(params: gemma.Params) -> Mesh | None:
  """The mesh the params were placed on by `place`, or None (one device)."""
  sharding = getattr(params["embed"], "sharding", None)
  if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
    return sharding.mesh
  return None


def data_size(params: gemma.Params) -> int:
  """Devices along the data axis of the params' mesh (1 without a mesh)."""
  mesh = mesh_of(params)
  return 1 if mesh is None else mesh.shape["data"]


def round_batch(batch_size: int, params: gemma.Params) -> int:
  """`batch_size` rounded up to a multiple of the data axis (every device gets contexts)."""
  data = data_size(params)
  return -(-int(batch_size) // data) * data


def put_batch(params: gemma.Params, x) -> jax.Array:
  """A batch `x: [batch, ...]` split over the data axis of the params' mesh (as it is
  without one); batch must be a multiple of the data axis (`round_batch`)."""
  mesh = mesh_of(params)
  if mesh is None:
    return jnp.asarray(x)
  x = np.asarray(x)
  spec = P("data", *([None] * (x.ndim - 1)))
  return jax.device_put(x, NamedSharding(mesh, spec))


def replicate(params: gemma.Params, tree):
  """`tree` (an SAE, accumulators) copied whole to every device of the params' mesh, so
  jitted functions see one set of devices (as it is without a mesh)."""
  mesh = mesh_of(params)
  if mesh is None:
    return tree
  return jax.device_put(tree, NamedSharding(mesh, P()))
