"""The jsae format: a folder with `sae.safetensors` + `config.json`.

  sae.safetensors   every parameter array of the inference family (W_enc
                    [d_in, d_sae], W_dec [d_sae, d_out], b_enc, b_dec [d_out];
                    JumpReLU's threshold; a skip transcoder's W_skip [d_in, d_out]),
                    in the SAE's dtype (thresholds float32)
  config.json       format marker and schema version, family ('jumprelu', 'relu'
                    or 'topk'), d_in, d_sae, dtype, threshold convention,
                    pre_encoder_bias, k (TopK), the inference formula, and the
                    provenance (the training family among it); for a transcoder
                    also `transcoder` (true), `d_out`, `skip` (whether W_skip is in
                    the weights), `hook_site` and `target_site`

Version 1 (jsae 0.1) held JumpReLU SAEs only; version 2 every inference family;
version 3 adds transcoders of every family. SAEs are still written as version 2,
so older jsae reads them; a transcoder is written as version 3, which older jsae
refuses (it would drop W_skip and the output site) instead of misreading it.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from jsae import saes
from jsae.formats import common
from jsae.formats.common import FormatError
from jsae.sae import SAE

NAME = "jsae"
LAYOUT = "config.json + sae.safetensors"
FAMILIES = tuple(saes.inference_names())
FORMAT = "jsae-sae"
FORMAT_VERSION = 3
SAE_VERSION = 2  # what an SAE is written as: older jsae reads it
CONFIG, WEIGHTS = "config.json", "sae.safetensors"
TRANSCODER_FAMILIES = FAMILIES
HOLDS_SKIP = True
# The encoder of each family, as the config's `inference` formula states it.
_ENCODE = {
    "jumprelu": "pi = x @ W_enc + b_enc; f = pi * (pi > max(threshold, 0))",
    "relu": "pi = x @ W_enc + b_enc; f = relu(pi)",
    "topk": "pi = x @ W_enc + b_enc; f = relu(pi) on each row's k largest pi (ties: lower"
            " index)",
}


def _inference(family: str, transcoder: bool, skip: bool) -> str:
  """The formula written to config.json: an SAE reconstructs x, a transcoder predicts y."""
  out = "y_hat" if transcoder else "x_hat"
  return f"{_ENCODE[family]}; {out} = f @ W_dec + b_dec" + (" + x @ W_skip" if skip else "")


def detect(path: Path) -> Path | None:
  """The folder this format reads at `path`, or None."""
  if path.is_file():
    return path.parent if path.name == WEIGHTS else None
  return path if (path / WEIGHTS).is_file() and (path / CONFIG).is_file() else None


def _flag(cfg: dict, key: str, default: bool, file: Path) -> bool:
  value = cfg.get(key, default)
  if not isinstance(value, bool):
    raise FormatError(f"{file}: key {key!r} is {value!r}; expected true or false.")
  return value


def load(folder: Path, dtype) -> SAE:
  """Reads a jsae SAE folder."""
  cfg_file, w_file = folder / CONFIG, folder / WEIGHTS
  cfg = common.read_json(cfg_file)
  if cfg.get("format") != FORMAT:
    raise FormatError(f"{cfg_file}: key 'format' is {cfg.get('format')!r}; expected"
                      f" {FORMAT!r} (a jsae SAE config).")
  version = cfg.get("format_version")
  if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
    raise FormatError(f"{cfg_file}: key 'format_version' is {version!r}; this jsae reads"
                      f" versions 1..{FORMAT_VERSION} (upgrade jsae for newer ones).")
  family = cfg.get("family")
  if family not in FAMILIES:
    raise FormatError(f"{cfg_file}: key 'family' is {family!r}; expected one of"
                      f" {list(FAMILIES)}.")
  if cfg.get("units", "raw") != "raw":
    raise FormatError(f"{cfg_file}: key 'units' is {cfg.get('units')!r}; expected 'raw'"
                      " (weights for the LM's own activations).")
  provenance = cfg.get("provenance", {})
  if not isinstance(provenance, dict):
    raise FormatError(f"{cfg_file}: key 'provenance' is {provenance!r}; expected an"
                      " object.")
  static = {"pre_encoder_bias": _flag(cfg, "pre_encoder_bias", False, cfg_file)}
  if family == "jumprelu":
    convention = cfg.get("threshold", "raw")
    if convention not in ("raw", "log"):
      raise FormatError(f"{cfg_file}: key 'threshold' is {convention!r}; expected 'raw'"
                        " (theta) or 'log' (log theta).")
    static["log_threshold"] = convention == "log"
  if family == "topk":
    static["k"] = common.check_int(cfg, "k", cfg_file)
  transcoder = _flag(cfg, "transcoder", False, cfg_file)
  arrays = common.read_safetensors(w_file)
  _check_skip(cfg, transcoder, "W_skip" in arrays, cfg_file, w_file)
  claims = {k: (k, common.check_int(cfg, k, cfg_file)) for k in ("d_in", "d_sae")}
  if transcoder:
    claims["d_out"] = ("d_out", common.check_int(cfg, "d_out", cfg_file))
  params = common.params_from_arrays(family, arrays, w_file, claims=claims,
                                     claims_file=cfg_file, transcoder=transcoder, **static)
  if family == "topk" and not static["k"] <= params.W_enc.shape[1]:
    raise FormatError(f"{cfg_file}: key 'k' is {static['k']}, more than d_sae ="
                      f" {params.W_enc.shape[1]}.")
  stored = jnp.dtype(arrays["W_enc"].dtype).name
  if "dtype" in cfg and cfg["dtype"] != stored:
    raise FormatError(f"{cfg_file}: key 'dtype' is {cfg['dtype']!r}, but W_enc in"
                      f" {w_file} is {stored}; expected them to agree.")
  return common.to_sae(params, provenance, dtype, transcoder=transcoder)


def _check_skip(cfg: dict, transcoder: bool, present: bool, cfg_file: Path,
                w_file: Path) -> None:
  """FormatError when W_skip's presence and the config's `transcoder` / `skip` disagree."""
  if not transcoder:
    if present:
      raise FormatError(
          f"{w_file}: key 'W_skip' holds an affine skip connection, but {cfg_file} describes"
          " an SAE (key 'transcoder' is false or absent); expected no W_skip. Set"
          " \"transcoder\": true, \"skip\": true and d_out in the config, or remove W_skip.")
    return
  skip = _flag(cfg, "skip", False, cfg_file)
  common.check_skip_agrees(skip, present, w_file=w_file, key="W_skip", cfg_file=cfg_file,
                           flag=f"key 'skip' is {str(skip).lower()}")


def save(sae: SAE, path: Path, overwrite: bool) -> Path:
  """Writes `sae` as a jsae folder at `path`."""
  from jsae import __version__  # pylint: disable=import-outside-toplevel
  cfg_file, w_file = path / CONFIG, path / WEIGHTS
  common.check_writable([cfg_file, w_file], overwrite)
  config = dict(
      format=FORMAT, format_version=SAE_VERSION, jsae_version=__version__,
      family=sae.family, d_in=sae.d_in, d_sae=sae.d_sae, dtype=sae.dtype.name,
      pre_encoder_bias=False, units="raw", inference=_inference(sae.family, False, False),
      weights=WEIGHTS, provenance=sae.provenance)
  if sae.family == "jumprelu":
    config.update(threshold="raw", threshold_dtype="float32")
  if sae.family == "topk":
    config["k"] = sae.k
  if sae.transcoder or common.has_skip(sae):
    config.update(_transcoder_config(sae))
  common.write_safetensors(w_file, common.weights(sae), metadata={"format": FORMAT})
  common.write_json(cfg_file, config)
  return path


def _transcoder_config(sae: SAE) -> dict:
  """The config keys of a transcoder: version 3, d_out, skip, the sites it maps."""
  skip = common.has_skip(sae)
  prov = sae.provenance
  return dict(format_version=FORMAT_VERSION, transcoder=True, d_out=sae.d_out, skip=skip,
              inference=_inference(sae.family, True, skip),
              **common.known({"hook_site": common.site_text(prov),
                              "target_site": prov.get("target_site")}))
