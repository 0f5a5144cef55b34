"""Gemma Scope 2 (Gemma 3) folders: JumpReLU SAEs and JumpReLU transcoders.

`params.safetensors` with lowercase keys w_enc [d_in, d_sae], w_dec [d_sae, d_out],
b_enc, b_dec [d_out], threshold (float32, same semantics as Gemma Scope: no b_dec
subtraction before the encoder) and, for a skip ("affine") transcoder,
affine_skip_connection [d_in, d_out] (y_hat = f @ w_dec + b_dec + x @
affine_skip_connection; jsae's W_skip as it is: SAELens's Gemma 3 loader notes it is
stored (d_in, d_out) and transposes it into its own [d_out, d_in] W_skip) +
`config.json` with `width`, `model_name`, `architecture` ("jump_relu"), `l0`,
`affine_connection` (true exactly when the skip is in the weights), `hf_hook_point_in`,
`hf_hook_point_out` (an SAE's is its input), `type` ("sae" or "transcoder").

Layouts: SAEs `{site}/layer_{L}_width_{W}_l0_{size}/`, transcoders
`transcoder/layer_{L}_width_{W}_l0_{size}/` with an `_affine` suffix for skip
transcoders (Gemma Scope 2's releases also have `transcoder_all/`). A transcoder
reads `model.layers.{L}.pre_feedforward_layernorm.output` (jsae's mlp_in.L) and
predicts `model.layers.{L}.post_feedforward_layernorm.output` (mlp_out.L). Field
names and values are those of released config.json files and SAELens's Gemma 3
loader; CLTs and crosscoders are refused. jsae adds one key, `jsae_provenance`,
which other readers ignore.
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
TRANSCODER_FAMILIES = ("jumprelu",)
HOLDS_SKIP = True
CONFIG, WEIGHTS = "config.json", "params.safetensors"
SKIP_KEY = "affine_skip_connection"
# File key -> jsae parameter name.
_NAMES = {"w_enc": "W_enc", "w_dec": "W_dec", "W_enc": "W_enc", "W_dec": "W_dec",
          "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold", SKIP_KEY: "W_skip"}
_FILE_NAMES = {"W_enc": "w_enc", "W_dec": "w_dec", "W_skip": SKIP_KEY}
# The folder Gemma Scope 2 keeps transcoders in (SAELens tells them by that name when a
# folder has no config.json).
_TRANSCODER_DIRS = ("transcoder", "transcoder_all")


def detect(path: Path) -> Path | None:
  """The folder this format reads at `path`, or None."""
  if path.is_file():
    return path.parent if path.name == WEIGHTS else None
  return path if (path / WEIGHTS).is_file() else None


def _arrays(raw: dict[str, np.ndarray], w_file: Path) -> dict[str, np.ndarray]:
  """The weights under jsae's parameter names (W_skip for affine_skip_connection)."""
  arrays = {}
  for k, v in raw.items():
    if k not in _NAMES:
      raise FormatError(f"{w_file}: unexpected key {k!r}; expected only w_enc, w_dec,"
                        f" b_enc, b_dec, threshold and (a skip transcoder's) {SKIP_KEY}.")
    arrays[_NAMES[k]] = v
  return arrays


def _is_transcoder(cfg: dict, cfg_file: Path, folder: Path, arrays: dict) -> bool:
  """Whether the folder holds a transcoder: config.json's `type`, else the folder's place
  (transcoder/...) or its weights (a skip, or an output width other than the input's)."""
  kind = cfg.get("type")
  if kind is None:
    w_enc, w_dec = arrays.get("W_enc"), arrays.get("W_dec")
    other_width = (w_enc is not None and w_dec is not None and w_enc.ndim == 2
                   and w_dec.ndim == 2 and w_dec.shape[1] != w_enc.shape[0])
    return folder.parent.name in _TRANSCODER_DIRS or "W_skip" in arrays or other_width
  if kind in ("clt", "crosscoder"):
    raise FormatError(f"{cfg_file}: key 'type' is {kind!r}; expected 'sae' or 'transcoder'"
                      " (cross-layer transcoders and crosscoders read or write several"
                      " layers at once, which a jsae SAE does not).")
  if kind not in ("sae", "transcoder"):
    raise FormatError(f"{cfg_file}: key 'type' is {kind!r}; expected 'sae' or"
                      " 'transcoder'.")
  return kind == "transcoder"


def _check_affine(cfg: dict, cfg_file: Path, w_file: Path, transcoder: bool,
                  present: bool) -> None:
  """FormatError when `affine_connection` and the weights' affine_skip_connection disagree."""
  flag = cfg.get("affine_connection")
  if flag is not None and not isinstance(flag, bool):
    raise FormatError(f"{cfg_file}: key 'affine_connection' is {flag!r}; expected true or"
                      " false.")
  if not transcoder:
    if flag or present:
      what = f"key {SKIP_KEY!r} in {w_file}" if present else "key 'affine_connection' true"
      raise FormatError(
          f"{cfg_file}: key 'type' is 'sae' but the folder has an affine skip connection"
          f" ({what}); expected an SAE to have none. A skip transcoder says \"type\":"
          " \"transcoder\", \"affine_connection\": true and its hf_hook_point_out.")
    return
  if flag is None:  # no config (or an old one): the weights say
    return
  common.check_skip_agrees(flag, present, w_file=w_file, key=SKIP_KEY, cfg_file=cfg_file,
                           flag=f"key 'affine_connection' is {str(flag).lower()}")


def load(folder: Path, dtype) -> SAE:
  """Reads a Gemma Scope 2 folder (an SAE or a transcoder)."""
  cfg_file, w_file = folder / CONFIG, folder / WEIGHTS
  cfg = common.read_json(cfg_file) if cfg_file.exists() else {}
  arch = cfg.get("architecture", "jump_relu")
  if arch not in ("jump_relu", "jumprelu"):
    raise FormatError(f"{cfg_file}: key 'architecture' is {arch!r}; expected 'jump_relu'.")
  arrays = _arrays(common.read_safetensors(w_file), w_file)
  transcoder = _is_transcoder(cfg, cfg_file, folder, arrays)
  _check_affine(cfg, cfg_file, w_file, transcoder, "W_skip" in arrays)
  claims = {"width": ("d_sae", common.check_int(cfg, "width", cfg_file, required=False))}
  params = common.params_from_arrays("jumprelu", arrays, w_file, claims=claims,
                                     claims_file=cfg_file, transcoder=transcoder,
                                     pre_encoder_bias=False)
  provenance = cfg.get("jsae_provenance")
  if not isinstance(provenance, dict):
    provenance = _provenance(cfg, folder, transcoder)
  return common.to_sae(params, provenance, dtype, transcoder=transcoder)


def _provenance(cfg: dict, folder: Path, transcoder: bool) -> dict:
  """What a released config.json says: model, l0, the sites (jsae names), the config."""
  upstream = {k: v for k, v in cfg.items() if k != "jsae_provenance"}
  target = (common.parse_target(cfg.get("hf_hook_point_out"), common.HF_HOOKS)
            if transcoder else {})
  return dict(source_format="gemma_scope_2", source_path=str(folder.absolute()),
              **common.known({"model": cfg.get("model_name"), "l0": cfg.get("l0")}),
              **common.parse_hook(cfg.get("hf_hook_point_in"), common.HF_HOOKS),
              **target, gemma_scope_2=upstream)


def _folder(sae: SAE, path: Path, site, layer, width, l0) -> Path:
  """`path`, or its published layout under it when `layer` is given."""
  if layer is None:
    if site is not None or width is not None:
      raise ValueError("site and width build the Gemma Scope 2 folder layout; pass layer"
                       " and l0 too.")
    return path
  if l0 is None:
    raise ValueError("the Gemma Scope 2 layout {site}/layer_L_width_W_l0_X needs l0"
                     " (e.g. 'small', 'medium', 'big') as well as layer.")
  if sae.transcoder:
    site = site or "transcoder"
  else:
    site = site or common.site_and_layer(sae.provenance)[0] or "resid_post"
  width = common.width_name(sae.d_sae) if width is None else width
  affine = "_affine" if common.has_skip(sae) else ""  # as the releases name skip ones
  return path / site / f"layer_{int(layer)}_width_{width}_l0_{l0}{affine}"


def _hooks(sae: SAE, upstream: dict, site, layer) -> tuple[str | None, str | None]:
  """(hf_hook_point_in, hf_hook_point_out): an upstream config's, else from the provenance,
  else from `layer` (a transcoder: the MLP's input and output)."""
  prov = sae.provenance
  hook_in = upstream.get("hf_hook_point_in") or common.hook_name(prov, common.HF_HOOKS)
  if not sae.transcoder:
    if hook_in is None and layer is not None:
      hook_in = common.hook_name({"hook_site": site or "resid_post", "layer": int(layer)},
                                 common.HF_HOOKS)
    return hook_in, hook_in
  hook_out = (upstream.get("hf_hook_point_out") if upstream.get("type") == "transcoder"
              else None) or common.target_hook(prov, common.HF_HOOKS)
  if layer is not None:
    hook_in = hook_in or common.HF_HOOKS["mlp_in"].format(layer=int(layer))
    hook_out = hook_out or common.HF_HOOKS["mlp_out"].format(layer=int(layer))
  return hook_in, hook_out


def save(sae: SAE, path: Path, overwrite: bool, *,
         site: str | None = None, layer: int | None = None,
         width: str | int | None = None, l0: str | int | None = None
         ) -> Path:
  """Writes `sae` as a Gemma Scope 2 folder (layout site/layer_L_width_W_l0_X with `layer`;
  a transcoder's site defaults to 'transcoder', a skip transcoder's folder ends `_affine`)."""
  common.require_jumprelu(sae, "gemma_scope_2")
  transcoder = sae.transcoder or common.has_skip(sae)
  sae = sae.replace(transcoder=transcoder)
  path = _folder(sae, path, site, layer, width, l0)
  cfg_file, w_file = path / CONFIG, path / WEIGHTS
  common.check_writable([cfg_file, w_file], overwrite)
  prov = sae.provenance
  upstream = prov.get("gemma_scope_2") if isinstance(prov.get("gemma_scope_2"), dict) else {}
  hook_in, hook_out = _hooks(sae, upstream, site, layer)
  config = {**upstream, "width": sae.d_sae, "architecture": "jump_relu",
            "affine_connection": common.has_skip(sae),
            "type": "transcoder" if transcoder else "sae", "hf_hook_point_in": hook_in,
            "hf_hook_point_out": hook_out, "model_name": prov.get("model") or
            upstream.get("model_name"),
            "l0": l0 if l0 is not None else prov.get("l0", upstream.get("l0")),
            "jsae_provenance": prov}
  arrays = common.weights(sae, dtype=np.float32, names=_FILE_NAMES)
  common.write_safetensors(w_file, arrays)
  common.write_json(cfg_file, config)
  return path
