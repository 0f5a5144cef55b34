"""Gemma Scope (Gemma 2) `params.npz`: JumpReLU SAEs only (no transcoders).

Keys W_enc, W_dec, b_enc, b_dec, threshold (some releases: lowercase
`w_enc`/`w_dec`, and a `scaling_factor`), float32, no b_dec subtraction before the
encoder. Published layout `layer_L/width_W/average_l0_N/params.npz`; load takes
that folder or the file itself.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from jsae.formats import common
from jsae.formats.common import FormatError
from jsae.sae import SAE

NAME = "gemma_scope"
LAYOUT = "params.npz"
FAMILIES = ("jumprelu",)
TRANSCODER_FAMILIES: tuple[str, ...] = ()
HOLDS_SKIP = False
# Keys of a skip connection in other releases (Gemma Scope 2, SAELens, jsae): refused,
# since this layout has no output site or skip to say what they mean.
_SKIP_KEYS = ("W_skip", "w_skip", "affine_skip_connection")
WEIGHTS = "params.npz"


def detect(path: Path) -> Path | None:
  """The file this format reads at `path`, or None."""
  if path.is_file():
    return path if path.suffix == ".npz" else None
  return path / WEIGHTS if (path / WEIGHTS).is_file() else None


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


def load(file: Path, dtype) -> SAE:
  """Reads a Gemma Scope params.npz (or the folder holding it)."""
  if file.is_dir():
    file = file / WEIGHTS
  arrays = common.read_npz(file)
  skip = [k for k in _SKIP_KEYS if k in arrays]
  if skip:
    raise FormatError(
        f"{file}: unexpected key {skip[0]!r} (an affine skip connection); a Gemma Scope"
        " params.npz holds an SAE: W_enc, W_dec, b_enc, b_dec, threshold. A skip"
        " transcoder belongs in a Gemma Scope 2 folder (params.safetensors with"
        " affine_skip_connection + config.json with \"affine_connection\": true), a jsae or"
        " a SAELens folder.")
  arrays = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in arrays.items()}
  arrays = common.fold_scaling_factor(arrays, file)
  params = common.params_from_arrays("jumprelu", arrays, file, pre_encoder_bias=False)
  provenance = dict(source_format="gemma_scope", source_path=str(file.absolute()),
                    **_gemma_scope_path_info(file.absolute()))
  return common.to_sae(params, provenance, dtype)


def save(sae: SAE, path: Path, overwrite: bool, *, layer: int | None = None,
         width: str | int | None = None, average_l0: int | None = None
         ) -> Path:
  """Writes `sae` as params.npz (layout layer_L/width_W/average_l0_N when `layer` is given)."""
  if layer is not None:
    if average_l0 is None:
      raise ValueError("the Gemma Scope layout layer_L/width_W/average_l0_N needs"
                       " average_l0 as well as layer.")
    width = common.width_name(sae.d_sae) if width is None else width
    path = path / f"layer_{int(layer)}" / f"width_{width}" / f"average_l0_{int(average_l0)}"
  elif width is not None or average_l0 is not None:
    raise ValueError("width and average_l0 build the Gemma Scope folder layout; pass"
                     " layer too.")
  common.require_sae(sae, "gemma_scope")
  common.require_jumprelu(sae, "gemma_scope")
  file = path if path.suffix == ".npz" else path / WEIGHTS
  common.check_writable([file], overwrite)
  arrays = common.weights(sae, dtype=np.float32)

  def write(tmp: Path):
    with open(tmp, "wb") as fh:
      np.savez(fh, **arrays)
  common.write_atomic(file, write)
  return file
