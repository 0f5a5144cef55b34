"""One benchmark measurement, the machine it ran on, and how every benchmark prints it.

Each benchmark prints its human table and, with `--json`, one JSON object per
measurement on its own line (`Measurement.to_json`): what was measured, its
shape, tokens/s, the baseline measured in the same run and the ratio of the
two, the issue's target for that ratio where there is one, and the machine.
`bench/run.py` collects these lines from every benchmark into
`docs/performance/<machine>.jsonl` and renders `docs/performance.md`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import time
from typing import Any, Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Measurement:
  """One row of the performance table.

  bench: the benchmark script's name ("eval", "train_step", ...).
  name: what was measured ("sparse JumpReLU step, L0 50").
  shape: the problem size, e.g. "640x16384x4096" (d_in x d_sae x batch).
  tokens_per_s: the measured throughput (rows of activations or LM tokens per second).
  baseline: what the ratio divides by, measured in the same run ("dense step").
  baseline_tokens_per_s: the baseline's throughput (None where the baseline is a peak rate).
  ratio: measured / baseline (higher is better), or MFU where the baseline is the peak.
  target: the issue's target for `ratio` ("ratio >= 2"), or "" where there is none.
  met: whether `target` is met (None without a target).
  machine: `machine()` of the host that ran it.
  detail: anything else worth one short line (memory per device, compile time).
  """

  bench: str
  name: str
  shape: str
  tokens_per_s: float | None
  baseline: str
  baseline_tokens_per_s: float | None
  ratio: float | None
  machine: str
  target: str = ""
  met: bool | None = None
  detail: str = ""

  def to_json(self) -> str:
    """One line of JSON (NaN written as null)."""
    clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
             for k, v in dataclasses.asdict(self).items()}
    return json.dumps(clean, sort_keys=False)

  @classmethod
  def from_json(cls, line: str) -> "Measurement":
    """The inverse of `to_json`; raises ValueError naming the missing or unknown fields."""
    record = json.loads(line)
    fields = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING}
    if missing := required - record.keys():
      raise ValueError(f"measurement lacks {sorted(missing)}: {line[:200]}")
    if unknown := record.keys() - fields:
      raise ValueError(f"measurement has unknown fields {sorted(unknown)}: {line[:200]}")
    return cls(**record)


def at_least(ratio: float | None, bound: float) -> tuple[str, bool | None]:
  """(target text, met) for a target `ratio >= bound`."""
  return f"ratio >= {bound:g}", (None if ratio is None else bool(ratio >= bound))


def machine() -> str:
  """The accelerator kind and count, or the CPU model and core count: e.g.
  "NVIDIA H200 x1" or "CPU AMD EPYC, 2 cores"."""
  import jax  # pylint: disable=import-outside-toplevel  (the loader bench runs without it)
  device = jax.devices()[0]
  if device.platform != "cpu":
    return f"{device.device_kind} x{jax.device_count()}"
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    model = names[0] if names else model
  except OSError:
    pass
  return f"CPU {model}, {len(os.sched_getaffinity(0))} cores"


def machine_slug(name: str) -> str:
  """A file-name form of `machine()`: "cpu-amd-epyc-2-cores"."""
  return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def median_seconds(fn: Callable[..., Any], *args, repeats: int) -> float:
  """Median wall seconds of `fn(*args)` (outputs blocked on) after one warm-up call."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def emit(measurements: list[Measurement], as_json: bool) -> None:
  """Prints each measurement as one JSON line when `as_json` (the human table is the caller's)."""
  if as_json:
    for m in measurements:
      print(m.to_json(), flush=True)
