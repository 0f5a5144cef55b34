"""One Orbax CheckpointManager factory: save every N steps, keep the last K, auto-resume.

A checkpoint holds the `TrainState` (params, optimizer state, step, firing
counters) and a JSON `meta` item (shapes, family, normalisation constant, data
seed, the whole config). Batches are a function of (seed, step), so the step is
the whole data position: resuming needs no iterator state.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

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


class CheckpointDamagedError(OSError):
  """A checkpoint step that cannot be read back (truncated or partly deleted files).

  Attributes:
    step: the damaged step.
    directory: the checkpoints directory.
  """

  def __init__(self, directory, step: int, cause: BaseException):
    self.step, self.directory = step, directory
    reason = next((l.strip() for l in str(cause).splitlines() if l.strip()), type(cause).__name__)
    reason = reason.split(" See full TensorStore details")[0][:300]
    super().__init__(f"checkpoint step {step} in {directory} is damaged (truncated or"
                     f" partly deleted files: {reason})")


def _restore(manager: ocp.CheckpointManager, step: int, args) -> Any:
  """`manager.restore`, with a failure to read the step's files as CheckpointDamagedError."""
  # Before the read, not after its failure: TensorStore's reader threads may post an
  # echo while the error is still on its way up to the except clause below.
  silence_orbax_echoes()
  try:
    return manager.restore(step, args=args)
  except (KeyboardInterrupt, MemoryError):
    raise
  except Exception as e:  # Orbax and TensorStore raise many types for unreadable files
    raise CheckpointDamagedError(manager.directory, step, e) from e


# What Orbax's parallel readers leave behind when a checkpoint read fails: each
# failed coroutine, and the thread that posts to the closed event loop, prints a
# traceback of the error the caller already got (as CheckpointDamagedError), some
# of them later, when the coroutines are collected.
_ORBAX_ECHOES = ("Encountered error while reading array index", "Event loop is closed")


def silence_orbax_echoes() -> None:
  """Drops those echo tracebacks, process-wide and once (installed before the first
  restore); every other unraisable exception or thread error is reported as before."""
  import sys  # pylint: disable=import-outside-toplevel
  import threading  # pylint: disable=import-outside-toplevel
  if getattr(sys.unraisablehook, "jsae_drops_orbax_echoes", False):
    return
  unraisable_hook, thread_hook = sys.unraisablehook, threading.excepthook

  def is_echo(exc) -> bool:
    return exc is not None and any(e in str(exc) for e in _ORBAX_ECHOES)

  def unraisable(u):
    return None if is_echo(u.exc_value) else unraisable_hook(u)

  def thread_error(a):
    return None if is_echo(a.exc_value) else thread_hook(a)

  unraisable.jsae_drops_orbax_echoes = True
  sys.unraisablehook, threading.excepthook = unraisable, thread_error


def newest_intact(manager: ocp.CheckpointManager, read: Callable[[int], Any], *,
                  say: Callable[[str], None] = print) -> tuple[int, Any] | tuple[None, None]:
  """(step, read(step)) for the newest checkpoint `read` can read; (None, None) if none exist.

  Damaged newer steps are reported through `say`, and skipped; when every step
  is damaged, the newest one's CheckpointDamagedError is raised.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  first_error = None
  for step in steps:
    try:
      value = read(step)
    except CheckpointDamagedError as e:
      first_error = first_error or e
      say(f"{e}; trying the previous checkpoint")
      continue
    if first_error is not None:
      say(f"using checkpoint step {step}, the newest intact one")
    return step, value
  if first_error is not None:
    raise first_error
  return None, None


def resume_newest_intact(workdir, manager: ocp.CheckpointManager, read: Callable[[int], Any], *,
                         say: Callable[[str], None] = print) -> tuple[int, Any]:
  """`newest_intact` for a run about to continue: damaged newer steps are moved aside
  (`quarantine`, by process 0) so the run can write those steps again."""
  from jsae import sharding  # pylint: disable=import-outside-toplevel
  steps_before = sorted(manager.all_steps())
  step, value = newest_intact(manager, read, say=say)
  damaged = [s for s in steps_before if step is not None and s > step]
  if damaged:
    if jax.process_index() == 0:
      moved = quarantine(workdir, damaged)
      say(f"moved damaged checkpoint(s) {damaged} to {moved[0].parent} (kept for"
          f" inspection); resuming from step {step}")
    sharding.barrier("jsae_quarantine")
    manager.reload()
  return step, value


def quarantine(workdir, steps: list[int]) -> list[Path]:
  """Moves damaged checkpoint steps to WORKDIR/damaged_checkpoints/STEP (kept, not
  deleted), so that a resumed run can write those steps again. Local disks only."""
  moved = []
  for step in steps:
    source = Path(workdir) / "checkpoints" / str(step)
    target = Path(workdir) / "damaged_checkpoints" / str(step)
    if source.exists():
      target.parent.mkdir(parents=True, exist_ok=True)
      if target.exists():
        shutil.rmtree(target)
      os.replace(source, target)
      moved.append(target)
  return moved


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
  return read_meta(manager, step)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """The `meta` item of checkpoint `step` (CheckpointDamagedError if unreadable)."""
  restored = _restore(manager, step, ocp.args.Composite(meta=ocp.args.JsonRestore()))
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
  restored = _restore(manager, step, ocp.args.Composite(
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
  restored = _restore(manager, step, ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      meta=ocp.args.JsonRestore()))
  return restored.state, dict(restored.meta)


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings, where set) of a pytree of arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)
