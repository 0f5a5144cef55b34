"""Stop requests for a training loop: SIGTERM (preemption) and Ctrl-C save, then stop.

The loop asks `stop.reached(step)` after each step; when it says yes, the loop
saves a checkpoint and returns, and running the same command again resumes.
A second Ctrl-C exits at once (KeyboardInterrupt, no checkpoint).

Multi-process runs use JAX's preemption sync point instead (the checkpoint
manager's `reached_preemption`), so that every process stops after the same step.
"""

from __future__ import annotations

import signal
import threading

import jax
from tqdm.auto import tqdm

_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}


class StopRequests:
  """A context manager that turns SIGTERM / the first Ctrl-C into a stop flag.

  Attributes:
    reason: 'SIGTERM' or 'Ctrl-C' once a stop was requested, else None.
  """

  def __init__(self, manager):
    self.manager, self.reason, self._previous = manager, None, {}
    self.multiprocess = jax.process_count() > 1

  def __enter__(self) -> "StopRequests":
    if not self.multiprocess and threading.current_thread() is threading.main_thread():
      for signum in _NAMES:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.reason is not None:
      raise KeyboardInterrupt  # the second Ctrl-C: exit now
    self.reason = _NAMES[signum]
    if signum == signal.SIGINT:
      tqdm.write("Ctrl-C: saving a checkpoint after this step, then stopping"
                 " (Ctrl-C again exits at once, without it)")

  def reached(self, step: int) -> bool:
    """True when the loop should save and stop after `step`."""
    if self.multiprocess:
      if self.manager.reached_preemption(step):
        self.reason = self.reason or "SIGTERM"
        return True
      return False
    return self.reason is not None

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


__all__ = ["StopRequests"]
