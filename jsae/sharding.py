"""Device mesh, parameter shardings and multi-host initialisation.

Mesh axes are `data` (batch) and `model` (latents). The SAE is sharded
Megatron-style along its latent axis, as Gemma Scope trained its wide SAEs:

  W_enc [d_in, d_sae]  -> P(None, "model")   encoder matmul is local
  W_dec [d_sae, d_in]  -> P("model", None)   decoder output needs one psum
  per-latent vectors   -> P("model")         (b_enc, threshold, Gated's b_gate, ...)
  b_dec [d_in]         -> P()
  batch [B, d_in]      -> P("data", None)

Each family names the spec of every parameter it has (`Family.param_spec_table`).

Optimizer state follows its parameter; XLA (GSPMD) inserts the collectives.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jsae.config import ConfigError

BATCH_SPEC = P("data", None)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
  """(data, model) sizes from `config.mesh`, resolving one -1 to 'the rest'."""
  data, model = int(mesh_config.data), int(mesh_config.model)
  if data == -1 and model == -1:
    raise ConfigError("config.mesh: only one of data/model may be -1.")
  if data == -1:
    data = num_devices // model if model > 0 and num_devices % model == 0 else 0
  if model == -1:
    model = num_devices // data if data > 0 and num_devices % data == 0 else 0
  if data <= 0 or model <= 0 or data * model != num_devices:
    raise ConfigError(
        f"config.mesh: data={mesh_config.data} x model={mesh_config.model} does not"
        f" use the {num_devices} available devices; choose sizes whose product is"
        f" {num_devices} (or -1 for one of them).")
  return data, model


def make_mesh(mesh_config, devices=None, *, sweep: int | None = None) -> Mesh:
  """A 2-D ('data', 'model') mesh over `devices` (default: all) from `config.mesh`.

  With `sweep` (the size of a sweep's member axis, `config.mesh.sweep`) the mesh
  is 3-D, ('sweep', 'data', 'model'): members are split over 'sweep' and each
  member's batch and latents over the other two. An explicit mesh smaller than
  the device count uses the first devices (single-process runs only; useful for
  debugging and tests).
  """
  devices = jax.devices() if devices is None else devices
  members = 1 if sweep is None else int(sweep)
  if members < 1 or len(devices) % members:
    raise ConfigError(f"config.mesh.sweep={sweep} does not divide the {len(devices)}"
                      " devices; pick a divisor of the device count (1 keeps every member"
                      " on every device).")
  wanted = members * int(mesh_config.data) * int(mesh_config.model)
  if wanted > 0 and wanted < len(devices) and jax.process_count() == 1:
    devices = devices[:wanted]
  data, model = mesh_shape(mesh_config, len(devices) // members)
  if sweep is None:
    grid = np.asarray(devices).reshape(data, model)
    return Mesh(grid, ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
  grid = np.asarray(devices).reshape(members, data, model)
  return Mesh(grid, ("sweep", "data", "model"), axis_types=(AxisType.Auto,) * 3)


def check_divisible(mesh: Mesh, *, d_sae: int, batch_size: int) -> None:
  """Raises ConfigError when the latents or the batch do not split over the mesh."""
  data, model = mesh.shape["data"], mesh.shape["model"]
  if d_sae % model:
    raise ConfigError(f"config.sae.d_sae={d_sae} is not divisible by the mesh's model"
                      f" axis ({model}); pick a d_sae that is a multiple of {model}.")
  if batch_size % data:
    raise ConfigError(f"config.data.batch_size={batch_size} is not divisible by the mesh's"
                      f" data axis ({data}); pick a multiple of {data}.")


def state_specs(state: Any, family) -> Any:
  """PartitionSpecs for a TrainState: the family names every parameter's spec.

  Optimizer states hold trees of the params' type (e.g. Adam's second moment);
  those follow the family's table too. A parameter the family has no spec for
  is an error (never a silent replication). Scalars (step, counters) are
  replicated; `steps_since_fired` is per latent; the family state is the family's.
  """
  params_type = family.params_type

  def spec(node):
    if isinstance(node, params_type):
      return family.param_specs(node)
    return P()

  def is_leaf(node):
    return isinstance(node, params_type)

  rest = state.replace(family_state=None)
  specs = jax.tree.map(spec, rest, is_leaf=is_leaf)
  return specs.replace(steps_since_fired=P("model"),
                       family_state=family.state_specs(state.family_state))


def per_device_bytes(abstract: Any, specs: Any, axis_sizes: dict[str, int]) -> int:
  """Bytes one device holds of `abstract` laid out by `specs` on a mesh of `axis_sizes`.

  Needs no devices (dry runs of pod meshes on a laptop): each dimension is
  split over the product of the axes its spec entry names, rounded up.
  """
  leaves = jax.tree.leaves(abstract)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
  if len(leaves) != len(spec_leaves):
    raise ValueError(f"{len(leaves)} arrays but {len(spec_leaves)} specs.")
  total = 0
  for leaf, spec in zip(leaves, spec_leaves):
    size = 1
    for i, dim in enumerate(leaf.shape):
      names = spec[i] if i < len(spec) else None
      names = () if names is None else (names,) if isinstance(names, str) else names
      split = int(np.prod([axis_sizes.get(n, 1) for n in names]))
      size *= -(-dim // split)
    total += size * np.dtype(leaf.dtype).itemsize
  return int(total)


def named(mesh: Mesh, specs: Any) -> Any:
  """NamedShardings on `mesh` for a pytree of PartitionSpecs."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, P))


def global_batch(local_rows, sharding: NamedSharding, global_rows: int) -> jax.Array:
  """This process's rows `[global_rows / processes, d_in]` -> the global `[global_rows, d_in]` array."""
  local_rows = np.asarray(local_rows) if not isinstance(local_rows, jax.Array) else local_rows
  return jax.make_array_from_process_local_data(
      sharding, local_rows, (global_rows, local_rows.shape[-1]))


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (a no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def initialize_distributed(*, coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, label: str = "jsae") -> bool:
  """Starts `jax.distributed` when this is a multi-process run; returns whether it did.

  Explicit arguments win; then the JSAE_COORDINATOR / JSAE_NUM_PROCESSES /
  JSAE_PROCESS_ID environment variables (used by launch/local.sh); then JAX's own
  cluster detection (TPU pods, SLURM) when `JSAE_DISTRIBUTED=auto`. Single-process
  runs need nothing. A multi-process run also starts `jsae.peers`' watcher, so that
  a failure on one process stops all of them within seconds; `label` (e.g.
  'jsae harvest') begins its messages.
  """
  env = os.environ
  coordinator = coordinator or env.get("JSAE_COORDINATOR")
  if num_processes is None and "JSAE_NUM_PROCESSES" in env:
    num_processes = int(env["JSAE_NUM_PROCESSES"])
  if process_id is None and "JSAE_PROCESS_ID" in env:
    process_id = int(env["JSAE_PROCESS_ID"])
  if coordinator:
    if num_processes is None or process_id is None:
      raise ConfigError("a coordinator address needs the number of processes and this"
                        " process's id (JSAE_NUM_PROCESSES, JSAE_PROCESS_ID).")
    # CPU devices need a collectives implementation across processes; this
    # setting affects only the CPU backend, and must precede backend start-up.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=num_processes, process_id=process_id)
    _watch_peers(label)
    return True
  if env.get("JSAE_DISTRIBUTED") == "auto":
    jax.distributed.initialize()  # TPU pod / SLURM / other detected clusters
    _watch_peers(label)
    return True
  return False


def _watch_peers(label: str) -> None:
  """Starts `jsae.peers` on the connection `jax.distributed.initialize` just made."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  from jsae import peers  # pylint: disable=import-outside-toplevel
  state = distributed.global_state  # JAX keeps its client here; there is no public accessor
  if state.client is not None and state.num_processes:
    peers.start(state.client, state.process_id, state.num_processes, label=label)
