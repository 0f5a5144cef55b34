"""SAE formats: one module per format and a registry (load, save, detect, export).

    sae = jsae.load(path)                       # format detected from what is there
    jsae.save(sae, "out/", format="saelens")
    jsae.formats.export("runs/my_sae", "out/", "gemma_scope", layer=12, average_l0=71)

Every format stores the SAE in raw LM units (the normalisation constant C and
the pre-encoder bias folded in, see `jsae.sae`); loading folds whatever a
format leaves unfolded.

  format          SAEs                  transcoders (+ affine skip)   module
  jsae            jumprelu, relu, topk  jumprelu, relu, topk          jsae.formats.native
  gemma_scope     jumprelu              none                          jsae.formats.gemma_scope
  gemma_scope_2   jumprelu              jumprelu                      jsae.formats.gemma_scope_2
  saelens         jumprelu, relu, topk  jumprelu, relu                jsae.formats.saelens

BatchTopK, Matryoshka and Gated SAEs are JumpReLU SAEs at inference, so every
format holds them (and their transcoders where the format holds JumpReLU ones).
A transcoder (`sae.transcoder`) reads one site and predicts another; each format
that holds one holds it with or without the affine skip W_skip. Bad input raises
`FormatError` naming the file, the key and the expectation; a family a format
cannot hold, or a transcoder in an SAE-only format, is refused before anything is
written.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp

from jsae import runs, saes
from jsae.formats import common, gemma_scope, gemma_scope_2, native, saelens
from jsae.formats.common import FormatError
from jsae.sae import SAE, canonical

# Detection order: a folder with both jsae and SAELens files is read as jsae.
_MODULES = {m.NAME: m for m in (native, saelens, gemma_scope, gemma_scope_2)}
FORMATS = ("jsae", "gemma_scope", "gemma_scope_2", "saelens")
_ALIASES = {"gemmascope": "gemma_scope", "gemma_scope2": "gemma_scope_2",
            "gemmascope2": "gemma_scope_2", "gemmascope_2": "gemma_scope_2",
            "sae_lens": "saelens"}
_LAYOUT_OPTIONS = {"gemma_scope": ("layer", "width", "average_l0"),
                   "gemma_scope_2": ("site", "layer", "width", "l0")}


def canonical_format(format: str) -> str:
  """The registry name of `format` (accepts e.g. 'gemma-scope', 'sae_lens')."""
  name = str(format).strip().lower().replace("-", "_")
  name = _ALIASES.get(name, name)
  if name not in FORMATS:
    raise ValueError(f"unknown SAE format {format!r}; expected one of {list(FORMATS)}.")
  return name


def families(format: str) -> tuple[str, ...]:
  """The inference families `format` can hold as SAEs."""
  return _MODULES[canonical_format(format)].FAMILIES


def transcoder_families(format: str) -> tuple[str, ...]:
  """The inference families `format` can hold as transcoders (empty: SAEs only)."""
  return _MODULES[canonical_format(format)].TRANSCODER_FAMILIES


def _transcoder_holders(family: str, skip: bool) -> list[str]:
  return [n for n, m in _MODULES.items()
          if family in m.TRANSCODER_FAMILIES and (m.HOLDS_SKIP or not skip)]


def check_can_hold_transcoder(family: str, skip: bool, format: str, *,
                              trained: str | None = None, where: str = "") -> None:
  """FormatError, naming the formats that can, when `format` cannot hold a `family`
  transcoder (with an affine skip when `skip`)."""
  module = _MODULES[format]
  kind = "skip transcoder" if skip else "transcoder"
  what = f"a {family!r} {kind}" + (f" (trained as {trained!r})"
                                   if trained not in (None, family) else "")
  use = " or ".join(repr(n) for n in _transcoder_holders(family, skip))
  if not module.TRANSCODER_FAMILIES:
    raise FormatError(f"{where}{what} cannot be saved as {format}: that format holds SAEs"
                      f" only (one site read and reconstructed). Use format={use}.")
  if family not in module.TRANSCODER_FAMILIES:
    raise FormatError(f"{where}{what} cannot be saved as {format}: that format holds"
                      f" {' and '.join(module.TRANSCODER_FAMILIES)} transcoders only."
                      f" Use format={use}.")
  if skip and not module.HOLDS_SKIP:
    raise FormatError(f"{where}{what} cannot be saved as {format}: that format has no"
                      f" place for the affine skip W_skip. Use format={use}.")


def detect_format(path: str | os.PathLike) -> tuple[str, Path]:
  """The format of `path` and the file or folder its loader reads.

  Raises:
    FileNotFoundError: `path` does not exist.
    FormatError: nothing there matches a known format (the message lists what was found).
  """
  path = Path(path).expanduser()
  layouts = "; ".join(f"{m.NAME}: {m.LAYOUT}" for m in _MODULES.values())
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such file or folder; expected an SAE folder"
                            f" or file ({layouts}).")
  if path.is_file() and path.name == "config.json":
    return detect_format(path.parent)
  for name, module in _MODULES.items():
    target = module.detect(path)
    if target is not None:
      return name, target
  if path.is_file():
    raise FormatError(
        f"{path}: not a file jsae can load; expected a .npz (Gemma Scope), or a file"
        f" of an SAE folder ({native.WEIGHTS}, {gemma_scope_2.WEIGHTS}, {saelens.WEIGHTS},"
        f" {saelens.CONFIG}, config.json).")
  found = sorted(os.listdir(path))
  shown = found[:20] + ([f"... ({len(found) - 20} more)"] if len(found) > 20 else [])
  raise FormatError(
      f"{path}: no SAE format recognised; found {shown or 'an empty folder'}. Expected"
      f" one of: {layouts}. For Gemma Scope, point at the layer_L/width_W/average_l0_N"
      " folder.")


def load(path: str | os.PathLike, format: str | None = None, *, dtype=None) -> SAE:
  """Loads an SAE saved in any of `FORMATS` (detected from `path` when `format` is None).

  Args:
    path: the SAE's folder, or one of its files (for Gemma Scope: the
      `.../average_l0_N` folder or the `params.npz` file), or a training run's
      workdir (its newest intact checkpoint, folded: `runs.read_sae`).
    format: one of `FORMATS` to skip detection.
    dtype: cast the weights (e.g. `jnp.bfloat16`); default: as stored (float16
      and float64 become float32). A threshold is always float32.

  Returns:
    An `SAE` in raw activation units, with provenance.

  Raises:
    FileNotFoundError: nothing at `path`.
    FormatError: no known format there, or a file is malformed (names the file,
      the key and the expectation).
  """
  path = Path(path).expanduser()
  if format is None and runs.is_run_dir(path):
    sae = runs.read_sae(path)
    return sae if dtype is None else sae.astype(dtype)
  if format is None:
    format, target = detect_format(path)
  else:
    format = canonical_format(format)
    if not path.exists():
      raise FileNotFoundError(f"{path}: no such file or folder.")
    target = path.parent if (path.is_file() and format != "gemma_scope") else path
  return _MODULES[format].load(target, dtype)


def check_can_save(sae: SAE, format: str) -> str:
  """The canonical format name, or FormatError when `format` cannot hold `sae`: its family,
  or, for a transcoder, the family as a transcoder and its affine skip."""
  format = canonical_format(format)
  trained = sae.provenance.get("training_family", sae.family)
  if sae.transcoder or common.has_skip(sae):
    check_can_hold_transcoder(sae.family, common.has_skip(sae), format, trained=trained)
    return format
  held = _MODULES[format].FAMILIES
  if sae.family not in held:
    raise FormatError(
        f"a {sae.family!r} SAE (trained as {trained!r}) cannot be saved as {format}:"
        f" that format holds {', '.join(held)} SAEs only. Use"
        f" {' or '.join(repr(n) for n, m in _MODULES.items() if sae.family in m.FAMILIES)}.")
  return format


def save(sae: SAE, path: str | os.PathLike, format: str = "jsae", *,
         overwrite: bool = False, **layout) -> Path:
  """Writes `sae` to `path` in `format`; returns the folder (or file) written.

  Args:
    sae: the SAE (raw units, as every `SAE` is).
    path: output folder (Gemma Scope also takes a `.npz` file path).
    format: one of `FORMATS` that holds the SAE's family (`families(format)`).
    overwrite: replace existing files instead of raising FileExistsError.
    **layout: folder layout under `path` for the Gemma Scope formats:
      gemma_scope: `layer`, `average_l0` (and optional `width`, default from
      d_sae, e.g. '16k') -> `layer_L/width_W/average_l0_N/params.npz`;
      gemma_scope_2: `layer`, `l0` (optional `site`, default the provenance's
      hook site or 'resid_post'; `width`) -> `site/layer_L_width_W_l0_X/`.
      The l0 given is also written to Gemma Scope 2's config.json.

  Weights keep the SAE's dtype in jsae and SAELens; Gemma Scope formats are
  float32. A threshold is always written as float32.
  """
  if not isinstance(sae, SAE):
    raise TypeError(f"save needs a jsae.SAE; got {type(sae).__name__}.")
  format = check_can_save(sae, format)
  check_finite(sae)
  sae = sae.replace(params=canonical(sae.params))
  if layout:
    allowed = _LAYOUT_OPTIONS.get(format, ())
    unknown = sorted(set(layout) - set(allowed))
    if unknown:
      raise TypeError(f"save(format={format!r}) got unexpected option(s) {unknown};"
                      f" allowed: {list(allowed)}.")
  return _MODULES[format].save(sae, Path(path).expanduser(), overwrite, **layout)


def check_finite(sae: SAE) -> None:
  """Raises FormatError when a parameter holds NaN or infinity (nothing is written)."""
  bad = [name for name in saes.base.array_fields(sae.params)
         if getattr(sae.params, name) is not None
         and not bool(jnp.all(jnp.isfinite(getattr(sae.params, name))))]
  if bad:
    where = sae.provenance.get("run_dir")
    step = sae.provenance.get("step")
    raise FormatError(
        f"the SAE's {', '.join(bad)} hold non-finite values (NaN or infinity)"
        + (f" at step {step} of {where}" if where else "") + ", so no format can hold it:"
        " the run diverged. Export an earlier checkpoint (jsae export RUN OUT --step=N),"
        " or retrain with a lower config.optim.lr.")


def export(run_dir: str | os.PathLike, out: str | os.PathLike, format: str = "jsae", *,
           step: int | None = None, fold_decoder_norm: bool | None = None,
           overwrite: bool = False, **layout) -> Path:
  """`jsae export RUN_DIR --format=... OUT`: a run's checkpoint, folded, saved.

  Args:
    run_dir: a `jsae train` workdir (any family).
    out: output folder (or `.npz` file for gemma_scope).
    format: one of `FORMATS`; a format that cannot hold the run's inference family
      is refused before the checkpoint is read.
    step: checkpoint step (default: latest).
    fold_decoder_norm: see `runs.read_sae` (default: when rows were not kept unit norm).
    overwrite: replace existing output files.
    **layout: Gemma Scope folder layout options (see `save`).

  Returns:
    The folder (or file) written.
  """
  format = canonical_format(format)
  family = runs.training_family(run_dir)
  transcoder, skip = runs.training_transcoder(run_dir)
  if family is not None and transcoder:
    check_can_hold_transcoder(saes.get(family).inference_form, skip, format, trained=family,
                              where=f"{run_dir}: ")
  elif family is not None:
    form = saes.get(family).inference_form
    if form not in _MODULES[format].FAMILIES:
      raise FormatError(
          f"{run_dir}: the run trained a {family!r} SAE, whose inference form"
          f" {form!r} the {format} format cannot hold (it holds"
          f" {', '.join(_MODULES[format].FAMILIES)}). Export with --format=jsae or"
          " --format=saelens.")
  sae = runs.read_sae(run_dir, step=step, fold_decoder_norm=fold_decoder_norm)
  return save(sae, out, format, overwrite=overwrite, **layout)


__all__ = ["FORMATS", "FormatError", "SAE", "canonical_format", "check_can_hold_transcoder",
           "check_can_save", "check_finite", "common", "detect_format", "export", "families",
           "load", "save", "transcoder_families"]
