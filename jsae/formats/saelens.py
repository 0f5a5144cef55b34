"""SAELens folders (v6): `cfg.json` + `sae_weights.safetensors`.

Architectures and tensor keys (SAELens loads them strictly):

  jumprelu   W_enc, W_dec, b_enc, b_dec, threshold      jsae jumprelu (and the
                                                        JumpReLU forms of BatchTopK,
                                                        Matryoshka and Gated SAEs)
  standard   W_enc, W_dec, b_enc, b_dec                  jsae relu
  topk       W_enc, W_dec, b_enc, b_dec; cfg k           jsae topk
  gated      W_enc, W_dec, b_dec, b_gate, b_mag, r_mag   loaded as its exact JumpReLU form

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

from jsae import saes
from jsae.formats import common
from jsae.formats.common import FormatError
from jsae.sae import SAE
from jsae.saes import base as saes_base

NAME = "saelens"
LAYOUT = "cfg.json + sae_weights.safetensors"
FAMILIES = ("jumprelu", "relu", "topk")
CONFIG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
# SAELens's default k when a topk cfg.json has none.
SAELENS_DEFAULT_K = 100
# Written when the provenance does not carry one: >= 6.0 selects SAELens's v6 loader.
SAELENS_VERSION = "6.54.12"

_ARCH_OF = {"jumprelu": "jumprelu", "relu": "standard", "topk": "topk"}
_META_KEYS = ("model_name", "hook_name", "hook_head_index", "context_size",
              "prepend_bos", "dataset_path", "model_class_name",
              "exclude_special_tokens", "neuronpedia_id", "sae_lens_version",
              "sae_lens_training_version")


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
                    " 'jumprelu', 'standard', 'topk', 'gated' (SAELens inference"
                    " architectures; transcoders are not SAEs).")


def load(folder: Path, dtype) -> SAE:
  """Reads a SAELens folder of any inference architecture."""
  cfg_file, w_file = folder / CONFIG, folder / WEIGHTS
  cfg = common.read_json(cfg_file)
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
  family, arrays, static = _arrays(cfg, cfg_file, w_file)
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


def _provenance(cfg: dict, folder: Path) -> dict:
  meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
  provenance = meta.get("jsae_provenance")
  if isinstance(provenance, dict):
    return provenance
  merged = {**{k: cfg[k] for k in _META_KEYS if k in cfg}, **meta}
  return dict(source_format="saelens", source_path=str(folder.absolute()),
              training_family=meta.get("training_architecture") or
              {"standard": "relu"}.get(cfg.get("architecture"), cfg.get("architecture")),
              **common.known({"model": merged.get("model_name"),
                              "context_length": merged.get("context_size")}),
              **common.parse_hook(merged.get("hook_name"), common.TL_HOOKS),
              saelens=common.known({k: merged.get(k) for k in _META_KEYS}))


def save(sae: SAE, path: Path, overwrite: bool) -> Path:
  """Writes `sae` as a SAELens v6 folder."""
  from jsae import __version__  # pylint: disable=import-outside-toplevel
  if sae.family not in _ARCH_OF:
    raise FormatError(f"a {sae.family!r} SAE has no SAELens architecture.")
  cfg_file, w_file = path / CONFIG, path / WEIGHTS
  common.check_writable([cfg_file, w_file], overwrite)
  prov = sae.provenance
  upstream = prov.get("saelens") if isinstance(prov.get("saelens"), dict) else {}
  hook = upstream.get("hook_name") or common.hook_name(prov, common.TL_HOOKS)
  meta = {**upstream, **common.known({
      "model_name": prov.get("model") or upstream.get("model_name"),
      "hook_name": hook, "context_size": prov.get("context_length"),
      "dataset_path": prov.get("text_source")})}
  meta.setdefault("sae_lens_version", SAELENS_VERSION)
  meta.setdefault("sae_lens_training_version", meta["sae_lens_version"])
  trained = prov.get("training_family")
  if trained and trained != sae.family:
    meta["training_architecture"] = trained
  meta.update(hook_head_index=None, jsae_version=__version__, jsae_provenance=prov)
  config = {
      "architecture": _ARCH_OF[sae.family], "d_in": sae.d_in, "d_sae": sae.d_sae,
      "dtype": sae.dtype.name, "device": "cpu", "apply_b_dec_to_input": False,
      "normalize_activations": "none",
      "reshape_activations": "hook_z" if (hook or "").endswith("hook_z") else "none",
      "metadata": meta,
      # Older SAELens (< 6) read run metadata from the top level.
      **{k: meta[k] for k in ("model_name", "hook_name", "hook_head_index",
                              "context_size", "dataset_path") if k in meta},
  }
  if sae.family == "topk":
    config.update(k=sae.k, rescale_acts_by_decoder_norm=False)
  common.write_safetensors(w_file, common.weights(sae))
  common.write_json(cfg_file, config)
  return path
