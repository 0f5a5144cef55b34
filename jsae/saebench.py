"""SAEBench's "core" evaluation file from jsae's evaluation.

SAEBench (Karvonen et al., 2025; the `sae-bench` package) judges an SAE by a
JSON file per SAE, `{release}_{sae_id}_eval_results.json`, that its plots and
leaderboards read. `core_output` fills that file's schema (sae-bench 0.6.0's
`CoreEvalOutput`) from the metrics `jsae eval` computes, with SAEBench's
definitions:

  kl_div_score       (KL_ablation - KL_sae) / KL_ablation
  ce_loss_score      (CE_ablation - CE_sae) / (CE_ablation - CE_clean)
                     "ablation": the site zeroed at every position (BOS included)
  explained_variance 1 - E||x - x_hat||^2 / (E||x||^2 - (E||x||^2 / d)^2), the
                     formula SAEBench 0.6.0 computes (its code squares the mean of
                     squares per dimension where 1 - FVU squares the mean; with large
                     activation norms the denominator is negative and the value > 1);
                     jsae's own FVU is in `eval_result_unstructured`
  explained_variance_legacy  the mean over tokens of 1 - ||x - x_hat||^2 / ||x - mean||^2,
                     the mean taken per batch of held-out rows
  l2_ratio           the mean over tokens of ||x_hat|| / ||x|| (||x|| < 1e-4 counts as 1)
  relative_reconstruction_bias  E||x_hat||^2 / E<x, x_hat>
  l0, l1, cossim     means over tokens of ||f||_0, sum f and cos(x, x_hat)
  frac_alive, freq_over_{1,10}_percent, normalized_freq_over_{1,10}_percent
                     from the per-latent firing frequency
  consistent_activation_heuristic  a latent's firings / the contexts it fired in
  max_{encoder,decoder}_cosine_sim  per latent, its largest cosine with another latent's
                     encoder column (decoder row)

BOS/EOS/pad positions are excluded throughout. Where jsae differs from
SAEBench 0.6.0's code, it says so in `DIFFERENCES`, which the file records.
NaN (a 0/0 score) is written as -1, as SAEBench does.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsae import jsonio

EVAL_TYPE_ID = "core"
SCHEMA = "sae-bench 0.6.0 CoreEvalOutput"
# What SAEBench reports on every SAE it evaluates; `core_output` fills each one.
DIFFERENCES = (
    "mse is the mean over tokens of ||x - x_hat||^2; SAEBench 0.6.0 also divides each"
    " token's error by the number of tokens in its batch.",
    "relative_reconstruction_bias is one ratio over all held-out tokens; SAEBench 0.6.0"
    " averages the ratio of each batch.",
    "CE and KL count a position when the token it predicts is not BOS/EOS/pad; SAEBench"
    " 0.6.0 counts a position when its own token is not.",
    "reconstruction and sparsity metrics use the held-out activation shards; CE, KL and"
    " consistent_activation_heuristic use the held-out LM contexts.",
)
_CHUNK = 1024  # latents per block of the max-cosine pass


class SAEBenchError(ValueError):
  """Asked for SAEBench output that the evaluation cannot fill."""


def file_name(release: str, sae_id: str) -> str:
  """SAEBench's file name for one SAE (its "/" become "_", as SAEBench writes them)."""
  return f"{release}_{sae_id}_eval_results.json".replace("/", "_")


@jax.jit
def _max_cosine(vectors: jax.Array) -> jax.Array:
  """`vectors: [n, d]` -> `[n]`: each row's largest cosine with another row.

  Blocks of `_CHUNK` rows at a time: never an [n, n] matrix. A zero row has cosine 0.
  """
  n = vectors.shape[0]
  unit = vectors / jnp.maximum(jnp.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
  pad = (-n) % _CHUNK
  blocks = jnp.pad(unit, ((0, pad), (0, 0))).reshape(-1, _CHUNK, unit.shape[-1])
  starts = jnp.arange(blocks.shape[0]) * _CHUNK

  def block(args):
    rows, start = args
    sims = rows @ unit.T  # [chunk, n]
    own = start + jnp.arange(_CHUNK)
    sims = jnp.where(own[:, None] == jnp.arange(n)[None, :], -jnp.inf, sims)
    return sims.max(-1)

  return jax.lax.map(block, (blocks, starts)).reshape(-1)[:n]


def weight_metrics(sae) -> dict[str, np.ndarray]:
  """Per-latent `[d_sae]` arrays of the SAE's weights in raw units: encoder_bias,
  encoder_norm, encoder_decoder_cosine_sim, max_encoder_cosine_sim, max_decoder_cosine_sim."""
  w_enc = jnp.asarray(sae.params.W_enc, jnp.float32).T  # [d_sae, d_in]
  w_dec = jnp.asarray(sae.params.W_dec, jnp.float32)  # [d_sae, d_out]
  enc_norm = jnp.linalg.norm(w_enc, axis=-1)
  out = dict(encoder_bias=sae.params.b_enc, encoder_norm=enc_norm,
             max_encoder_cosine_sim=_max_cosine(w_enc),
             max_decoder_cosine_sim=_max_cosine(w_dec))
  if w_enc.shape == w_dec.shape:  # an SAE; a transcoder's decoder lives in another space
    dec_norm = jnp.linalg.norm(w_dec, axis=-1)
    out["encoder_decoder_cosine_sim"] = (jnp.sum(w_enc * w_dec, -1)
                                         / jnp.maximum(enc_norm * dec_norm, 1e-12))
  else:
    out["encoder_decoder_cosine_sim"] = jnp.full(enc_norm.shape, jnp.nan)
  return {k: np.asarray(v, np.float64) for k, v in out.items()}


def _fraction(mask: np.ndarray) -> float:
  return float(np.mean(mask)) if mask.size else math.nan


def misc_metrics(density: np.ndarray, weights: dict[str, np.ndarray]) -> dict:
  """SAEBench's misc_metrics from the firing frequency `density: [d_sae]` and `weights`."""
  total = density.sum()
  normalised = lambda above: float(density[density > above].sum() / total) if total > 0 else 0.0
  return dict(
      freq_over_1_percent=_fraction(density > 0.01),
      freq_over_10_percent=_fraction(density > 0.1),
      normalized_freq_over_1_percent=normalised(0.01),
      normalized_freq_over_10_percent=normalised(0.1),
      average_max_encoder_cosine_sim=float(np.mean(weights["max_encoder_cosine_sim"])),
      average_max_decoder_cosine_sim=float(np.mean(weights["max_decoder_cosine_sim"])),
      frac_alive=_fraction(density > 0))


def explained_variance(activation: dict, d: int) -> float:
  """SAEBench 0.6.0's explained_variance (module docstring) from jsae's sums."""
  mean_sq = activation["mean_squared_norm"]
  return 1 - activation["mse"] / (mean_sq - (mean_sq / d) ** 2)


def scores(lm: dict) -> dict:
  """SAEBench's model-preservation scores from jsae's LM metrics (SAEBench's ablation)."""
  ce_abl, ce_sae, ce_clean = (lm["ce_zero_ablation_every_position"], lm["ce_spliced"],
                              lm["ce_clean"])
  kl_abl, kl_sae = lm["kl_div_zero_ablation_every_position"], lm["kl_div"]
  with np.errstate(divide="ignore", invalid="ignore"):  # 0/0: NaN, written as -1
    ce_score = np.float64(ce_abl - ce_sae) / np.float64(ce_abl - ce_clean)
    kl_score = np.float64(kl_abl - kl_sae) / np.float64(kl_abl)
  return dict(
      model_behavior_preservation=dict(kl_div_score=float(kl_score),
                                       kl_div_with_ablation=kl_abl, kl_div_with_sae=kl_sae),
      model_performance_preservation=dict(ce_loss_score=float(ce_score),
                                          ce_loss_with_ablation=ce_abl,
                                          ce_loss_with_sae=ce_sae, ce_loss_without_sae=ce_clean))


def check_lm_metrics(lm: dict, where: str) -> None:
  """Raises SAEBenchError when `lm` lacks SAEBench's ablation (or any LM evaluation)."""
  needed = ("ce_zero_ablation_every_position", "kl_div_zero_ablation_every_position")
  if any(lm.get(k) is None for k in needed) or not lm.get("lm_targets"):
    raise SAEBenchError(
        f"{where}: SAEBench's core file needs the LM evaluation with SAEBench's ablation"
        " (the site zeroed at every position); evaluate with config.eval.saebench=True and"
        " config.eval.lm_contexts of at least 1.")


def core_output(sae, activation: dict, lm: dict, *, eval_config: dict,
                sae_cfg: dict | None, unstructured: dict | None = None,
                eval_id: str | None = None, millis: int | None = None) -> dict:
  """SAEBench's core evaluation file (a JSON-able dict) for one SAE.

  Args:
    sae: the evaluated `jsae.SAE` (its weights give the per-latent details).
    activation: `evals.activation_metrics` on the held-out shards.
    lm: `evals.evaluate_many`'s metrics of this SAE, with `zero_every_position`.
    eval_config: SAEBench's `CoreEvalConfig` fields (model_name, dataset, ...).
    sae_cfg: the SAE's SAELens cfg.json (`sae_cfg_dict`; None where none holds it).
    unstructured: anything else to keep (`eval_result_unstructured`).
    eval_id, millis: the run's UUID and time (new ones by default).
  """
  check_lm_metrics(lm, "jsae.saebench.core_output")
  weights = weight_metrics(sae)
  density = np.asarray(activation["firing_frequency"], np.float64)
  lm_fires = np.asarray(lm["firing_frequency"], np.float64) * lm["tokens"]
  with np.errstate(divide="ignore", invalid="ignore"):  # a latent that never fired: NaN
    consistent = lm_fires / np.asarray(lm["contexts_fired"], np.float64)
  metrics = dict(
      **scores(lm),
      reconstruction_quality=dict(
          explained_variance=explained_variance(activation, sae.d_out),
          explained_variance_legacy=activation["explained_variance_batch"],
          mse=activation["mse"], cossim=activation["cosine"]),
      shrinkage=dict(l2_norm_in=activation["l2_norm_in"], l2_norm_out=activation["l2_norm_out"],
                     l2_ratio=activation["l2_ratio"],
                     relative_reconstruction_bias=activation["relative_reconstruction_bias"]),
      sparsity=dict(l0=activation["l0"], l1=activation["l1"]),
      token_stats=dict(total_tokens_eval_reconstruction=int(lm["lm_targets"]),
                       total_tokens_eval_sparsity_variance=int(activation["tokens"])),
      misc_metrics=misc_metrics(density, weights))
  details = [dict(index=i, feature_density=float(density[i]),
                  consistent_activation_heuristic=float(consistent[i]),
                  **{k: float(v[i]) for k, v in weights.items()})
             for i in range(sae.d_sae)]
  out = dict(
      eval_type_id=EVAL_TYPE_ID,
      eval_config=dict(eval_config),
      eval_id=eval_id or str(uuid.uuid4()),
      datetime_epoch_millis=int(time.time() * 1000) if millis is None else int(millis),
      eval_result_metrics=metrics,
      eval_result_details=details,
      sae_bench_commit_hash="",
      sae_lens_id=None, sae_lens_release_id=None, sae_lens_version=None,
      sae_cfg_dict=sae_cfg,
      eval_result_unstructured=dict(unstructured or {}, schema=SCHEMA,
                                    differences_from_saebench=list(DIFFERENCES)))
  return minus_one_for_nan(out)


def minus_one_for_nan(obj: Any) -> Any:
  """`obj` with every non-finite float (and NumPy scalar) as -1, SAEBench's "missing"."""
  if isinstance(obj, dict):
    return {k: minus_one_for_nan(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [minus_one_for_nan(v) for v in obj]
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else -1
  if isinstance(obj, np.integer):
    return int(obj)
  return obj


def write(directory: Path, release: str, sae_id: str, output: dict) -> Path:
  """Writes `output` as `directory/file_name(release, sae_id)`; returns the path."""
  if not re.fullmatch(r"[^\s\\:*?\"<>|]+", f"{release}{sae_id}"):
    raise SAEBenchError(f"SAEBench release {release!r} and SAE id {sae_id!r} name a file:"
                        " no spaces or any of \\:*?\"<>| in them.")
  path = Path(directory) / file_name(release, sae_id)
  path.parent.mkdir(parents=True, exist_ok=True)
  jsonio.write_json(path, output)
  return path
