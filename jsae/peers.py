"""One process of a multi-process run fails or dies: every process stops, saying why.

Without this, the processes of a `jax.distributed` run that did not fail wait for
the one that did: at a barrier or a collective until JAX's heartbeat timeout
(100 s) aborts them with a C++ stack dump, or, after the failed process's own
exit, in JAX's shutdown barrier (300 s) where SIGTERM does not reach them (JAX's
preemption notifier takes it).

Each process runs a watcher thread that talks to the others through JAX's
coordination service, the key-value store of the connection `jax.distributed`
already made (process 0 hosts it):

  jsae/peers/alive/K   a counter process K raises every POLL_S seconds
  jsae/peers/error/K   one line: what went wrong, set by the process that saw it
  jsae/peers/seen/K    process K read an error and is leaving
  jsae/peers/done/K    process K is exiting normally (its counter stops on purpose)

A process that fails (`leave`) prints its own message, publishes a line, and
exits with `os._exit`, so that JAX's shutdown barrier cannot hold it. The other
watchers read the line within POLL_S and leave too, printing it. A process whose
counter stops for `timeout_s` (killed, or crashed below Python) is published
by the first process to notice, and everyone leaves the same way. Process 0
leaves last: when it goes, the coordination service goes, and JAX then aborts
any process still connected before it can print why.

One limit: when process 0 itself is killed, JAX aborts the others at once with
its own message ("the JAX distributed service detected fatal errors"), not this
module's.
"""

from __future__ import annotations

import atexit
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import NoReturn

ROOT = "jsae/peers/"
POLL_S = 0.5  # how often each watcher raises its counter and reads the others'
TIMEOUT_S = 10.0  # a counter unchanged this long: that process is gone (JSAE_PEER_TIMEOUT_S)
ACK_WAIT_S = 3.0  # how long process 0 waits for the others to read its line before leaving

_watcher: "_Watcher | None" = None


# ------------------------------------------------------------------ pure logic

def last_changes(previous: dict[int, tuple[str, float]], entries: dict[str, str], now: float,
                 count: int) -> dict[int, tuple[str, float]]:
  """{process: (its counter, when it last changed)} after reading `entries`.

  Args:
    previous: the same map from the last read ({} at the start).
    entries: {key: value} of the store under ROOT.
    now: the reader's clock (seconds); no process compares clocks with another.
    count: the number of processes.
  A process not seen yet counts from `now` of the first read.
  """
  out = {}
  for k in range(count):
    beat = entries.get(f"{ROOT}alive/{k}", "")
    old = previous.get(k)
    out[k] = old if old is not None and old[0] == beat else (beat, now)
  return out


def news(entries: dict[str, str], changes: dict[int, tuple[str, float]], *, me: int,
         count: int, now: float, timeout_s: float) -> tuple[int, str, bool] | None:
  """(process, line, published) when another process failed or went silent, else None.

  `published` is True for a line that `process` already set (read it and leave);
  False when `process` went silent and this one noticed (publish it, then leave).
  Processes that finished normally (`done`) are never silent.
  """
  errors = sorted((int(key[len(ROOT) + len("error/"):]), value) for key, value in entries.items()
                  if key.startswith(ROOT + "error/") and key != f"{ROOT}error/{me}")
  if errors:
    return errors[0][0], errors[0][1], True
  for k in range(count):
    if k == me or f"{ROOT}done/{k}" in entries:
      continue
    if now - changes[k][1] > timeout_s:
      return k, (f"process {k} of {count} stopped responding (no heartbeat for"
                 f" {timeout_s:.0f} s): it was killed or crashed; its log says how"), False
  return None


def acknowledged(entries: dict[str, str], *, me: int, count: int, gone: tuple[int, ...] = ()
                 ) -> bool:
  """Whether every other process has read an error, failed itself, or finished
  (processes in `gone`, known to be dead, cannot)."""
  return all(any(f"{ROOT}{kind}/{k}" in entries for kind in ("seen", "error", "done"))
             for k in range(count) if k != me and k not in gone)


def stop_message(label: str, line: str, me: int, count: int) -> str:
  """The paragraph a process prints when another's failure stops it."""
  return (f"{label}: error: {line.rstrip('. ')}. Process {me} of {count} stopped too; fix"
          " that and run the same command again to resume (finished work is kept).")


# -------------------------------------------------------------------- watcher

class _Watcher:
  """The thread that raises this process's counter and reads the others' news."""

  def __init__(self, client, me: int, count: int, label: str, timeout_s: float):
    self.client, self.me, self.count, self.label = client, me, count, label
    self.timeout_s = timeout_s
    self._claim_lock = threading.Lock()
    self._leaver: int | None = None  # the thread that makes this process leave, once one does
    self.finished = False  # set at a normal exit: keep reading errors, stop the counter
    self.wakeup: socket.socket | None = None  # signals that stop this process arrive here
    self.wakeup_writer: socket.socket | None = None  # its other end (kept open)
    self.thread = threading.Thread(target=self._run, name="jsae-peers", daemon=True)

  def claim(self) -> None:
    """Makes the calling thread the one that reports and leaves; parks any other thread
    that tries later (or this one, if another thread claimed first), so that a process
    tells one story."""
    with self._claim_lock:
      if self._leaver is None:
        self._leaver = threading.get_ident()
      mine = self._leaver == threading.get_ident()
    if not mine:
      _park()

  def leaver(self) -> int | None:
    """The thread that claimed this process's exit, if one has."""
    with self._claim_lock:
      return self._leaver

  def entries(self) -> dict[str, str]:
    return dict(self.client.key_value_dir_get(ROOT))

  def _run(self) -> None:
    beat, changes, reached = 0, {}, time.monotonic()
    while True:
      try:
        if not self.finished:
          beat += 1
          self.client.key_value_set(f"{ROOT}alive/{self.me}", str(beat), allow_overwrite=True)
        entries = self.entries()
        reached = time.monotonic()
      except Exception:  # pylint: disable=broad-except
        if self.finished:
          return  # JAX's shutdown closed the connection: a normal end
        if time.monotonic() - reached > self.timeout_s:  # not one slow reply: it is gone
          self._stopped("lost contact with process 0, which hosts JAX's coordination"
                        " service: it was killed or crashed; its log says how", 1)
        self._sleep()
        continue
      now = time.monotonic()
      changes = last_changes(changes, entries, now, self.count)
      found = news(entries, changes, me=self.me, count=self.count, now=now,
                   timeout_s=self.timeout_s)
      if found and (found[2] or not self.finished):  # a finished process's silence is no news
        self.claim()  # parks here when the main thread is reporting its own failure
        if found[2]:
          self._stopped(found[1], 1)
        _say(stop_message(self.label, found[1], self.me, self.count))
        leave(found[1], 1, gone=(found[0],))
      self._sleep()

  def _sleep(self) -> None:
    """Waits POLL_S, or less when a stop signal arrives (then this process leaves)."""
    if self.wakeup is None:
      time.sleep(POLL_S)
      return
    ready, _, _ = select.select([self.wakeup], [], [], POLL_S)
    if ready:
      data = self.wakeup.recv(64)
      name = signal.Signals(data[0]).name if data else "a signal"
      self.claim()
      _say(f"{self.label}: stopped by {name}; the other processes stop too. Run the same"
           " command again to resume (finished work is kept).")
      leave(f"process {self.me} of {self.count} was stopped by {name}",
            128 + (data[0] if data else signal.SIGTERM))

  def _stopped(self, line: str, code: int) -> NoReturn:
    """Another process failed: say so, let it know, leave."""
    self.claim()
    _say(stop_message(self.label, line, self.me, self.count))
    try:
      self.client.key_value_set(f"{ROOT}seen/{self.me}", "1", allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass  # the service is gone; nobody waits for this
    os._exit(code)

  def finish(self) -> None:
    """At a normal exit (before JAX's shutdown barrier): this process's silence is no news."""
    self.finished = True
    try:
      self.client.key_value_set(f"{ROOT}done/{self.me}", "1", allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass


def _say(message: str) -> None:
  """Prints `message` to stderr on a line of its own (a progress bar may be mid-line)."""
  print(f"\n{message}", file=sys.stderr)
  _flush()


def _flush() -> None:
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except
      pass


def _park() -> NoReturn:
  while True:  # os._exit on the other thread ends this one
    time.sleep(3600)


def start(client, process_index: int, process_count: int, *, label: str = "jsae",
          timeout_s: float | None = None) -> None:
  """Starts this process's watcher (once, after `jax.distributed.initialize`).

  Args:
    client: JAX's distributed runtime client (`jax._src.distributed.global_state.client`).
    process_index, process_count: this process and how many there are.
    label: how messages begin, e.g. 'jsae harvest'.
    timeout_s: silence after which a process counts as gone (default TIMEOUT_S, or the
      JSAE_PEER_TIMEOUT_S environment variable).
  """
  global _watcher
  if _watcher is not None or process_count < 2:
    return
  if timeout_s is None:
    timeout_s = float(os.environ.get("JSAE_PEER_TIMEOUT_S", TIMEOUT_S))
  _watcher = _Watcher(client, process_index, process_count, label, timeout_s)
  # atexit runs handlers last-registered first: this one runs before JAX's own
  # (registered when jax was imported), whose shutdown barrier waits for the others.
  atexit.register(_watcher.finish)
  _watcher.thread.start()


def active() -> bool:
  """Whether this process watches the others (a multi-process run started by jsae)."""
  return _watcher is not None


def describe_process() -> str:
  """'process K of N' for messages."""
  return f"process {_watcher.me} of {_watcher.count}" if _watcher else "process 0 of 1"


def before_reporting(exc: BaseException) -> None:
  """Call before the main thread reports `exc`: the watcher stays quiet from then on, or,
  when the other process's failure is the story, tells it instead (and this returns never).

  A collective whose peer died fails at once (gloo: "Connection closed by peer"),
  before the watcher has seen the peer's silence; the peer is the news, not this
  traceback. So an XLA runtime error first waits (at most the silence timeout) for
  the watcher, which exits this process with the peer's story if it finds one.
  """
  w = _watcher
  if w is None:
    return
  if type(exc).__name__ == "JaxRuntimeError":
    deadline = time.monotonic() + w.timeout_s + 3 * POLL_S
    while time.monotonic() < deadline and w.leaver() is None:
      time.sleep(0.1)
  w.claim()


def leave(line: str, code: int, gone: tuple[int, ...] = ()) -> NoReturn:
  """Publishes `line` (what went wrong, one line) to the other processes and exits with `code`.

  The caller has printed its own message. Process 0 first waits (at most ACK_WAIT_S)
  until the others, but those in `gone`, have read it: they lose the coordination
  service when it exits.
  """
  w = _watcher
  if w is None:
    _flush()
    os._exit(code)
  w.claim()
  _flush()
  try:
    w.client.key_value_set(f"{ROOT}error/{w.me}", line, allow_overwrite=True)
    deadline = time.monotonic() + ACK_WAIT_S
    while w.me == 0 and time.monotonic() < deadline:
      if acknowledged(w.entries(), me=w.me, count=w.count, gone=gone):
        break
      time.sleep(0.05)
  except Exception:  # pylint: disable=broad-except
    pass  # the service is gone: the others find out from JAX
  os._exit(code)


def stop_on_signals(signals=(signal.SIGTERM, signal.SIGINT)) -> None:
  """Makes `signals` stop this process and the others at once (main thread only).

  JAX's preemption notifier takes SIGTERM in a multi-process run, and a Python
  handler alone runs only when the main thread next runs Python code, which a
  process waiting at a barrier does not. So the signal wakes the watcher thread
  instead (`signal.set_wakeup_fd`), which leaves. For commands without a
  preemption checkpoint (harvest); training keeps JAX's SIGTERM handling.
  """
  if _watcher is None or _watcher.wakeup is not None:
    return
  reader, writer = socket.socketpair()
  reader.setblocking(False)
  writer.setblocking(False)
  for s in signals:
    signal.signal(s, lambda signum, frame: None)  # the watcher acts; the main thread goes on
  signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
  _watcher.wakeup, _watcher.wakeup_writer = reader, writer


__all__ = ["acknowledged", "active", "before_reporting", "describe_process", "last_changes",
           "leave", "news", "start", "stop_message", "stop_on_signals"]
