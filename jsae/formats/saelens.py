"""SAELens folders (v6): `cfg.json` + `sae_weights.safetensors`.

Architectures and tensor keys (SAELens loads them strictly):

  jumprelu   W_enc, W_dec, b_enc, b_dec, threshold      jsae jumprelu (and the
                                                        JumpReLU forms of BatchTopK,
                                                        Matryoshka and Gated SAEs)
  standard   W_enc, W_dec, b_enc, b_dec                  jsae relu
  topk       W_enc, W_dec, b_enc, b_dec; cfg k           jsae topk
  gated      W_enc, W_dec, b_dec, b_gate, b_mag, r_mag   loaded as its exact JumpReLU form

Transcoders (SAELens 6.54 `sae_lens/saes/transcoder.py`; cfg `d_out`, metadata
`hook_name_out`; W_dec [d_sae, d_out], b_dec [d_out]; no b_dec subtraction:
SAELens refuses `apply_b_dec_to_input` for them):

  transcoder                W_enc, W_dec, b_enc, b_dec             jsae relu transcoder
  skip_transcoder           + W_skip                               ... with skip
  jumprelu_transcoder       W_enc, W_dec, b_enc, b_dec, threshold  jsae jumprelu transcoder
  jumprelu_skip_transcoder  + W_skip                               ... with skip

SAELens stores W_skip as [d_out, d_in] and adds `x @ W_skip.T`; jsae's W_skip is
[d_in, d_out] (`x @ W_skip`), so it is transposed on load and save. SAELens has no
TopK transcoder: a jsae TopK transcoder is refused (save it as jsae).

On load: `apply_b_dec_to_input` is folded into b_enc; TopK's
`rescale_acts_by_decoder_norm` is folded into the weights (W_enc and b_enc
times ||d_i||, W_dec rows divided by it: the same selection and
reconstruction); `normalize_activations` must be "none"; SAELens < 6.48 wrote
`log_threshold`, which loads too. A TopK cfg without `k` gets SAELens's default 100.
On save: everything folded (`apply_b_dec_to_input` false, TopK
`rescale_acts_by_decoder_norm` false), `metadata.sae_lens_version` set so
SAELens takes its v6 path, and the training architecture (e.g. 'batchtopk')
recorded in `metadata.training_architecture`, as SAELens itself does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jsae import saes
from jsae.formats import common
from jsae.formats.common import FormatError
from jsae.sae import SAE
from jsae.saes import base as saes_base

NAME = "saelens"
LAYOUT = "cfg.json + sae_weights.safetensors"
FAMILIES = ("jumprelu", "relu", "topk")
TRANSCODER_FAMILIES = ("jumprelu", "relu")
HOLDS_SKIP = True
CONFIG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
# SAELens's default k when a topk cfg.json has none.
SAELENS_DEFAULT_K = 100
# Written when the provenance does not carry one: >= 6.0 selects SAELens's v6 loader.
SAELENS_VERSION = "6.54.12"

_ARCH_OF = {"jumprelu": "jumprelu", "relu": "standard", "topk": "topk"}
# (jsae family, skip) -> SAELens transcoder architecture, and back.
_TRANSCODER_ARCH = {("relu", False): "transcoder", ("relu", True): "skip_transcoder",
                    ("jumprelu", False): "jumprelu_transcoder",
                    ("jumprelu", True): "jumprelu_skip_transcoder"}
_TRANSCODER_OF = {arch: key for key, arch in _TRANSCODER_ARCH.items()}
_META_KEYS = ("model_name", "hook_name", "hook_head_index", "context_size",
              "prepend_bos", "dataset_path", "model_class_name",
              "exclude_special_tokens", "neuronpedia_id", "sae_lens_version",
              "sae_lens_training_version", "hook_name_out", "hook_head_index_out",
              "hf_hook_name", "hf_hook_name_out")


def detect(path: Path) -> Path | None:
  """The folder this format reads at `path`, or None."""
  if path.is_file():
    return path.parent if path.name in (WEIGHTS, CONFIG) else None
  return path if (path / WEIGHTS).is_file() and (path / CONFIG).is_file() else None


def _arrays(cfg: dict, cfg_file: Path, w_file: Path) -> tuple[str, dict, dict]:
  """(jsae family, arrays, static fields) of a SAELens folder, before folding."""
  arch = cfg.get("architecture", "standard")
  arrays = common.fold_scaling_factor(common.read_safetensors(w_file), w_file)
  static = {}
  if arch == "jumprelu":
    if "threshold" not in arrays and "log_threshold" in arrays:
      arrays["threshold"] = arrays.pop("log_threshold")
      static["log_threshold"] = True
    return "jumprelu", arrays, static
  if arch == "standard":
    return "relu", arrays, static
  if arch == "topk":
    static["k"] = common.check_int(cfg, "k", cfg_file, required=False) or SAELENS_DEFAULT_K
    return "topk", arrays, static
  if arch == "gated":
    return "gated", arrays, static
  raise FormatError(f"{cfg_file}: key 'architecture' is {arch!r}; expected one of"
                    " 'jumprelu', 'standard', 'topk', 'gated' (SAELens SAE architectures)"
                    f" or {', '.join(repr(a) for a in _TRANSCODER_OF)} (its transcoders).")


def _check_normalisation(cfg: dict, cfg_file: Path) -> None:
  norm = cfg.get("normalize_activations", "none")
  if norm not in ("none", None, False):
    raise FormatError(
        f"{cfg_file}: key 'normalize_activations' is {norm!r}; expected 'none'. The"
        " weights expect inputs rescaled at run time; fold the scaling into the weights"
        " with SAELens (fold_activation_norm_scaling_factor) and save again.")


def _pre_bias(cfg: dict, cfg_file: Path, transcoder: bool) -> bool:
  """`apply_b_dec_to_input` (SAELens's default before v6 is true; a transcoder's is false,
  and SAELens refuses true: its b_dec lives in the output's space)."""
  pre_bias = cfg.get("apply_b_dec_to_input", not transcoder)
  if not isinstance(pre_bias, bool):
    raise FormatError(f"{cfg_file}: key 'apply_b_dec_to_input' is {pre_bias!r}; expected"
                      " true or false.")
  if pre_bias and transcoder:
    raise FormatError(
        f"{cfg_file}: key 'apply_b_dec_to_input' is true for architecture"
        f" {cfg.get('architecture')!r}; expected false (a transcoder's b_dec has the"
        " output's width, and SAELens itself refuses this config). Set it to false.")
  return pre_bias


def load(folder: Path, dtype) -> SAE:
  """Reads a SAELens folder of any inference architecture (an SAE or a transcoder)."""
  cfg_file, w_file = folder / CONFIG, folder / WEIGHTS
  cfg = common.read_json(cfg_file)
  _check_normalisation(cfg, cfg_file)
  if cfg.get("architecture") in _TRANSCODER_OF:
    return _load_transcoder(cfg, cfg_file, w_file, folder, dtype)
  pre_bias = _pre_bias(cfg, cfg_file, False)
  family, arrays, static = _arrays(cfg, cfg_file, w_file)
  if "W_skip" in arrays:
    raise FormatError(
        f"{w_file}: unexpected key 'W_skip' (an affine skip connection) for architecture"
        f" {cfg.get('architecture', 'standard')!r} in {cfg_file}; expected an SAE's keys"
        " only. A skip transcoder's cfg.json says architecture 'skip_transcoder' or"
        " 'jumprelu_skip_transcoder' and d_out.")
  claims = {k: (k, common.check_int(cfg, k, cfg_file)) for k in ("d_in", "d_sae")}
  params = common.params_from_arrays(family, arrays, w_file, claims=claims,
                                     claims_file=cfg_file, pre_encoder_bias=pre_bias,
                                     **static)
  if family == "gated":  # exact: GAT App. E
    params = saes.get("gated").as_jumprelu(params)
  if family == "topk":
    if static["k"] > params.W_enc.shape[1]:
      raise FormatError(f"{cfg_file}: key 'k' is {static['k']}, more than d_sae ="
                        f" {params.W_enc.shape[1]}.")
    if cfg.get("rescale_acts_by_decoder_norm", False):
      params = saes_base.fold_decoder_norms_linear(saes_base.fold_pre_encoder_bias(params))
  return common.to_sae(params, _provenance(cfg, folder), dtype)


def _load_transcoder(cfg: dict, cfg_file: Path, w_file: Path, folder: Path, dtype) -> SAE:
  """Reads a SAELens transcoder folder (its W_skip [d_out, d_in] transposed to jsae's)."""
  arch = cfg["architecture"]
  family, skip = _TRANSCODER_OF[arch]
  _pre_bias(cfg, cfg_file, True)
  arrays = common.fold_scaling_factor(common.read_safetensors(w_file), w_file)
  common.check_skip_agrees(skip, "W_skip" in arrays, w_file=w_file, key="W_skip",
                           cfg_file=cfg_file, flag=f"key 'architecture' is {arch!r}")
  claims = {k: (k, common.check_int(cfg, k, cfg_file)) for k in ("d_in", "d_sae", "d_out")}
  if skip:
    arrays["W_skip"] = _skip_from_saelens(arrays["W_skip"], claims, w_file, cfg_file)
  params = common.params_from_arrays(family, arrays, w_file, claims=claims,
                                     claims_file=cfg_file, transcoder=True,
                                     pre_encoder_bias=False)
  return common.to_sae(params, _provenance(cfg, folder), dtype, transcoder=True)


def _skip_from_saelens(w_skip, claims: dict, w_file: Path, cfg_file: Path):
  """SAELens's W_skip `[d_out, d_in]` as jsae's `[d_in, d_out]`, after checking its shape
  against the cfg (a square one cannot tell its orientation by itself)."""
  want = (claims["d_out"][1], claims["d_in"][1])
  if w_skip.ndim != 2 or tuple(w_skip.shape) != want:
    raise FormatError(
        f"{w_file}: key 'W_skip' has shape {tuple(w_skip.shape)}; expected SAELens's"
        f" [d_out, d_in] = {want} (d_out and d_in from {cfg_file}).")
  return np.ascontiguousarray(w_skip.T)


def _provenance(cfg: dict, folder: Path) -> dict:
  meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
  provenance = meta.get("jsae_provenance")
  if isinstance(provenance, dict):
    return provenance
  merged = {**{k: cfg[k] for k in _META_KEYS if k in cfg}, **meta}
  arch = cfg.get("architecture")
  trained = meta.get("training_architecture") or {"standard": "relu"}.get(arch, arch)
  if arch in _TRANSCODER_OF:  # a transcoder's training family is its inference family
    trained = meta.get("training_architecture") or _TRANSCODER_OF[arch][0]
  return dict(source_format="saelens", source_path=str(folder.absolute()),
              training_family=trained,
              **common.known({"model": merged.get("model_name"),
                              "context_length": merged.get("context_size")}),
              **common.parse_hook(merged.get("hook_name"), common.TL_HOOKS),
              **common.parse_target(merged.get("hook_name_out"), common.TL_HOOKS),
              saelens=common.known({k: merged.get(k) for k in _META_KEYS}))


def _architecture(sae: SAE) -> str:
  """The SAELens architecture that holds `sae` (FormatError when none does)."""
  if sae.transcoder or common.has_skip(sae):
    arch = _TRANSCODER_ARCH.get((sae.family, common.has_skip(sae)))
    if arch is None:
      raise FormatError(
          f"a {sae.family!r} transcoder has no SAELens architecture (SAELens 6.54's"
          f" transcoders: {', '.join(_TRANSCODER_OF)}); save it with format='jsae'.")
    return arch
  if sae.family not in _ARCH_OF:
    raise FormatError(f"a {sae.family!r} SAE has no SAELens architecture.")
  return _ARCH_OF[sae.family]


def _metadata(sae: SAE, arch: str) -> dict:
  """cfg.json's `metadata`: the upstream SAELens metadata, the hooks, jsae's provenance."""
  from jsae import __version__  # pylint: disable=import-outside-toplevel
  prov = sae.provenance
  upstream = prov.get("saelens") if isinstance(prov.get("saelens"), dict) else {}
  hook = upstream.get("hook_name") or common.hook_name(prov, common.TL_HOOKS)
  meta = {**upstream, **common.known({
      "model_name": prov.get("model") or upstream.get("model_name"),
      "hook_name": hook, "context_size": prov.get("context_length"),
      "dataset_path": prov.get("text_source")})}
  if arch in _TRANSCODER_OF:
    meta.update(common.known({"hook_name_out": upstream.get("hook_name_out") or
                              common.target_hook(prov, common.TL_HOOKS)}))
  meta.setdefault("sae_lens_version", SAELENS_VERSION)
  meta.setdefault("sae_lens_training_version", meta["sae_lens_version"])
  trained = prov.get("training_family")
  if trained and trained != sae.family:
    meta["training_architecture"] = trained
  meta.update(hook_head_index=None, jsae_version=__version__, jsae_provenance=prov)
  return meta


def config_dict(sae: SAE) -> dict:
  """The cfg.json SAELens reads for `sae` (FormatError when no SAELens architecture holds it)."""
  arch = _architecture(sae)
  meta = _metadata(sae, arch)
  hook = meta.get("hook_name") or ""
  config = {
      "architecture": arch, "d_in": sae.d_in, "d_sae": sae.d_sae,
      "dtype": sae.dtype.name, "device": "cpu", "apply_b_dec_to_input": False,
      "normalize_activations": "none",
      "reshape_activations": "hook_z" if hook.endswith("hook_z") else "none",
      "metadata": meta,
      # Older SAELens (< 6) read run metadata from the top level.
      **{k: meta[k] for k in ("model_name", "hook_name", "hook_head_index",
                              "context_size", "dataset_path") if k in meta},
  }
  if arch in _TRANSCODER_OF:
    config["d_out"] = sae.d_out
  if sae.family == "topk":
    config.update(k=sae.k, rescale_acts_by_decoder_norm=False)
  return config


def save(sae: SAE, path: Path, overwrite: bool) -> Path:
  """Writes `sae` as a SAELens v6 folder (a transcoder's W_skip as SAELens's [d_out, d_in])."""
  config = config_dict(sae)
  cfg_file, w_file = path / CONFIG, path / WEIGHTS
  common.check_writable([cfg_file, w_file], overwrite)
  arrays = common.weights(sae)
  if "W_skip" in arrays:  # SAELens: [d_out, d_in], output x @ W_skip.T
    arrays["W_skip"] = np.ascontiguousarray(arrays["W_skip"].T)
  common.write_safetensors(w_file, arrays)
  common.write_json(cfg_file, config)
  return path
