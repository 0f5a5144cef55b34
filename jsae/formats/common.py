"""What every SAE format shares: errors, file readers and writers, validation, hook names.

Formats store SAEs in raw LM units with the pre-encoder bias folded (`jsae.sae`).
"""

from __future__ import annotations

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

from jsae import saes
from jsae.sae import SAE
from jsae.saes import base as saes_base

# Hook-site names: jsae site -> TransformerLens hook (SAELens) and Hugging Face
# Gemma 3 module path (Gemma Scope 2 config.json).
TL_HOOKS = {"resid_post": "blocks.{layer}.hook_resid_post",
            "resid_pre": "blocks.{layer}.hook_resid_pre",
            "resid_mid": "blocks.{layer}.hook_resid_mid",
            "mlp_in": "blocks.{layer}.hook_mlp_in",
            "mlp_out": "blocks.{layer}.hook_mlp_out",
            "attn_out": "blocks.{layer}.hook_attn_out",
            "attn_z": "blocks.{layer}.attn.hook_z"}
# mlp_in / mlp_out are a Gemma Scope 2 transcoder's input and output (SAELens's
# Gemma 3 loader maps them to blocks.L.hook_mlp_in / hook_mlp_out).
HF_HOOKS = {"resid_post": "model.layers.{layer}.output",
            "mlp_in": "model.layers.{layer}.pre_feedforward_layernorm.output",
            "mlp_out": "model.layers.{layer}.post_feedforward_layernorm.output",
            "attn_z": "model.layers.{layer}.self_attn.o_proj.input"}

# Expected shape of each parameter name, in d_in / d_sae (anything else: [d_sae]).
SHAPES = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_out"), "b_dec": ("d_out",),
          "W_skip": ("d_in", "d_out")}
# Parameters a file may leave out (a skip transcoder's W_skip: absent for SAEs).
OPTIONAL = ("W_skip",)


class FormatError(ValueError):
  """A file or folder is not a valid SAE in the format it claims or was asked for."""


# ----------------------------------------------------------------------------- helpers


def read_json(file: Path) -> dict:
  if not file.is_file():
    raise FormatError(f"{file}: missing; expected a JSON config file here.")
  try:
    obj = json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise FormatError(f"{file}: not valid JSON ({e}).") from e
  if not isinstance(obj, dict):
    raise FormatError(f"{file}: expected a JSON object, found {type(obj).__name__}.")
  return obj


def read_safetensors(file: Path) -> dict[str, np.ndarray]:
  if not file.is_file():
    raise FormatError(f"{file}: missing; expected a safetensors weights file here.")
  try:
    return dict(st.load_file(str(file)))
  except Exception as e:  # safetensors raises its own error types
    raise FormatError(f"{file}: not a readable safetensors file ({e}).") from e


def read_npz(file: Path) -> dict[str, np.ndarray]:
  if not file.is_file():
    raise FormatError(f"{file}: missing; expected a Gemma Scope params.npz here.")
  try:
    with np.load(file, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except Exception as e:  # zipfile / pickle / format errors
    raise FormatError(f"{file}: not a readable .npz archive ({e}).") from e


def is_float(a: np.ndarray) -> bool:
  return bool(jnp.issubdtype(a.dtype, jnp.floating))


def host(a) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(jax.device_get(a)))


def check_int(cfg: dict, key: str, file: Path, *, required: bool = True) -> int | None:
  if key not in cfg or cfg[key] is None:
    if required:
      raise FormatError(f"{file}: missing key {key!r}; expected a positive integer.")
    return None
  value = cfg[key]
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise FormatError(f"{file}: key {key!r} is {value!r}; expected a positive integer.")
  return value


def fold_scaling_factor(arrays: dict[str, np.ndarray], file: Path) -> dict[str, np.ndarray]:
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


def site_and_layer(prov: dict) -> tuple[str | None, int | None]:
  """(site, layer) from provenance: `hook_site` ('resid_post' or 'resid_post.9'), `layer`."""
  site, layer = prov.get("hook_site") or None, prov.get("layer")
  if isinstance(site, str) and "." in site:
    site, _, tail = site.partition(".")
    if tail.isdigit() and layer is None:
      layer = int(tail)
  return site, (int(layer) if isinstance(layer, (int, np.integer)) else None)


def site_text(prov: dict) -> str | None:
  """The provenance's input site as 'mlp_in.6' (or 'mlp_in' without a layer), or None."""
  site, layer = site_and_layer(prov)
  if not site:
    return None
  return site if layer is None else f"{site}.{layer}"


def hook_name(prov: dict, table: dict[str, str]) -> str | None:
  site, layer = site_and_layer(prov)
  if site in table and layer is not None:
    return table[site].format(layer=layer)
  return None


def parse_hook(name: Any, table: dict[str, str]) -> dict:
  """{'hook_site', 'layer'} parsed from a hook name in `table`'s notation, or {}."""
  if not isinstance(name, str):
    return {}
  for site, template in table.items():
    pattern = re.escape(template).replace(re.escape("{layer}"), r"(\d+)")
    m = re.fullmatch(pattern, name)
    if m:
      return {"hook_site": site, "layer": int(m.group(1))}
  return {}


def width_name(d_sae: int) -> str:
  """Gemma Scope folder width: 16384 -> '16k', 2**20 -> '1m', else the number."""
  if d_sae % (1 << 20) == 0:
    return f"{d_sae >> 20}m"
  if d_sae % 1024 == 0:
    return f"{d_sae // 1024}k"
  return str(d_sae)


def check_writable(files: list[Path], overwrite: bool) -> None:
  for f in files:
    if f.exists() and not overwrite:
      raise FileExistsError(f"{f} exists; pass overwrite=True (CLI: --overwrite) or"
                            " choose another output path.")
  for f in files:
    f.parent.mkdir(parents=True, exist_ok=True)


def write_atomic(file: Path, write: Callable[[Path], None]) -> None:
  """Calls `write(tmp)` then renames tmp to `file`, so readers never see half a file."""
  tmp = file.with_name(file.name + ".tmp")
  try:
    write(tmp)
    os.replace(tmp, file)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_json(file: Path, obj: dict) -> None:
  text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
  write_atomic(file, lambda tmp: tmp.write_text(text))


def write_safetensors(file: Path, arrays: dict[str, np.ndarray],
                       metadata: dict[str, str] | None = None) -> None:
  write_atomic(file, lambda tmp: st.save_file(arrays, str(tmp), metadata=metadata))


def known(d: dict) -> dict:
  """`d` without empty values."""
  return {k: v for k, v in d.items() if v not in (None, "", [], {})}


def shape_text(key: str, transcoder: bool = False) -> str:
  """'[d_in, d_sae]' for W_enc, '[d_sae]' for a per-latent vector, ... (an SAE's d_out
  is its d_in)."""
  dims = SHAPES.get(key, ("d_sae",))
  return "[" + ", ".join(d if transcoder or d != "d_out" else "d_in" for d in dims) + "]"


def params_from_arrays(family: str, arrays: dict[str, np.ndarray], file: Path, *,
                       claims: dict[str, tuple[str, int | None]] | None = None,
                       claims_file: Path | None = None, transcoder: bool = False, **static):
  """Validated parameters of `family` from arrays named as its parameter fields.

  Args:
    family: the family whose `params_type` to build.
    arrays: the arrays (other keys are the caller's business).
    file: the weights file, for error messages.
    claims: {config key: (quantity, value)} with quantity 'd_in' or 'd_sae', from
      a config, checked against the shapes.
    claims_file: the config file making the claims.
    transcoder: the decoder may have another width than the encoder (d_out, read
      from W_dec), and W_skip may be present; an SAE's d_out is its d_in.
    **static: the params type's static fields (pre_encoder_bias, k, ...).
  """
  params_type = saes.get(family).params_type
  keys = [f for f in params_type.__dataclass_fields__
          if params_type.__dataclass_fields__[f].metadata.get("pytree_node", True)
          and (f not in OPTIONAL or (transcoder and f in arrays))]
  missing = [k for k in keys if k not in arrays]
  if missing:
    raise FormatError(f"{file}: missing key(s) {missing}; expected {keys}"
                      f" ({', '.join(f'{k} {shape_text(k, transcoder)}' for k in keys)}),"
                      f" found {sorted(arrays)}.")
  for k in keys:
    if not is_float(arrays[k]):
      raise FormatError(f"{file}: key {k!r} has dtype {arrays[k].dtype}; expected a"
                        " floating-point array.")
  W_enc = arrays["W_enc"]
  if W_enc.ndim != 2:
    raise FormatError(f"{file}: key 'W_enc' has shape {tuple(W_enc.shape)}; expected a"
                      " 2-D [d_in, d_sae] matrix.")
  d_in, d_sae = W_enc.shape
  W_dec = arrays["W_dec"]
  d_out = W_dec.shape[-1] if transcoder and W_dec.ndim == 2 else d_in
  size = {"d_in": d_in, "d_sae": d_sae, "d_out": d_out}
  for k in keys:
    shape = tuple(size[q] for q in SHAPES.get(k, ("d_sae",)))
    if tuple(arrays[k].shape) != shape:
      raise FormatError(
          f"{file}: key {k!r} has shape {tuple(arrays[k].shape)}; expected {k}"
          f" {shape_text(k, transcoder)} = {shape} to match W_enc of shape (d_in, d_sae) ="
          f" {(d_in, d_sae)}" + (f" (and W_dec's width d_out = {d_out})." if transcoder
                                 else "."))
  for key, (quantity, claim) in (claims or {}).items():
    if claim is not None and claim != size[quantity]:
      raise FormatError(
          f"{claims_file}: key {key!r} is {claim}, but the weights in {file} have"
          f" {quantity} = {size[quantity]} (W_enc shape {(d_in, d_sae)}); expected"
          " them to agree.")
  for k in keys:
    if not np.all(np.isfinite(arrays[k].astype(np.float32))):
      raise FormatError(f"{file}: key {k!r} holds NaN or Inf values; expected finite"
                        " numbers.")

  dtype = W_enc.dtype
  def weight(k):  # float32 and bfloat16 stay; float16/float64 become float32
    a = arrays[k]
    if k == "threshold":
      return jnp.asarray(a.astype(np.float32))
    a = a.astype(dtype)
    keep = a.dtype in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16))
    return jnp.asarray(a if keep else a.astype(np.float32))
  return params_type(**{k: weight(k) for k in keys}, **static)


def to_sae(params, provenance: dict, dtype, *, transcoder: bool = False) -> SAE:
  """An SAE from loaded inference params, cast to `dtype` when given.

  `transcoder` comes from the file's config, not the shapes: an MLP transcoder of
  Gemma has d_out == d_in and may have no skip.
  """
  sae = SAE.from_params(params, provenance, transcoder=transcoder)
  return sae.astype(dtype) if dtype is not None else sae


def has_skip(sae: SAE) -> bool:
  """Whether `sae` has an affine skip W_skip `[d_in, d_out]` (a skip transcoder)."""
  return getattr(sae.params, "W_skip", None) is not None


def target_hook(prov: dict, table: dict[str, str]) -> str | None:
  """The hook name of a transcoder's output site (provenance `target_site`, e.g.
  'mlp_out.6'; a bare 'mlp_out' takes the provenance's `layer`), or None."""
  target = prov.get("target_site")
  if not isinstance(target, str) or not target:
    return None
  layer = None if "." in target else prov.get("layer")
  return hook_name({"hook_site": target, "layer": layer}, table)


def parse_target(name: Any, table: dict[str, str]) -> dict:
  """{'target_site': 'mlp_out.6'} from an output hook name in `table`'s notation, or {}."""
  parsed = parse_hook(name, table)
  return {"target_site": f"{parsed['hook_site']}.{parsed['layer']}"} if parsed else {}


def check_skip_agrees(claimed: bool, present: bool, *, w_file: Path, key: str,
                      cfg_file: Path, flag: str) -> None:
  """FormatError when a config's skip flag and the weights' skip matrix disagree.

  Args:
    claimed: the config says the transcoder has an affine skip.
    present: the weights file holds the skip matrix under `key`.
    flag: how the config says it (e.g. "key 'affine_connection' is false").
  """
  if claimed and not present:
    raise FormatError(
        f"{w_file}: missing key {key!r}: {cfg_file} says the transcoder has an affine skip"
        f" connection ({flag}). Add the skip matrix to the weights, or set the config"
        " to say there is none.")
  if present and not claimed:
    raise FormatError(
        f"{w_file}: key {key!r} holds an affine skip connection, but {cfg_file} says there"
        f" is none ({flag}); expected them to agree. Set the config to say there is a"
        f" skip, or remove {key!r} from the weights.")


def weights(sae: SAE, *, dtype=None, names: dict[str, str] | None = None
            ) -> dict[str, np.ndarray]:
  """Host arrays of the SAE's parameters (a threshold float32), under `names` if given."""
  arrays = {}
  for k in saes_base.array_fields(sae.params):
    if getattr(sae.params, k) is None:  # an SAE's (or plain transcoder's) absent W_skip
      continue
    a = host(getattr(sae.params, k))
    if k == "threshold":
      a = a.astype(np.float32)
    elif dtype is not None:
      a = a.astype(dtype)
    arrays[names.get(k, k) if names else k] = a
  return arrays


def require_sae(sae: SAE, format: str) -> None:
  """Raises FormatError when `sae` is a transcoder (formats that hold SAEs only)."""
  if sae.transcoder or has_skip(sae):
    raise FormatError(
        f"a transcoder cannot be saved as {format}: that format holds SAEs only (one site"
        " read and reconstructed, no affine skip). Save it with format='jsae',"
        " 'gemma_scope_2' (JumpReLU) or 'saelens' (JumpReLU or ReLU) instead.")


def require_jumprelu(sae: SAE, format: str) -> None:
  """Raises FormatError when `sae` is not a JumpReLU SAE (formats that hold only those)."""
  if sae.family != "jumprelu":
    raise FormatError(
        f"a {sae.family!r} SAE cannot be saved as {format}: that format holds JumpReLU"
        " SAEs only (JumpReLU, BatchTopK, Matryoshka and Gated SAEs export as JumpReLU)."
        " Save it with format='jsae' or format='saelens' instead.")
