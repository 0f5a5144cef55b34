"""Stage records: what defines each pipeline output, so it is reused only when that matches.

Every stage output (tokenised contexts, activation shards, evaluation, export)
carries a *definition*: a JSON dict of the inputs that determine it (config
fields, upstream fingerprints, the LM's name, dtype and checkpoint fingerprint,
the text source). A later run computes the definition it wants and compares:
equal -> reuse; different -> the stage re-runs and says which fields changed,
or, where re-running would destroy work (a finished activation dataset that
SAEs may have been trained on), refuses with the fields and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

_EDGE_BYTES = 1 << 20


def fingerprint(obj: Any) -> str:
  """16 hex digits of sha256 over `obj`'s canonical JSON."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def array_fingerprint(*arrays) -> str:
  """16 hex digits of sha256 over the arrays' shapes, dtypes and bytes."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(np.asarray(a))
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike) -> str:
  """A content fingerprint of a file (or a directory's files) that stays cheap on
  multi-GB checkpoints: size plus sha256 of the first and last MiB of each file."""
  path = Path(path)
  files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
  h = hashlib.sha256()
  for f in files:
    size = f.stat().st_size
    h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{size}".encode())
    with open(f, "rb") as fh:
      h.update(fh.read(_EDGE_BYTES))
      if size > 2 * _EDGE_BYTES:
        fh.seek(size - _EDGE_BYTES)
        h.update(fh.read(_EDGE_BYTES))
  return h.hexdigest()[:16]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def differences(saved: dict | None, wanted: dict) -> list[str]:
  """'field: was X, now Y' for each (dotted) field where `saved` and `wanted` differ.

  `saved` None (an output written before jsae recorded definitions) differs in
  one line that says so.
  """
  if saved is None:
    return ["no definition recorded (written by an older jsae)"]
  a, b = _flatten(json.loads(json.dumps(saved, default=str))), _flatten(
      json.loads(json.dumps(wanted, default=str)))
  return [f"{k}: was {a.get(k, '(absent)')!r}, now {b.get(k, '(absent)')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


__all__ = ["array_fingerprint", "differences", "file_fingerprint", "fingerprint"]
