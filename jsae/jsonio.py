"""JSON files jsae writes: non-finite numbers as null, atomic replacement on local disks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath


def finite_or_none(obj: Any) -> Any:
  """`obj` for JSON: NaN and infinities as None (JSON null), numpy scalars as Python
  numbers, through dicts, lists and tuples."""
  if isinstance(obj, dict):
    return {k: finite_or_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_or_none(v) for v in obj]
  if isinstance(obj, (np.floating, np.integer, np.bool_)):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def write_json(path, obj: Any) -> None:
  """Writes JSON, non-finite numbers as null (atomically on local disks: temporary
  file + rename)."""
  text = json.dumps(finite_or_none(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
  path = epath.Path(path)
  if "://" in str(path):  # object stores write whole objects atomically
    path.write_text(text)
    return
  tmp = Path(str(path) + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, Path(str(path)))


__all__ = ["finite_or_none", "write_json"]
