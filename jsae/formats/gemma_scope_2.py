"""Gemma Scope 2 (Gemma 3) folders: JumpReLU SAEs only.

`params.safetensors` with lowercase keys w_enc, w_dec, b_enc, b_dec, threshold
(float32, same semantics as Gemma Scope) + `config.json` with `width`,
`model_name`, `architecture` ("jump_relu"), `l0`, `affine_connection`,
`hf_hook_point_in`, `hf_hook_point_out`, `type` ("sae"). Layout
`{site}/layer_{L}_width_{W}_l0_{size}/`. Field names are taken from SAELens'
Gemma 3 loader and released config.json files seen in public code;
transcoders, skip connections and CLTs are refused. jsae adds one key,
`jsae_provenance`, which other readers ignore.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jsae.formats import common
from jsae.formats.common import FormatError
from jsae.sae import SAE

NAME = "gemma_scope_2"
LAYOUT = "params.safetensors + config.json"
FAMILIES = ("jumprelu",)
CONFIG, WEIGHTS = "config.json", "params.safetensors"
_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def detect(path: Path) -> Path | None:
  """The folder this format reads at `path`, or None."""
  if path.is_file():
    return path.parent if path.name == WEIGHTS else None
  return path if (path / WEIGHTS).is_file() else None


def load(folder: Path, dtype) -> SAE:
  """Reads a Gemma Scope 2 folder."""
  cfg_file, w_file = folder / CONFIG, folder / WEIGHTS
  cfg = common.read_json(cfg_file) if cfg_file.exists() else {}
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
  raw = common.read_safetensors(w_file)
  arrays = {}
  for k, v in raw.items():
    name = "W_" + k[2:] if k.startswith("w_") else k
    if name not in _KEYS:
      raise FormatError(f"{w_file}: unexpected key {k!r}; expected only"
                        f" {['w_enc', 'w_dec', 'b_enc', 'b_dec', 'threshold']} (skip"
                        " connections and transcoders are not supported).")
    arrays[name] = v
  claims = {"width": ("d_sae", common.check_int(cfg, "width", cfg_file, required=False))}
  params = common.params_from_arrays("jumprelu", arrays, w_file, claims=claims,
                                     claims_file=cfg_file, pre_encoder_bias=False)
  provenance = cfg.get("jsae_provenance")
  if not isinstance(provenance, dict):
    upstream = {k: v for k, v in cfg.items() if k != "jsae_provenance"}
    provenance = dict(source_format="gemma_scope_2", source_path=str(folder.absolute()),
                      **common.known({"model": cfg.get("model_name"), "l0": cfg.get("l0")}),
                      **common.parse_hook(cfg.get("hf_hook_point_in"), common.HF_HOOKS),
                      gemma_scope_2=upstream)
  return common.to_sae(params, provenance, dtype)


def save(sae: SAE, path: Path, overwrite: bool, *,
         site: str | None = None, layer: int | None = None,
         width: str | int | None = None, l0: str | int | None = None
         ) -> Path:
  """Writes `sae` as a Gemma Scope 2 folder (layout site/layer_L_width_W_l0_X with `layer`)."""
  prov = sae.provenance
  if layer is not None:
    if l0 is None:
      raise ValueError("the Gemma Scope 2 layout {site}/layer_L_width_W_l0_X needs l0"
                       " (e.g. 'small', 'medium', 'big') as well as layer.")
    site = site or common.site_and_layer(prov)[0] or "resid_post"
    width = common.width_name(sae.d_sae) if width is None else width
    path = path / site / f"layer_{int(layer)}_width_{width}_l0_{l0}"
  elif site is not None or width is not None:
    raise ValueError("site and width build the Gemma Scope 2 folder layout; pass layer"
                     " and l0 too.")
  common.require_jumprelu(sae, "gemma_scope_2")
  cfg_file, w_file = path / CONFIG, path / WEIGHTS
  common.check_writable([cfg_file, w_file], overwrite)
  upstream = prov.get("gemma_scope_2") if isinstance(prov.get("gemma_scope_2"), dict) else {}
  hook = upstream.get("hf_hook_point_in") or common.hook_name(prov, common.HF_HOOKS)
  if hook is None and layer is not None:
    hook = common.hook_name({"hook_site": site, "layer": int(layer)}, common.HF_HOOKS)
  config = {**upstream, "width": sae.d_sae, "architecture": "jump_relu",
            "affine_connection": False, "type": "sae", "hf_hook_point_in": hook,
            "hf_hook_point_out": hook, "model_name": prov.get("model") or
            upstream.get("model_name"),
            "l0": l0 if l0 is not None else prov.get("l0", upstream.get("l0")),
            "jsae_provenance": prov}
  names = {"W_enc": "w_enc", "W_dec": "w_dec"}
  common.write_safetensors(w_file, common.weights(sae, dtype=np.float32, names=names))
  common.write_json(cfg_file, config)
  return path
