"""Import and export of JumpReLU SAEs: jsae, Gemma Scope, Gemma Scope 2, SAELens.

    sae = jsae.load(path)                       # format detected from what is there
    jsae.save(sae, "out/", format="saelens")
    export("runs/my_sae", "out/", "gemma_scope", layer=12, average_l0=71)

Every format stores the SAE in raw LM units (the normalisation constant C and
the pre-encoder bias folded in, see `jsae.sae`); loading folds whatever a
format leaves unfolded, so a loaded `SAE` always computes

    f = pi * 1[pi > max(theta, 0)],  pi = x @ W_enc + b_enc;   x_hat = f @ W_dec + b_dec.

Formats (`FORMATS`):

  jsae           folder: `sae.safetensors` (W_enc [d_in, d_sae], W_dec [d_sae, d_in],
                 b_enc, b_dec, threshold) + `config.json` (format marker and
                 schema version, family, d_in, d_sae, dtype, threshold convention,
                 pre_encoder_bias, provenance of the activations).
  gemma_scope    `params.npz` (Gemma Scope, Gemma 2): keys W_enc, W_dec, b_enc,
                 b_dec, threshold (some releases: lowercase `w_enc`/`w_dec`, and a
                 `scaling_factor`), float32, no b_dec subtraction before the
                 encoder. Published layout `layer_L/width_W/average_l0_N/params.npz`;
                 load takes that folder or the file itself.
  gemma_scope_2  folder (Gemma Scope 2, Gemma 3): `params.safetensors` with
                 lowercase keys w_enc, w_dec, b_enc, b_dec, threshold (float32, same
                 semantics as Gemma Scope) + `config.json` with `width`,
                 `model_name`, `architecture` ("jump_relu"), `l0`,
                 `affine_connection`, `hf_hook_point_in`, `hf_hook_point_out`,
                 `type` ("sae"). Layout `{site}/layer_{L}_width_{W}_l0_{size}/`.
                 Field names are taken from SAELens' Gemma 3 loader and released
                 config.json files seen in public code; transcoders, skip
                 connections and CLTs are refused. jsae adds one key,
                 `jsae_provenance`, which other readers ignore.
  saelens        folder: `cfg.json` + `sae_weights.safetensors` (SAELens v6;
                 architecture "jumprelu", keys W_enc, W_dec, b_enc, b_dec and
                 `threshold` (raw theta; SAELens < 6.48 wrote `log_threshold`,
                 both load), `apply_b_dec_to_input` folded on load,
                 `normalize_activations` must be "none"; run metadata under
                 `metadata` (v6) or at the top level (older versions).

Bad input raises `FormatError` naming the file, the key and the expectation.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy as st

from jsae.sae import SAE, fold_pre_encoder_bias, raw_threshold
from jsae.saes.jumprelu import JumpReLUParams

FORMATS = ("jsae", "gemma_scope", "gemma_scope_2", "saelens")
_ALIASES = {"gemmascope": "gemma_scope", "gemma_scope2": "gemma_scope_2",
            "gemmascope2": "gemma_scope_2", "gemmascope_2": "gemma_scope_2",
            "sae_lens": "saelens"}

JSAE_FORMAT = "jsae-sae"
JSAE_FORMAT_VERSION = 1
JSAE_CONFIG, JSAE_WEIGHTS = "config.json", "sae.safetensors"
GS_WEIGHTS = "params.npz"
GS2_CONFIG, GS2_WEIGHTS = "config.json", "params.safetensors"
SL_CONFIG, SL_WEIGHTS = "cfg.json", "sae_weights.safetensors"

_LAYOUT = {
    "jsae": "config.json + sae.safetensors",
    "gemma_scope": "params.npz",
    "gemma_scope_2": "params.safetensors + config.json",
    "saelens": "cfg.json + sae_weights.safetensors",
}
_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
_SHAPES = {"W_enc": "[d_in, d_sae]", "W_dec": "[d_sae, d_in]", "b_enc": "[d_sae]",
           "b_dec": "[d_in]", "threshold": "[d_sae]"}
_INFERENCE = ("pi = x @ W_enc + b_enc; f = pi * (pi > max(threshold, 0));"
              " x_hat = f @ W_dec + b_dec")

# Hook-site names: jsae site -> TransformerLens hook (SAELens) and Hugging Face
# Gemma 3 module path (Gemma Scope 2 config.json).
_TL_HOOKS = {"resid_post": "blocks.{layer}.hook_resid_post",
             "resid_pre": "blocks.{layer}.hook_resid_pre",
             "resid_mid": "blocks.{layer}.hook_resid_mid",
             "mlp_out": "blocks.{layer}.hook_mlp_out",
             "attn_out": "blocks.{layer}.hook_attn_out",
             "attn_z": "blocks.{layer}.attn.hook_z"}
_HF_HOOKS = {"resid_post": "model.layers.{layer}.output",
             "mlp_out": "model.layers.{layer}.post_feedforward_layernorm.output",
             "attn_z": "model.layers.{layer}.self_attn.o_proj.input"}


class FormatError(ValueError):
  """A file or folder is not a valid SAE in the format it claims or was asked for."""


# ----------------------------------------------------------------------------- helpers


def _canonical_format(format: str) -> str:
  name = str(format).strip().lower().replace("-", "_")
  name = _ALIASES.get(name, name)
  if name not in FORMATS:
    raise ValueError(f"unknown SAE format {format!r}; expected one of {list(FORMATS)}.")
  return name


def _read_json(file: Path) -> dict:
  if not file.is_file():
    raise FormatError(f"{file}: missing; expected a JSON config file here.")
  try:
    obj = json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise FormatError(f"{file}: not valid JSON ({e}).") from e
  if not isinstance(obj, dict):
    raise FormatError(f"{file}: expected a JSON object, found {type(obj).__name__}.")
  return obj


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
  if not file.is_file():
    raise FormatError(f"{file}: missing; expected a safetensors weights file here.")
  try:
    return dict(st.load_file(str(file)))
  except Exception as e:  # safetensors raises its own error types
    raise FormatError(f"{file}: not a readable safetensors file ({e}).") from e


def _read_npz(file: Path) -> dict[str, np.ndarray]:
  if not file.is_file():
    raise FormatError(f"{file}: missing; expected a Gemma Scope params.npz here.")
  try:
    with np.load(file, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except Exception as e:  # zipfile / pickle / format errors
    raise FormatError(f"{file}: not a readable .npz archive ({e}).") from e


def _is_float(a: np.ndarray) -> bool:
  return bool(jnp.issubdtype(a.dtype, jnp.floating))


def _host(a) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(jax.device_get(a)))


def _check_int(cfg: dict, key: str, file: Path, *, required: bool = True) -> int | None:
  if key not in cfg or cfg[key] is None:
    if required:
      raise FormatError(f"{file}: missing key {key!r}; expected a positive integer.")
    return None
  value = cfg[key]
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise FormatError(f"{file}: key {key!r} is {value!r}; expected a positive integer.")
  return value


def _params_from_arrays(arrays: dict[str, np.ndarray], file: Path, *,
                        claims: dict[str, tuple[str, int | None]] | None = None,
                        claims_file: Path | None = None,
                        pre_encoder_bias: bool = False,
                        log_threshold: bool = False) -> JumpReLUParams:
  """Validated JumpReLUParams from arrays named as `_KEYS`.

  Args:
    arrays: the five arrays (other keys are the caller's business).
    file: the weights file, for error messages.
    claims: {config key: (quantity, value)} with quantity 'd_in' or 'd_sae', from
      a config, checked against the shapes.
    claims_file: the config file making the claims.
    pre_encoder_bias: the weights subtract b_dec before the encoder.
    log_threshold: `threshold` holds log theta.
  """
  missing = [k for k in _KEYS if k not in arrays]
  if missing:
    raise FormatError(f"{file}: missing key(s) {missing}; expected {list(_KEYS)}"
                      f" ({', '.join(f'{k} {_SHAPES[k]}' for k in _KEYS)}), found"
                      f" {sorted(arrays)}.")
  for k in _KEYS:
    if not _is_float(arrays[k]):
      raise FormatError(f"{file}: key {k!r} has dtype {arrays[k].dtype}; expected a"
                        " floating-point array.")
  W_enc = arrays["W_enc"]
  if W_enc.ndim != 2:
    raise FormatError(f"{file}: key 'W_enc' has shape {tuple(W_enc.shape)}; expected a"
                      " 2-D [d_in, d_sae] matrix.")
  d_in, d_sae = W_enc.shape
  expected = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
              "threshold": (d_sae,)}
  for k, shape in expected.items():
    if tuple(arrays[k].shape) != shape:
      raise FormatError(
          f"{file}: key {k!r} has shape {tuple(arrays[k].shape)}; expected {k}"
          f" {_SHAPES[k]} = {shape} to match W_enc of shape (d_in, d_sae) ="
          f" {(d_in, d_sae)}.")
  actual = {"d_in": d_in, "d_sae": d_sae}
  for key, (quantity, claim) in (claims or {}).items():
    if claim is not None and claim != actual[quantity]:
      raise FormatError(
          f"{claims_file}: key {key!r} is {claim}, but the weights in {file} have"
          f" {quantity} = {actual[quantity]} (W_enc shape {(d_in, d_sae)}); expected"
          " them to agree.")
  for k in _KEYS:
    if not np.all(np.isfinite(arrays[k].astype(np.float32))):
      raise FormatError(f"{file}: key {k!r} holds NaN or Inf values; expected finite"
                        " numbers.")

  def weight(a):  # float32 and bfloat16 stay; float16/float64 become float32
    keep = a.dtype in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16))
    return jnp.asarray(a if keep else a.astype(np.float32))

  dtype = arrays["W_enc"].dtype
  params = JumpReLUParams(
      W_enc=weight(W_enc), b_enc=weight(arrays["b_enc"].astype(dtype)),
      W_dec=weight(arrays["W_dec"].astype(dtype)),
      b_dec=weight(arrays["b_dec"].astype(dtype)),
      threshold=jnp.asarray(arrays["threshold"].astype(np.float32)),
      log_threshold=log_threshold, pre_encoder_bias=pre_encoder_bias)
  return params


def _fold_scaling_factor(arrays: dict[str, np.ndarray], file: Path) -> dict[str, np.ndarray]:
  """Folds a per-latent `scaling_factor` (applied to latents before decoding) into W_dec."""
  if "scaling_factor" not in arrays:
    return arrays
  arrays = dict(arrays)
  s = arrays.pop("scaling_factor").astype(np.float32)
  if "W_dec" not in arrays:
    return arrays
  d_sae = arrays["W_dec"].shape[0]
  if s.shape not in ((), (1,), (d_sae,)):
    raise FormatError(f"{file}: key 'scaling_factor' has shape {tuple(s.shape)}; expected"
                      f" a scalar or [d_sae] = ({d_sae},).")
  if not np.all(s == 1):
    dtype = arrays["W_dec"].dtype
    scale = np.broadcast_to(s, (d_sae,))[:, None]
    arrays["W_dec"] = (arrays["W_dec"].astype(np.float32) * scale).astype(dtype)
  return arrays


def _to_sae(params: JumpReLUParams, provenance: dict, dtype) -> SAE:
  sae = SAE.from_params(params, provenance)
  return sae.astype(dtype) if dtype is not None else sae


def _site_and_layer(prov: dict) -> tuple[str | None, int | None]:
  """(site, layer) from provenance: `hook_site` ('resid_post' or 'resid_post.9'), `layer`."""
  site, layer = prov.get("hook_site") or None, prov.get("layer")
  if isinstance(site, str) and "." in site:
    site, _, tail = site.partition(".")
    if tail.isdigit() and layer is None:
      layer = int(tail)
  return site, (int(layer) if isinstance(layer, (int, np.integer)) else None)


def _hook_name(prov: dict, table: dict[str, str]) -> str | None:
  site, layer = _site_and_layer(prov)
  if site in table and layer is not None:
    return table[site].format(layer=layer)
  return None


def _parse_hook(name: Any, table: dict[str, str]) -> dict:
  """{'hook_site', 'layer'} parsed from a hook name in `table`'s notation, or {}."""
  if not isinstance(name, str):
    return {}
  for site, template in table.items():
    pattern = re.escape(template).replace(re.escape("{layer}"), r"(\d+)")
    m = re.fullmatch(pattern, name)
    if m:
      return {"hook_site": site, "layer": int(m.group(1))}
  return {}


def _width_name(d_sae: int) -> str:
  """Gemma Scope folder width: 16384 -> '16k', 2**20 -> '1m', else the number."""
  if d_sae % (1 << 20) == 0:
    return f"{d_sae >> 20}m"
  if d_sae % 1024 == 0:
    return f"{d_sae // 1024}k"
  return str(d_sae)


def _check_writable(files: list[Path], overwrite: bool) -> None:
  for f in files:
    if f.exists() and not overwrite:
      raise FileExistsError(f"{f} exists; pass overwrite=True (CLI: --overwrite) or"
                            " choose another output path.")
  for f in files:
    f.parent.mkdir(parents=True, exist_ok=True)


def _write_atomic(file: Path, write: Callable[[Path], None]) -> None:
  """Calls `write(tmp)` then renames tmp to `file`, so readers never see half a file."""
  tmp = file.with_name(file.name + ".tmp")
  try:
    write(tmp)
    os.replace(tmp, file)
  finally:
    if tmp.exists():
      tmp.unlink()


def _write_json(file: Path, obj: dict) -> None:
  text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
  _write_atomic(file, lambda tmp: tmp.write_text(text))


def _write_safetensors(file: Path, arrays: dict[str, np.ndarray],
                       metadata: dict[str, str] | None = None) -> None:
  _write_atomic(file, lambda tmp: st.save_file(arrays, str(tmp), metadata=metadata))


def _weights(sae: SAE, *, dtype=None, names: dict[str, str] | None = None
             ) -> dict[str, np.ndarray]:
  """Host arrays of the SAE (threshold float32), under `names` if given."""
  p = sae.params
  def cast(a):
    a = _host(a)
    return a.astype(dtype) if dtype is not None else a
  arrays = {"W_enc": cast(p.W_enc), "W_dec": cast(p.W_dec), "b_enc": cast(p.b_enc),
            "b_dec": cast(p.b_dec), "threshold": _host(p.threshold).astype(np.float32)}
  if names:
    arrays = {names.get(k, k): v for k, v in arrays.items()}
  return arrays


def _known(d: dict) -> dict:
  """`d` without empty values."""
  return {k: v for k, v in d.items() if v not in (None, "", [], {})}


# ----------------------------------------------------------------------------- detection


def detect_format(path: str | os.PathLike) -> tuple[str, Path]:
  """The format of `path` and the file or folder its loader reads.

  A folder is recognised by its files (`_LAYOUT`); a file by its name
  (`*.npz`, `sae.safetensors`, `params.safetensors`, `sae_weights.safetensors`,
  `cfg.json`, `config.json`), meaning the folder holding it except for `.npz`.

  Raises:
    FileNotFoundError: `path` does not exist.
    FormatError: nothing there matches a known format (the message lists what was found).
  """
  path = Path(path).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such file or folder; expected an SAE folder"
                            " or file (" + "; ".join(f"{k}: {v}" for k, v in
                                                    _LAYOUT.items()) + ").")
  if path.is_file():
    if path.suffix == ".npz":
      return "gemma_scope", path
    by_name = {JSAE_WEIGHTS: "jsae", GS2_WEIGHTS: "gemma_scope_2", SL_WEIGHTS: "saelens",
               SL_CONFIG: "saelens"}
    if path.name in by_name:
      return by_name[path.name], path.parent
    if path.name == "config.json":
      return detect_format(path.parent)
    raise FormatError(
        f"{path}: not a file jsae can load; expected a .npz (Gemma Scope), or a file"
        f" of an SAE folder ({JSAE_WEIGHTS}, {GS2_WEIGHTS}, {SL_WEIGHTS}, {SL_CONFIG},"
        " config.json).")
  names = set(os.listdir(path))
  if JSAE_WEIGHTS in names and JSAE_CONFIG in names:
    return "jsae", path
  if SL_WEIGHTS in names and SL_CONFIG in names:
    return "saelens", path
  if GS_WEIGHTS in names:
    return "gemma_scope", path / GS_WEIGHTS
  if GS2_WEIGHTS in names:
    return "gemma_scope_2", path
  found = sorted(names)
  shown = found[:20] + ([f"... ({len(found) - 20} more)"] if len(found) > 20 else [])
  raise FormatError(
      f"{path}: no SAE format recognised; found {shown or 'an empty folder'}. Expected"
      " one of: " + "; ".join(f"{k} ({v})" for k, v in _LAYOUT.items())
      + ". For Gemma Scope, point at the layer_L/width_W/average_l0_N folder.")


# ----------------------------------------------------------------------------- jsae format


def _load_jsae(folder: Path, dtype) -> SAE:
  cfg_file, w_file = folder / JSAE_CONFIG, folder / JSAE_WEIGHTS
  cfg = _read_json(cfg_file)
  if cfg.get("format") != JSAE_FORMAT:
    raise FormatError(f"{cfg_file}: key 'format' is {cfg.get('format')!r}; expected"
                      f" {JSAE_FORMAT!r} (a jsae SAE config).")
  version = cfg.get("format_version")
  if not isinstance(version, int) or not 1 <= version <= JSAE_FORMAT_VERSION:
    raise FormatError(f"{cfg_file}: key 'format_version' is {version!r}; this jsae reads"
                      f" versions 1..{JSAE_FORMAT_VERSION} (upgrade jsae for newer ones).")
  if cfg.get("family") != "jumprelu":
    raise FormatError(f"{cfg_file}: key 'family' is {cfg.get('family')!r}; expected"
                      " 'jumprelu'.")
  convention = cfg.get("threshold", "raw")
  if convention not in ("raw", "log"):
    raise FormatError(f"{cfg_file}: key 'threshold' is {convention!r}; expected 'raw'"
                      " (theta) or 'log' (log theta).")
  pre_bias = cfg.get("pre_encoder_bias", False)
  if not isinstance(pre_bias, bool):
    raise FormatError(f"{cfg_file}: key 'pre_encoder_bias' is {pre_bias!r}; expected"
                      " true or false.")
  if cfg.get("units", "raw") != "raw":
    raise FormatError(f"{cfg_file}: key 'units' is {cfg.get('units')!r}; expected 'raw'"
                      " (weights for the LM's own activations).")
  provenance = cfg.get("provenance", {})
  if not isinstance(provenance, dict):
    raise FormatError(f"{cfg_file}: key 'provenance' is {provenance!r}; expected an"
                      " object.")
  claims = {k: (k, _check_int(cfg, k, cfg_file)) for k in ("d_in", "d_sae")}
  arrays = _read_safetensors(w_file)
  params = _params_from_arrays(arrays, w_file, claims=claims, claims_file=cfg_file,
                               pre_encoder_bias=pre_bias,
                               log_threshold=convention == "log")
  stored = jnp.dtype(arrays["W_enc"].dtype).name
  if "dtype" in cfg and cfg["dtype"] != stored:
    raise FormatError(f"{cfg_file}: key 'dtype' is {cfg['dtype']!r}, but W_enc in"
                      f" {w_file} is {stored}; expected them to agree.")
  return _to_sae(params, provenance, dtype)


def _save_jsae(sae: SAE, path: Path, overwrite: bool) -> Path:
  from jsae import __version__
  cfg_file, w_file = path / JSAE_CONFIG, path / JSAE_WEIGHTS
  _check_writable([cfg_file, w_file], overwrite)
  config = dict(
      format=JSAE_FORMAT, format_version=JSAE_FORMAT_VERSION, jsae_version=__version__,
      family="jumprelu", d_in=sae.d_in, d_sae=sae.d_sae, dtype=sae.dtype.name,
      threshold="raw", threshold_dtype="float32", pre_encoder_bias=False, units="raw",
      inference=_INFERENCE, weights=JSAE_WEIGHTS, provenance=sae.provenance)
  _write_safetensors(w_file, _weights(sae), metadata={"format": JSAE_FORMAT})
  _write_json(cfg_file, config)
  return path


# ----------------------------------------------------------------------------- Gemma Scope


def _gemma_scope_path_info(path: Path) -> dict:
  """Layer, width, average L0 (and site/model when the HF repo name is in the path)."""
  text = path.as_posix()
  info: dict[str, Any] = {}
  m = re.search(r"layer_(\d+)/width_([^/]+)/average_l0_(\d+)", text)
  if m:
    info.update(layer=int(m.group(1)), width=m.group(2), average_l0=int(m.group(3)))
  m = re.search(r"gemma-scope-(2b|9b|27b)-(pt|it)-(res|mlp|att)", text)
  if m:
    size, kind, site = m.groups()
    info["model"] = f"google/gemma-2-{size}" + ("-it" if kind == "it" else "")
    info["hook_site"] = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}[site]
  return info


def _load_gemma_scope(file: Path, dtype) -> SAE:
  if file.is_dir():
    file = file / GS_WEIGHTS
  arrays = _read_npz(file)
  arrays = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in arrays.items()}
  arrays = _fold_scaling_factor(arrays, file)
  params = _params_from_arrays(arrays, file)
  provenance = dict(source_format="gemma_scope", source_path=str(file.absolute()),
                    **_gemma_scope_path_info(file.absolute()))
  return _to_sae(params, provenance, dtype)


def _save_gemma_scope(sae: SAE, path: Path, overwrite: bool, *, layer: int | None = None,
                      width: str | int | None = None, average_l0: int | None = None
                      ) -> Path:
  if layer is not None:
    if average_l0 is None:
      raise ValueError("the Gemma Scope layout layer_L/width_W/average_l0_N needs"
                       " average_l0 as well as layer.")
    width = _width_name(sae.d_sae) if width is None else width
    path = path / f"layer_{int(layer)}" / f"width_{width}" / f"average_l0_{int(average_l0)}"
  elif width is not None or average_l0 is not None:
    raise ValueError("width and average_l0 build the Gemma Scope folder layout; pass"
                     " layer too.")
  file = path if path.suffix == ".npz" else path / GS_WEIGHTS
  _check_writable([file], overwrite)
  arrays = _weights(sae, dtype=np.float32)

  def write(tmp: Path):
    with open(tmp, "wb") as fh:
      np.savez(fh, **arrays)
  _write_atomic(file, write)
  return file


# ----------------------------------------------------------------------------- Gemma Scope 2


def _load_gemma_scope_2(folder: Path, dtype) -> SAE:
  cfg_file, w_file = folder / GS2_CONFIG, folder / GS2_WEIGHTS
  cfg = _read_json(cfg_file) if cfg_file.exists() else {}
  arch = cfg.get("architecture", "jump_relu")
  if arch not in ("jump_relu", "jumprelu"):
    raise FormatError(f"{cfg_file}: key 'architecture' is {arch!r}; expected 'jump_relu'.")
  kind = cfg.get("type", "sae")
  if kind != "sae":
    raise FormatError(f"{cfg_file}: key 'type' is {kind!r}; expected 'sae' (transcoders,"
                      " crosscoders and CLTs map one site to another and are not SAEs).")
  if cfg.get("affine_connection", False):
    raise FormatError(f"{cfg_file}: key 'affine_connection' is true; expected false"
                      " (skip transcoders are not supported).")
  raw = _read_safetensors(w_file)
  arrays = {}
  for k, v in raw.items():
    name = "W_" + k[2:] if k.startswith("w_") else k
    if name not in _KEYS:
      raise FormatError(f"{w_file}: unexpected key {k!r}; expected only"
                        f" {['w_enc', 'w_dec', 'b_enc', 'b_dec', 'threshold']} (skip"
                        " connections and transcoders are not supported).")
    arrays[name] = v
  claims = {"width": ("d_sae", _check_int(cfg, "width", cfg_file, required=False))}
  params = _params_from_arrays(arrays, w_file, claims=claims, claims_file=cfg_file)
  provenance = cfg.get("jsae_provenance")
  if not isinstance(provenance, dict):
    upstream = {k: v for k, v in cfg.items() if k != "jsae_provenance"}
    provenance = dict(source_format="gemma_scope_2", source_path=str(folder.absolute()),
                      **_known({"model": cfg.get("model_name"), "l0": cfg.get("l0")}),
                      **_parse_hook(cfg.get("hf_hook_point_in"), _HF_HOOKS),
                      gemma_scope_2=upstream)
  return _to_sae(params, provenance, dtype)


def _save_gemma_scope_2(sae: SAE, path: Path, overwrite: bool, *,
                        site: str | None = None, layer: int | None = None,
                        width: str | int | None = None, l0: str | int | None = None
                        ) -> Path:
  prov = sae.provenance
  if layer is not None:
    if l0 is None:
      raise ValueError("the Gemma Scope 2 layout {site}/layer_L_width_W_l0_X needs l0"
                       " (e.g. 'small', 'medium', 'big') as well as layer.")
    site = site or _site_and_layer(prov)[0] or "resid_post"
    width = _width_name(sae.d_sae) if width is None else width
    path = path / site / f"layer_{int(layer)}_width_{width}_l0_{l0}"
  elif site is not None or width is not None:
    raise ValueError("site and width build the Gemma Scope 2 folder layout; pass layer"
                     " and l0 too.")
  cfg_file, w_file = path / GS2_CONFIG, path / GS2_WEIGHTS
  _check_writable([cfg_file, w_file], overwrite)
  upstream = prov.get("gemma_scope_2") if isinstance(prov.get("gemma_scope_2"), dict) else {}
  hook = upstream.get("hf_hook_point_in") or _hook_name(prov, _HF_HOOKS)
  if hook is None and layer is not None:
    hook = _hook_name({"hook_site": site, "layer": int(layer)}, _HF_HOOKS)
  config = {**upstream, "width": sae.d_sae, "architecture": "jump_relu",
            "affine_connection": False, "type": "sae", "hf_hook_point_in": hook,
            "hf_hook_point_out": hook, "model_name": prov.get("model") or
            upstream.get("model_name"),
            "l0": l0 if l0 is not None else prov.get("l0", upstream.get("l0")),
            "jsae_provenance": prov}
  names = {"W_enc": "w_enc", "W_dec": "w_dec"}
  _write_safetensors(w_file, _weights(sae, dtype=np.float32, names=names))
  _write_json(cfg_file, config)
  return path


# ----------------------------------------------------------------------------- SAELens


_SL_META_KEYS = ("model_name", "hook_name", "hook_head_index", "context_size",
                 "prepend_bos", "dataset_path", "model_class_name",
                 "exclude_special_tokens", "neuronpedia_id", "sae_lens_version",
                 "sae_lens_training_version")


def _load_saelens(folder: Path, dtype) -> SAE:
  cfg_file, w_file = folder / SL_CONFIG, folder / SL_WEIGHTS
  cfg = _read_json(cfg_file)
  arch = cfg.get("architecture", "standard")
  if arch != "jumprelu":
    raise FormatError(f"{cfg_file}: key 'architecture' is {arch!r}; expected 'jumprelu'"
                      " (jsae loads JumpReLU SAEs only).")
  norm = cfg.get("normalize_activations", "none")
  if norm not in ("none", None, False):
    raise FormatError(
        f"{cfg_file}: key 'normalize_activations' is {norm!r}; expected 'none'. The"
        " weights expect inputs rescaled at run time; fold the scaling into the weights"
        " with SAELens (fold_activation_norm_scaling_factor) and save again.")
  pre_bias = cfg.get("apply_b_dec_to_input", True)  # SAELens' default before v6
  if not isinstance(pre_bias, bool):
    raise FormatError(f"{cfg_file}: key 'apply_b_dec_to_input' is {pre_bias!r}; expected"
                      " true or false.")
  claims = {k: (k, _check_int(cfg, k, cfg_file)) for k in ("d_in", "d_sae")}
  arrays = _fold_scaling_factor(_read_safetensors(w_file), w_file)
  log_threshold = "threshold" not in arrays and "log_threshold" in arrays
  if log_threshold:
    arrays["threshold"] = arrays.pop("log_threshold")
  params = _params_from_arrays(arrays, w_file, claims=claims, claims_file=cfg_file,
                               pre_encoder_bias=pre_bias, log_threshold=log_threshold)
  meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
  provenance = meta.get("jsae_provenance")
  if not isinstance(provenance, dict):
    merged = {**{k: cfg[k] for k in _SL_META_KEYS if k in cfg}, **meta}
    provenance = dict(source_format="saelens", source_path=str(folder.absolute()),
                      **_known({"model": merged.get("model_name"),
                                "context_length": merged.get("context_size")}),
                      **_parse_hook(merged.get("hook_name"), _TL_HOOKS),
                      saelens=_known({k: merged.get(k) for k in _SL_META_KEYS}))
  return _to_sae(params, provenance, dtype)


def _save_saelens(sae: SAE, path: Path, overwrite: bool) -> Path:
  from jsae import __version__
  cfg_file, w_file = path / SL_CONFIG, path / SL_WEIGHTS
  _check_writable([cfg_file, w_file], overwrite)
  prov = sae.provenance
  upstream = prov.get("saelens") if isinstance(prov.get("saelens"), dict) else {}
  hook = upstream.get("hook_name") or _hook_name(prov, _TL_HOOKS)
  meta = {**upstream, **_known({
      "model_name": prov.get("model") or upstream.get("model_name"),
      "hook_name": hook, "context_size": prov.get("context_length"),
      "dataset_path": prov.get("text_source")})}
  meta.update(hook_head_index=None, jsae_version=__version__, jsae_provenance=prov)
  config = {
      "architecture": "jumprelu", "d_in": sae.d_in, "d_sae": sae.d_sae,
      "dtype": sae.dtype.name, "device": "cpu", "apply_b_dec_to_input": False,
      "normalize_activations": "none",
      "reshape_activations": "hook_z" if (hook or "").endswith("hook_z") else "none",
      "metadata": meta,
      # Older SAELens (< 6) read run metadata from the top level.
      **{k: meta[k] for k in ("model_name", "hook_name", "hook_head_index",
                              "context_size", "dataset_path") if k in meta},
  }
  _write_safetensors(w_file, _weights(sae))
  _write_json(cfg_file, config)
  return path


# ----------------------------------------------------------------------------- public API


_LOADERS = {"jsae": _load_jsae, "gemma_scope": _load_gemma_scope,
            "gemma_scope_2": _load_gemma_scope_2, "saelens": _load_saelens}
_SAVERS = {"jsae": _save_jsae, "gemma_scope": _save_gemma_scope,
           "gemma_scope_2": _save_gemma_scope_2, "saelens": _save_saelens}


def load(path: str | os.PathLike, format: str | None = None, *, dtype=None) -> SAE:
  """Loads an SAE saved in any of `FORMATS` (detected from `path` when `format` is None).

  Args:
    path: the SAE's folder, or one of its files (for Gemma Scope: the
      `.../average_l0_N` folder or the `params.npz` file).
    format: one of `FORMATS` to skip detection.
    dtype: cast the weights (e.g. `jnp.bfloat16`); default: as stored (float16
      and float64 become float32). The threshold is always float32.

  Returns:
    An `SAE` in raw activation units, with provenance.

  Raises:
    FileNotFoundError: nothing at `path`.
    FormatError: no known format there, or a file is malformed (names the file,
      the key and the expectation).
  """
  path = Path(path).expanduser()
  if format is None:
    format, target = detect_format(path)
  else:
    format = _canonical_format(format)
    if not path.exists():
      raise FileNotFoundError(f"{path}: no such file or folder.")
    target = path.parent if (path.is_file() and format != "gemma_scope") else path
  return _LOADERS[format](target, dtype)


def save(sae: SAE, path: str | os.PathLike, format: str = "jsae", *,
         overwrite: bool = False, **layout) -> Path:
  """Writes `sae` to `path` in `format`; returns the folder (or file) written.

  Args:
    sae: the SAE (raw units, as every `SAE` is).
    path: output folder (Gemma Scope also takes a `.npz` file path).
    format: one of `FORMATS`.
    overwrite: replace existing files instead of raising FileExistsError.
    **layout: folder layout under `path` for the Gemma Scope formats:
      gemma_scope: `layer`, `average_l0` (and optional `width`, default from
      d_sae, e.g. '16k') -> `layer_L/width_W/average_l0_N/params.npz`;
      gemma_scope_2: `layer`, `l0` (optional `site`, default the provenance's
      hook site or 'resid_post'; `width`) -> `site/layer_L_width_W_l0_X/`.
      The l0 given is also written to Gemma Scope 2's config.json.

  Weights keep the SAE's dtype in jsae and SAELens; Gemma Scope formats are
  float32. The threshold is always written as float32.
  """
  if not isinstance(sae, SAE):
    raise TypeError(f"save needs a jsae.SAE; got {type(sae).__name__}.")
  format = _canonical_format(format)
  saver = _SAVERS[format]
  sae = sae.replace(params=fold_pre_encoder_bias(raw_threshold(sae.params)))
  if layout:
    allowed = {"gemma_scope": ("layer", "width", "average_l0"),
               "gemma_scope_2": ("site", "layer", "width", "l0")}.get(format, ())
    unknown = sorted(set(layout) - set(allowed))
    if unknown:
      raise TypeError(f"save(format={format!r}) got unexpected option(s) {unknown};"
                      f" allowed: {list(allowed)}.")
  return saver(sae, Path(path).expanduser(), overwrite, **layout)


def read_run(workdir: str | os.PathLike, *, step: int | None = None
             ) -> tuple[JumpReLUParams, dict, dict]:
  """(training-time params, checkpoint meta, provenance) of a jsae run directory.

  Restores the full TrainState of the checkpoint (built abstractly as the
  trainer does) and returns its params; see `SAE.from_run`.

  Raises:
    FileNotFoundError: not a run directory, or no finished checkpoint (or not `step`).
    FormatError: the run trained a family other than JumpReLU.
  """
  import ml_collections
  from jsae import checkpoint, optim, train
  from jsae import config as config_lib

  workdir = Path(workdir).expanduser().absolute()
  ckpt_dir = workdir / "checkpoints"
  if not workdir.is_dir():
    raise FileNotFoundError(f"{workdir}: no such run directory; pass the --workdir of a"
                            " `jsae train` run.")
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f"{ckpt_dir}: missing; {workdir} is not a jsae run directory"
                            " (expected config.json and checkpoints/ from `jsae train`).")
  manager = checkpoint.make_manager(workdir, async_save=False)
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(
          f"{ckpt_dir}: no finished checkpoint. Training writes one every"
          " config.ckpt.every_steps steps and at the end; train longer, or wait for the"
          " first checkpoint to finish.")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"{ckpt_dir}: no finished checkpoint at step {step};"
                              f" available steps: {steps}.")
    meta = checkpoint.latest_meta(manager)
    if meta.get("family") != "jumprelu":
      raise FormatError(f"{ckpt_dir}: meta key 'family' is {meta.get('family')!r};"
                        " export supports 'jumprelu' only.")
    config = ml_collections.ConfigDict(meta["config"])
    optimizer = optim.make_optimizer(config.optim,
                                     total_steps=config_lib.total_steps(config))
    init = functools.partial(train.create_state, config=config, optimizer=optimizer)
    abstract = jax.eval_shape(init, jax.random.key(config.seed))
    state, meta = checkpoint.restore(manager, abstract, step)
  finally:
    manager.close()
  provenance = _run_provenance(workdir, config, meta, int(state.step))
  return state.params, meta, provenance


def _run_provenance(workdir: Path, config, meta: dict, step: int) -> dict:
  """What a run knows about its activations and training, as a JSON-able dict."""
  prov: dict[str, Any] = dict(
      source_format="jsae_run", run_dir=str(workdir), step=step,
      norm_scale=float(meta["norm_scale"]), data_source=config.data.source,
      threshold_param=config.sae.threshold_param,
      sparsity=config.loss.sparsity, sparsity_coeff=float(config.loss.sparsity_coeff),
      tokens=step * int(config.data.batch_size))
  if config.data.source == "shards":
    prov["shards_dir"] = str(config.data.shards_dir)
    try:
      from jsae.data import shards
      manifest = shards.load_manifest(config.data.shards_dir)
      prov.update(_known(manifest.provenance.to_dict()))
    except Exception as e:  # the shards may have moved; the SAE is still usable
      prov["provenance_error"] = (f"could not read the shard manifest in"
                                  f" {config.data.shards_dir}: {e}")
  elif config.data.source == "synthetic":
    prov["model"] = "synthetic"
    prov["synthetic"] = config.data.synthetic.to_dict()
  return prov


def export(run_dir: str | os.PathLike, out: str | os.PathLike, format: str = "jsae", *,
           step: int | None = None, fold_decoder_norm: bool | None = None,
           overwrite: bool = False, **layout) -> Path:
  """`jsae export RUN_DIR --format=... OUT`: a run's latest checkpoint, folded, saved.

  Args:
    run_dir: a `jsae train` workdir.
    out: output folder (or `.npz` file for gemma_scope).
    format: one of `FORMATS`.
    step: checkpoint step (default: latest).
    fold_decoder_norm: see `SAE.from_run` (default: when rows were not kept unit norm).
    overwrite: replace existing output files.
    **layout: Gemma Scope folder layout options (see `save`).

  Returns:
    The folder (or file) written.
  """
  sae = SAE.from_run(run_dir, step=step, fold_decoder_norm=fold_decoder_norm)
  return save(sae, out, format, overwrite=overwrite, **layout)


__all__ = ["FORMATS", "FormatError", "SAE", "detect_format", "export", "load",
           "read_run", "save"]
