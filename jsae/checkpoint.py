"""One Orbax CheckpointManager factory: save every N steps, keep the last K, auto-resume.

A checkpoint holds the `TrainState` (params, optimizer state, step, firing
counters) and a JSON `meta` item (shapes, family, normalisation constant, data
seed, the whole config). Batches are a function of (seed, step), so the step is
the whole data position: resuming needs no iterator state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


def make_manager(workdir: str | os.PathLike, *, max_to_keep: int = 2,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """The run's CheckpointManager over `workdir/checkpoints` (created if missing)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True,
      enable_async_checkpointing=async_save)
  path = (epath.Path(workdir) if "://" in str(workdir)
          else epath.Path(Path(workdir).absolute())) / "checkpoints"
  return ocp.CheckpointManager(path, options=options,
                               item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Saves `state` and the JSON-serialisable `meta` as checkpoint `step`."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      meta=ocp.args.JsonSave(meta)))


def latest_meta(manager: ocp.CheckpointManager) -> dict | None:
  """The `meta` item of the latest checkpoint, or None when there is none."""
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  return dict(restored.meta)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """The `meta` item of checkpoint `step`."""
  restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  return dict(restored.meta)


def restore_fields(manager: ocp.CheckpointManager, step: int, abstract: dict) -> dict:
  """Restores only the named fields of the saved state: `{field: abstract subtree}`.

  A params-only restore (as Google's `gemma` library restores params without
  rebuilding the optimizer): the optimizer state is never read. Leaves of
  `abstract` are `jax.ShapeDtypeStruct`s (with shardings, where wanted).
  """
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                     dtype=a.dtype)
      if getattr(a, "sharding", None) is not None else ocp.RestoreArgs(dtype=a.dtype),
      abstract)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args,
                                   partial_restore=True)))
  return dict(restored.state)


def restore(manager: ocp.CheckpointManager, abstract_state: Any,
            step: int | None = None) -> tuple[Any, dict]:
  """Restores (state, meta) of `step` (default: latest) into `abstract_state`'s structure.

  `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (e.g. from
  `jax.eval_shape`); shardings on its leaves decide where arrays land.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}.")
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      meta=ocp.args.JsonRestore()))
  return restored.state, dict(restored.meta)


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings, where set) of a pytree of arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def write_json(path, obj: Any) -> None:
  """Writes JSON (atomically on local disks: temporary file + rename)."""
  text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
  path = epath.Path(path)
  if "://" in str(path):  # object stores write whole objects atomically
    path.write_text(text)
    return
  tmp = Path(str(path) + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, Path(str(path)))
