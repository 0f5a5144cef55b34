"""Activation shards on disk: the manifest schema, the writer, and validation.

A shard directory holds

    manifest.json          the `Manifest` below (the only file anything parses)
    shard-000000.bin       rows_per_shard rows of d_in values, raw little-endian
    shard-000001.bin       float32 or bfloat16, no header, so `np.memmap` reads
    ...                    them directly; the last shard may be shorter

Every shard is listed in the manifest with its row count and CRC-32; code other
than `ShardWriter` takes file names from the manifest and never parses them.

Writing is crash safe: a shard is written under a temporary name, fsynced and
renamed, and only then listed in the manifest (itself replaced atomically). So the
manifest lists exactly the rows that are durable (`ShardWriter.rows_committed`);
a deterministic producer that crashes restarts producing at that row, and the
resumed writer deletes the leftovers (a half-written temp file, or a renamed
shard the manifest did not list yet).

The normalisation constant C (training divides by it so that E||x/C||^2 = 1) is
sqrt(mean ||x||^2) over every row written, computed on the fly from the stored
(dtype-rounded) rows in float64 and kept per shard, so a resumed write gives the
same C as an uninterrupted one.

Checksums are zlib CRC-32: it detects flipped bytes and truncation, it is in the
standard library, and it streams at ~3.7 GiB/s on one core here (sha256 1.7,
blake2b 0.9 GiB/s; see bench/loader.py), so checking a shard at first open costs
a fraction of reading it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import zlib
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

log = logging.getLogger(__name__)

FORMAT = "jsae-activation-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CHECKSUM = "crc32"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
NORM_METHOD = ("C = sqrt(sum ||x||^2 / N) over all N rows written; ||x||^2 in float64"
               " on the stored (dtype-rounded) rows, summed per shard")

_TMP = ".tmp"
# Names the writer creates; only the writer (and cleanup/diagnostics of its
# leftovers) uses this pattern, readers take names from the manifest.
_WRITER_FILE = re.compile(r"^(shard-\d{6,}\.bin|manifest\.json)(\.tmp)?$")
_READ_CHUNK = 16 << 20  # bytes per read when checksumming: large enough to stream


class ShardError(ValueError):
  """A shard directory is missing, malformed, corrupted or does not fit the config."""


def shard_file_name(index: int) -> str:
  """The writer's file name for shard `index`."""
  return f"shard-{index:06d}.bin"


def storage_dtype(name: str, *, source: str = "dtype") -> np.dtype:
  """The numpy dtype for a manifest dtype name ('float32' or 'bfloat16')."""
  if name not in DTYPES:
    raise ShardError(f"{source}: expected dtype one of {sorted(DTYPES)}, found {name!r}.")
  return DTYPES[name]


# ----------------------------------------------------------------------------- manifest


@dataclasses.dataclass
class Provenance:
  """Where the activations came from (all free-form; recorded, not interpreted).

  Attributes:
    model: model name, e.g. "google/gemma-3-270m".
    revision: model revision / checkpoint hash or file.
    hook_site: "resid_post" | "mlp_out" | "attn_z" | ... .
    layer: layer index of the hook site.
    tokenizer: tokenizer name or file.
    context_length: tokens per packed sequence.
    excluded_tokens: which tokens were not written, e.g. ["<bos>", "<pad>"].
    text_source: the text data set and split.
    extra: anything else the producer wants to record.
  """

  model: str = ""
  revision: str = ""
  hook_site: str = ""
  layer: int | None = None
  tokenizer: str = ""
  context_length: int | None = None
  excluded_tokens: list[str] = dataclasses.field(default_factory=list)
  text_source: str = ""
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-able dict."""
    d = dataclasses.asdict(self)
    d["excluded_tokens"] = list(d["excluded_tokens"])
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any], *, source: str = "provenance") -> "Provenance":
    """Inverse of `to_dict`; unknown keys are an error (likely a typo)."""
    if not isinstance(d, dict):
      raise ShardError(f"{source}: expected 'provenance' to be an object, found {d!r}.")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ShardError(f"{source}: unknown provenance field(s) {unknown}; expected a"
                       f" subset of {sorted(known)} (put others under 'extra').")
    return cls(**d)


@dataclasses.dataclass
class ShardEntry:
  """One shard file as the manifest lists it.

  Attributes:
    file: file name inside the directory.
    rows: number of rows in the file.
    crc32: zlib CRC-32 of the file's bytes, 8 lowercase hex digits.
    sum_sq_norm: sum over the shard's rows of ||x||^2 (float64).
  """

  file: str
  rows: int
  crc32: str
  sum_sq_norm: float


@dataclasses.dataclass
class Manifest:
  """The contents of manifest.json (see the module docstring).

  Attributes:
    d_in: width of one row.
    dtype: "float32" or "bfloat16".
    rows_per_shard: rows in every shard but the last.
    shards: the shard files in row order.
    complete: True once the writer finished; a loader refuses incomplete data.
    provenance: where the rows came from.
    format_version: schema version of this file.
  """

  d_in: int
  dtype: str
  rows_per_shard: int
  shards: list[ShardEntry] = dataclasses.field(default_factory=list)
  complete: bool = False
  provenance: Provenance = dataclasses.field(default_factory=Provenance)
  format_version: int = FORMAT_VERSION

  @property
  def num_rows(self) -> int:
    """Rows (tokens) in all listed shards."""
    return sum(s.rows for s in self.shards)

  @property
  def itemsize(self) -> int:
    """Bytes per value."""
    return storage_dtype(self.dtype).itemsize

  @property
  def row_nbytes(self) -> int:
    """Bytes per row."""
    return self.d_in * self.itemsize

  @property
  def nbytes(self) -> int:
    """Bytes of all listed shards."""
    return self.num_rows * self.row_nbytes

  def shard_starts(self) -> np.ndarray:
    """`[num_shards + 1]` int64: the global index of each shard's first row, then N."""
    return np.concatenate([[0], np.cumsum([s.rows for s in self.shards], dtype=np.int64)
                           ]).astype(np.int64)

  @property
  def sum_sq_norm(self) -> float:
    """sum ||x||^2 over all rows, from the per-shard sums (exactly rounded)."""
    return math.fsum(s.sum_sq_norm for s in self.shards)

  @property
  def norm_scale(self) -> float:
    """C = sqrt(mean ||x||^2), so E||x/C||^2 = 1; 1.0 for an empty dataset."""
    n = self.num_rows
    return math.sqrt(self.sum_sq_norm / n) if n and self.sum_sq_norm > 0 else 1.0

  def fingerprint(self) -> str:
    """8 hex digits identifying the data (layout, files, row counts, checksums).

    Store it with a checkpoint to check that a resumed run reads the same data.
    """
    key = json.dumps([self.d_in, self.dtype, [(s.file, s.rows, s.crc32) for s in self.shards]])
    return f"{zlib.crc32(key.encode()):08x}"

  def to_json(self) -> str:
    """The manifest as JSON text (deterministic: same content, same bytes)."""
    d = {
        "format": FORMAT,
        "format_version": self.format_version,
        "d_in": self.d_in,
        "dtype": self.dtype,
        "rows_per_shard": self.rows_per_shard,
        "complete": self.complete,
        "num_rows": self.num_rows,
        "checksum": CHECKSUM,
        "normalization": {
            "constant": self.norm_scale,
            "method": NORM_METHOD,
            "rows": self.num_rows,
            "sum_sq_norm": self.sum_sq_norm,
        },
        "provenance": self.provenance.to_dict(),
        "shards": [dataclasses.asdict(s) for s in self.shards],
    }
    return json.dumps(d, indent=1, allow_nan=False) + "\n"

  @classmethod
  def from_json(cls, text: str, *, source: str = MANIFEST_NAME) -> "Manifest":
    """Parses and validates manifest JSON; `source` names the file in errors."""
    try:
      d = json.loads(text)
    except json.JSONDecodeError as e:
      raise ShardError(f"{source}: expected JSON, found invalid JSON ({e}).") from None
    if not isinstance(d, dict):
      raise ShardError(f"{source}: expected a JSON object, found {type(d).__name__}.")
    if d.get("format") != FORMAT:
      raise ShardError(f"{source}: expected \"format\": {FORMAT!r}, found"
                       f" {d.get('format')!r}; not a jsae shard manifest.")
    if d.get("format_version") != FORMAT_VERSION:
      raise ShardError(f"{source}: expected format_version {FORMAT_VERSION}, found"
                       f" {d.get('format_version')!r}; written by another jsae version.")
    if d.get("checksum", CHECKSUM) != CHECKSUM:
      raise ShardError(f"{source}: expected checksum {CHECKSUM!r}, found {d['checksum']!r}.")

    def field(key, kind):
      if key not in d:
        raise ShardError(f"{source}: expected field {key!r}, found it missing.")
      v = d[key]
      if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ShardError(f"{source}: expected {key!r} to be an integer, found {v!r}.")
      if not isinstance(v, kind):
        raise ShardError(f"{source}: expected {key!r} to be {kind.__name__}, found {v!r}.")
      return v

    shards = []
    for i, s in enumerate(field("shards", list)):
      try:
        entry = ShardEntry(file=str(s["file"]), rows=int(s["rows"]), crc32=str(s["crc32"]),
                           sum_sq_norm=float(s["sum_sq_norm"]))
      except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{source}: shard entry {i}: expected an object with file, rows,"
                         f" crc32, sum_sq_norm; found {s!r} ({e!r}).") from None
      shards.append(entry)
    m = cls(d_in=field("d_in", int), dtype=field("dtype", str),
            rows_per_shard=field("rows_per_shard", int), shards=shards,
            complete=field("complete", bool),
            provenance=Provenance.from_dict(d.get("provenance", {}), source=source),
            format_version=d["format_version"])
    m.validate(source=source)
    if "num_rows" in d and d["num_rows"] != m.num_rows:
      raise ShardError(f"{source}: expected num_rows = sum of shard rows = {m.num_rows},"
                       f" found {d['num_rows']!r}.")
    # C is derived from the per-shard sums; a hand-edited constant would be ignored
    # silently, so it is an error instead.
    c = d.get("normalization", {}).get("constant", m.norm_scale)
    if not isinstance(c, (int, float)) or not math.isclose(c, m.norm_scale, rel_tol=1e-9):
      raise ShardError(f"{source}: expected normalization.constant = sqrt(sum of shard"
                       f" sum_sq_norm / num_rows) = {m.norm_scale!r}, found {c!r}.")
    return m

  def validate(self, *, source: str = MANIFEST_NAME) -> None:
    """Checks internal consistency; raises `ShardError` naming `source`."""
    storage_dtype(self.dtype, source=source)
    if self.d_in <= 0:
      raise ShardError(f"{source}: expected d_in > 0, found {self.d_in}.")
    if self.rows_per_shard <= 0:
      raise ShardError(f"{source}: expected rows_per_shard > 0, found {self.rows_per_shard}.")
    seen = set()
    for i, s in enumerate(self.shards):
      where = f"{source}: shard {i} ({s.file!r})"
      if not s.file or os.path.basename(s.file) != s.file or s.file in (".", "..") \
         or s.file == MANIFEST_NAME:
        raise ShardError(f"{where}: expected a plain file name inside the directory.")
      if s.file in seen:
        raise ShardError(f"{where}: expected unique file names, found a duplicate.")
      seen.add(s.file)
      last = i == len(self.shards) - 1
      if last and self.complete:
        if not 0 < s.rows <= self.rows_per_shard:
          raise ShardError(f"{where}: expected 1..{self.rows_per_shard} rows in the last"
                           f" shard, found {s.rows}.")
      elif s.rows != self.rows_per_shard:
        raise ShardError(f"{where}: expected rows_per_shard = {self.rows_per_shard} rows"
                         f" (only the last shard of a complete dataset may be shorter),"
                         f" found {s.rows}.")
      if not re.fullmatch(r"[0-9a-f]{8}", s.crc32):
        raise ShardError(f"{where}: expected crc32 as 8 lowercase hex digits, found"
                         f" {s.crc32!r}.")
      if not (math.isfinite(s.sum_sq_norm) and s.sum_sq_norm >= 0):
        raise ShardError(f"{where}: expected a finite sum_sq_norm >= 0, found"
                         f" {s.sum_sq_norm!r}.")


def manifest_path(directory: str | os.PathLike) -> Path:
  """The manifest file of a shard directory."""
  return Path(directory) / MANIFEST_NAME


def load_manifest(directory: str | os.PathLike) -> Manifest:
  """Reads and validates `directory/manifest.json`; `ShardError` if absent or bad."""
  directory = Path(directory)
  path = manifest_path(directory)
  if not directory.is_dir():
    raise ShardError(f"{directory}: expected a shard directory, found"
                     f" {'a file' if directory.exists() else 'nothing'}.")
  if not path.is_file():
    found = sorted(p.name for p in directory.iterdir())
    what = "an empty directory" if not found else f"only {found[:5]}" + (
        " ..." if len(found) > 5 else "")
    raise ShardError(f"{path}: expected a shard manifest, found {what}. Write shards"
                     " with `jsae harvest` (or jsae.data.shards.ShardWriter) first.")
  return Manifest.from_json(path.read_text(), source=str(path))


def _fsync_dir(directory: Path) -> None:
  """Makes renames inside `directory` durable."""
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> None:
  """Validates `manifest` and atomically replaces `directory/manifest.json` with it."""
  path = manifest_path(directory)
  manifest.validate(source=str(path))
  _write_atomic(path, manifest.to_json().encode())


def _write_atomic(path: Path, data: bytes) -> None:
  """Replaces `path` with `data`: write temp, fsync, rename, fsync the directory."""
  tmp = path.with_name(path.name + _TMP)
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_dir(path.parent)


# ----------------------------------------------------------------------------- checks


def file_crc32(path: str | os.PathLike, *, progress: Callable[[int], Any] | None = None
               ) -> str:
  """CRC-32 of a file, streamed in 16 MiB reads; `progress(nbytes)` after each read."""
  crc = 0
  buf = bytearray(_READ_CHUNK)
  view = memoryview(buf)
  with open(path, "rb", buffering=0) as f:
    while n := f.readinto(buf):
      crc = zlib.crc32(view[:n], crc)
      if progress is not None:
        progress(n)
  return f"{crc:08x}"


def check_shard_file(directory: str | os.PathLike, manifest: Manifest, index: int, *,
                     checksum: bool, progress: Callable[[int], Any] | None = None
                     ) -> str | None:
  """The problem with shard `index` (missing, wrong size, wrong checksum) or None."""
  s = manifest.shards[index]
  path = Path(directory) / s.file
  expected = s.rows * manifest.row_nbytes
  try:
    size = path.stat().st_size
  except FileNotFoundError:
    return (f"{path}: missing shard file (shard {index} of {len(manifest.shards)}, listed"
            f" in {MANIFEST_NAME} with {s.rows} rows); expected a file of {expected} bytes.")
  if size != expected:
    return (f"{path}: truncated or wrong-size shard: expected {expected} bytes"
            f" ({s.rows} rows x {manifest.d_in} x {manifest.itemsize} B), found {size}.")
  if checksum:
    found = file_crc32(path, progress=progress)
    if found != s.crc32:
      return (f"{path}: corrupted shard: expected crc32 {s.crc32} (from {MANIFEST_NAME}),"
              f" found {found}. Re-create the shard (re-harvest) or restore it from a copy.")
  return None


def stray_files(directory: str | os.PathLike, manifest: Manifest | None) -> list[str]:
  """Writer files the manifest does not list: temp files and unlisted shards."""
  listed = {s.file for s in manifest.shards} if manifest else set()
  return sorted(p.name for p in Path(directory).iterdir()
                if _WRITER_FILE.match(p.name) and p.name != MANIFEST_NAME
                and p.name not in listed)


def verify(directory: str | os.PathLike, *, progress: bool = True) -> list[str]:
  """Checks every shard's presence, size and checksum; returns the problems found.

  Reads every byte once (CRC-32), with a tqdm progress bar in bytes.
  """
  try:
    m = load_manifest(directory)
  except ShardError as e:
    return [str(e)]
  problems = []
  if not m.complete:
    problems.append(f"{manifest_path(directory)}: expected a complete dataset, found"
                    f" complete=false ({m.num_rows} rows committed): the writer crashed or"
                    " is still running; resume it to finish.")
  for name in stray_files(directory, m):
    problems.append(f"{Path(directory) / name}: a writer file not listed in {MANIFEST_NAME}"
                    " (left over from a crash; ignored by readers, removed when the writer"
                    " resumes).")
  from tqdm.auto import tqdm
  with tqdm(total=m.nbytes, unit="B", unit_scale=True, unit_divisor=1024,
            desc="verify", disable=not progress, dynamic_ncols=True) as bar:
    for i in range(len(m.shards)):
      p = check_shard_file(directory, m, i, checksum=True, progress=bar.update)
      if p:
        problems.append(p)
  return problems


def _human_bytes(n: int) -> str:
  """`n` bytes as B/KiB/MiB/GiB/TiB with 3 significant digits."""
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024:
      return f"{n:.3g} {unit}"
    n /= 1024
  return f"{n:.3g} TiB"


def info(directory: str | os.PathLike) -> str:
  """A human-readable summary: layout, provenance, C, and a quick (no-checksum) check."""
  return inspect(directory)[0]


def inspect(directory: str | os.PathLike) -> tuple[str, list[str]]:
  """(`info`'s summary, the problems it lists): an unreadable manifest, missing or
  wrong-size shard files, stray files. No checksums (that is `verify`)."""
  directory = Path(directory)
  try:
    m = load_manifest(directory)
  except ShardError as e:
    return f"{directory}: INVALID\n  {e}", [str(e)]
  lines = [
      f"{directory}",
      f"  format          {FORMAT} v{m.format_version}"
      f"{'' if m.complete else '  (INCOMPLETE: writer not finished)'}",
      f"  rows            {m.num_rows:,} x d_in {m.d_in} ({m.dtype}),"
      f" {_human_bytes(m.nbytes)}",
      f"  shards          {len(m.shards)} x {m.rows_per_shard:,} rows"
      f" ({_human_bytes(m.rows_per_shard * m.row_nbytes)} each; last"
      f" {m.shards[-1].rows if m.shards else 0:,})",
      f"  normalisation   C = {m.norm_scale:.6g}  ({NORM_METHOD})",
      f"  checksum        {CHECKSUM} per shard; dataset fingerprint {m.fingerprint()}",
      "  provenance",
  ]
  for k, v in m.provenance.to_dict().items():
    if v not in ("", None, [], {}):
      lines.append(f"    {k:<16}{v}")
  problems = [p for i in range(len(m.shards))
              if (p := check_shard_file(directory, m, i, checksum=False))]
  problems += [f"{directory / n}: not listed in {MANIFEST_NAME} (crash leftover)"
               for n in stray_files(directory, m)]
  if problems:
    lines.append(f"  validation      {len(problems)} problem(s) (sizes only):")
    lines += [f"    {p}" for p in problems]
  else:
    lines.append("  validation      all shard files present with the expected sizes"
                 " (checksums not read; run `jsae shards verify`)")
  return "\n".join(lines), problems


# ----------------------------------------------------------------------------- writer


def squared_norms(rows: np.ndarray, *, block: int = 256) -> np.ndarray:
  """`[n]` float64 ||x||^2 per row of `rows [n, d]`.

  Row by row in float64, so the value of a row does not depend on how the rows
  were chunked (which keeps a resumed write's C bit-identical); small blocks keep
  the float64 copy in cache.
  """
  out = np.empty(rows.shape[0], np.float64)
  for a in range(0, rows.shape[0], block):
    x = rows[a:a + block].astype(np.float64)
    np.sum(np.square(x, out=x), axis=1, out=out[a:a + block])
  return out


class ShardWriter:
  """Appends rows to a shard directory; crash safe and resumable.

  Usage (a deterministic producer, e.g. the harvester)::

      with ShardWriter(d, d_in=2304, rows_per_shard=1 << 20, provenance=p) as w:
        for rows in produce(start_row=w.rows_committed):   # [n, d_in] chunks
          w.write(rows)
      # leaving the block normally finalizes; an exception leaves it resumable

  After a crash, constructing the writer again on the same directory resumes:
  it removes the leftovers (with a logged note, also in `notes`) and
  `rows_committed` says where the producer must restart.

  Attributes:
    directory: the shard directory.
    manifest: the committed state (what is on disk).
    notes: what resuming cleaned up.
  """

  def __init__(self, directory: str | os.PathLike, *, d_in: int, rows_per_shard: int,
               dtype: str = "float32", provenance: Provenance | dict | None = None,
               resume: bool = True):
    self.directory = Path(directory)
    self._dtype = storage_dtype(dtype)
    if isinstance(provenance, dict):
      provenance = Provenance.from_dict(provenance)
    self.notes: list[str] = []
    self.directory.mkdir(parents=True, exist_ok=True)
    path = manifest_path(self.directory)
    fresh = Manifest(d_in=d_in, dtype=dtype, rows_per_shard=rows_per_shard,
                     provenance=provenance or Provenance())
    fresh.validate(source=str(path))
    if path.exists():
      self.manifest = self._resume(load_manifest(self.directory), fresh, resume,
                                   provenance is not None)
    else:
      if stray_files(self.directory, None):
        raise ShardError(f"{path}: expected it next to the shard files"
                         f" {stray_files(self.directory, None)[:3]}, found no manifest;"
                         " refusing to write into a directory of unknown shards.")
      self.manifest = fresh
      _write_atomic(path, fresh.to_json().encode())
    self._file = None  # open temp file of the shard being written
    self._crc = 0
    self._rows_in_shard = 0
    self._norms: list[np.ndarray] = []
    self._finalized = False

  def _resume(self, old: Manifest, new: Manifest, resume: bool, check_prov: bool
              ) -> Manifest:
    """Checks `old` (on disk) fits `new` (requested) and cleans the crash leftovers."""
    path = manifest_path(self.directory)
    if old.complete:
      raise ShardError(f"{path}: expected an unfinished dataset to resume, found a complete"
                       f" one ({old.num_rows} rows); delete the directory to write it again.")
    if not resume:
      raise ShardError(f"{path}: expected no existing manifest (resume=False), found one"
                       f" with {old.num_rows} rows committed.")
    for key in ("d_in", "dtype", "rows_per_shard"):
      if getattr(old, key) != getattr(new, key):
        raise ShardError(f"{path}: cannot resume: expected {key} {getattr(new, key)!r}"
                         f" (requested), found {getattr(old, key)!r} (on disk).")
    if check_prov and old.provenance != new.provenance:
      a, b = old.provenance.to_dict(), new.provenance.to_dict()
      diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
      raise ShardError(f"{path}: cannot resume: provenance differs (on disk, requested):"
                       f" {diff}.")
    for name in stray_files(self.directory, old):
      (self.directory / name).unlink()
      what = ("an interrupted manifest update" if name.startswith(MANIFEST_NAME) else
              "shard data not committed to the manifest; its rows will be produced again")
      self.notes.append(f"removed {name}: left by a crash ({what})")
      log.warning("%s: %s", self.directory, self.notes[-1])
    for i in range(len(old.shards)):
      p = check_shard_file(self.directory, old, i, checksum=False)
      if p:
        raise ShardError(f"cannot resume: {p}")
    return old

  @property
  def d_in(self) -> int:
    """Row width."""
    return self.manifest.d_in

  @property
  def rows_committed(self) -> int:
    """Rows durable on disk and listed in the manifest: where a producer restarts."""
    return self.manifest.num_rows

  @property
  def rows_written(self) -> int:
    """Rows accepted by `write` so far (committed plus the shard in progress)."""
    return self.rows_committed + self._rows_in_shard

  def write(self, rows: np.ndarray) -> None:
    """Appends `rows [n, d_in]` (cast to the storage dtype); commits full shards."""
    if self._finalized:
      raise ShardError(f"{self.directory}: write() after finalize() or abort().")
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != self.d_in:
      raise ValueError(f"ShardWriter({self.directory}).write: expected rows of shape"
                       f" [n, {self.d_in}], found {rows.shape}.")
    rows = np.ascontiguousarray(rows.astype(self._dtype, copy=False))
    norms = squared_norms(rows)
    if not np.all(np.isfinite(norms)):
      bad = int(np.argmin(np.isfinite(norms)))
      raise ValueError(f"ShardWriter({self.directory}).write: row {bad} of this chunk"
                       f" (global row {self.rows_written + bad}) has NaN/Inf; refusing to"
                       " store it.")
    a = 0
    while a < rows.shape[0]:
      if self._file is None:
        name = shard_file_name(len(self.manifest.shards))
        self._file = open(self.directory / (name + _TMP), "wb")
        self._crc, self._rows_in_shard, self._norms = 0, 0, []
      take = min(rows.shape[0] - a, self.manifest.rows_per_shard - self._rows_in_shard)
      chunk = memoryview(rows[a:a + take].view(np.uint8).reshape(-1))
      self._file.write(chunk)
      self._crc = zlib.crc32(chunk, self._crc)
      self._norms.append(norms[a:a + take])
      self._rows_in_shard += take
      a += take
      if self._rows_in_shard == self.manifest.rows_per_shard:
        self._commit_shard()

  def _commit_shard(self) -> None:
    """Makes the shard in progress durable, then lists it in the manifest."""
    f, self._file = self._file, None
    f.flush()
    os.fsync(f.fileno())
    f.close()
    name = shard_file_name(len(self.manifest.shards))
    os.replace(self.directory / (name + _TMP), self.directory / name)
    _fsync_dir(self.directory)
    # np.sum of one float64 array is deterministic whatever the write() chunking.
    sum_sq = float(np.sum(np.concatenate(self._norms)))
    self.manifest.shards.append(ShardEntry(file=name, rows=self._rows_in_shard,
                                           crc32=f"{self._crc:08x}", sum_sq_norm=sum_sq))
    self._rows_in_shard, self._norms = 0, []
    self._save_manifest()

  def _save_manifest(self) -> None:
    """Atomically replaces manifest.json with the committed state."""
    _write_atomic(manifest_path(self.directory), self.manifest.to_json().encode())

  def finalize(self) -> Manifest:
    """Commits the partial last shard and marks the dataset complete (idempotent)."""
    if self._finalized:
      return self.manifest
    if self._file is not None:
      self._commit_shard()
    self.manifest.complete = True
    self._save_manifest()
    self._finalized = True
    return self.manifest

  def close(self) -> Manifest:
    """Same as `finalize()`: the dataset ends here. Use `abort()` to stop resumably."""
    return self.finalize()

  def abort(self) -> None:
    """Stops without finishing: the shard in progress is dropped, the rest resumable."""
    if self._file is not None:
      self._file.close()
      Path(self._file.name).unlink(missing_ok=True)
      self._file = None
    self._rows_in_shard, self._norms = 0, []
    self._finalized = True

  def __enter__(self) -> "ShardWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.finalize()
    else:
      self.abort()
