"""SAEBench's core file: jsae's sums against SAEBench's definitions written out again
in NumPy (per batch, as SAEBench 0.6.0 computes them), hand-computed scores, planted
weights, and the file itself against sae-bench's own schema (its pydantic model)."""

import json

import jax
import numpy as np
import pytest

import jsae
from jsae import evals, saebench, saes

D_IN, D_SAE = 16, 48


def _sae(seed=0, d_sae=D_SAE):
  params = saes.get("jumprelu").init(jax.random.key(seed), d_in=D_IN, d_sae=d_sae)
  return jsae.SAE.from_training(params, 2.0)


def _activations(n, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, D_IN)) * np.linspace(0.5, 3.0, D_IN) + 1.5
  return x.astype(np.float32)


def _saebench_per_batch(sae, batches):
  """SAEBench 0.6.0's get_sparsity_and_variance_metrics, in NumPy: per-token lists
  concatenated, and the explained-variance terms averaged per batch."""
  lists = {k: [] for k in ("l2_norm_in", "l2_norm_out", "l2_ratio", "l0", "l1", "cossim",
                           "explained_variance_legacy", "err")}
  mean_sq, per_dim, resid = [], [], []
  for x in batches:
    f = np.asarray(sae.encode(x), np.float64)
    x_hat = np.asarray(sae.decode(f.astype(np.float32)), np.float64)
    x = x.astype(np.float64)
    n_in, n_out = np.linalg.norm(x, axis=-1), np.linalg.norm(x_hat, axis=-1)
    err = np.sum((x - x_hat) ** 2, -1)
    lists["l2_norm_in"].append(n_in)
    lists["l2_norm_out"].append(n_out)
    lists["l2_ratio"].append(n_out / np.where(np.abs(n_in) < 1e-4, 1, n_in))
    lists["l0"].append((f != 0).sum(-1))
    lists["l1"].append(f.sum(-1))
    lists["cossim"].append(np.sum(x * x_hat, -1) / (n_in * n_out))
    lists["explained_variance_legacy"].append(1 - err / np.sum((x - x.mean(0)) ** 2, -1))
    lists["err"].append(err)
    mean_sq.append(np.sum(x ** 2, -1).mean())
    per_dim.append((x ** 2).mean(0))
    resid.append(err.mean())
  out = {k: float(np.concatenate(v).mean()) for k, v in lists.items()}
  total = np.mean(mean_sq) - np.concatenate(per_dim).mean() ** 2
  out["explained_variance"] = float(1 - np.mean(resid) / total)
  out["mse"] = out.pop("err")  # jsae's mse: the per-token mean (see saebench.DIFFERENCES)
  return out


def test_reconstruction_and_shrinkage_follow_saebench_definitions():
  sae = _sae()
  batches = [_activations(256, seed) for seed in range(3)]  # equal batches, as SAEBench's
  m = evals.activation_metrics(sae, [(x, np.ones(len(x), np.float32)) for x in batches],
                               d_in=D_IN, d_sae=D_SAE)
  expected = _saebench_per_batch(sae, batches)
  assert expected["l0"] > 1 and expected["explained_variance"] < 1  # a real SAE, not a fixed point
  got = dict(m, cossim=m["cosine"], explained_variance_legacy=m["explained_variance_batch"],
             explained_variance=saebench.explained_variance(m, D_IN))
  for key, value in expected.items():
    assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_padding_rows_change_no_sum():
  sae = _sae()
  x = _activations(100)
  whole = evals.activation_metrics(sae, [(x, np.ones(100, np.float32))], d_in=D_IN, d_sae=D_SAE)
  padded = np.concatenate([x, np.zeros((28, D_IN), np.float32)])
  weight = np.concatenate([np.ones(100), np.zeros(28)]).astype(np.float32)
  part = evals.activation_metrics(sae, [(padded, weight)], d_in=D_IN, d_sae=D_SAE)
  for key in ("l1", "l2_norm_in", "l2_norm_out", "l2_ratio", "explained_variance_batch"):
    assert part[key] == pytest.approx(whole[key], rel=1e-5), key


def _lm(ce_clean=2.0, ce_sae=2.5, ce_abl=6.0, kl_sae=0.4, kl_abl=5.0, tokens=10, n=D_SAE):
  freq = np.zeros(n)
  freq[:3] = [0.5, 0.2, 0.3]
  fired = np.zeros(n, np.int64)
  fired[:3] = [2, 1, 3]
  return dict(ce_clean=ce_clean, ce_spliced=ce_sae, ce_zero_ablation_every_position=ce_abl,
              kl_div=kl_sae, kl_div_zero_ablation_every_position=kl_abl, lm_targets=tokens,
              tokens=tokens, firing_frequency=freq, contexts_fired=fired, contexts=3)


def test_scores_by_hand_and_nan_as_minus_one():
  s = saebench.scores(_lm())
  assert s["model_performance_preservation"]["ce_loss_score"] == pytest.approx((6 - 2.5) / (6 - 2))
  assert s["model_behavior_preservation"]["kl_div_score"] == pytest.approx((5 - 0.4) / 5)
  out = saebench.minus_one_for_nan(saebench.scores(_lm(ce_abl=2.0, ce_sae=2.0)))  # 0 / 0
  assert out["model_performance_preservation"]["ce_loss_score"] == -1


def test_misc_metrics_by_hand():
  density = np.array([0.0, 0.005, 0.02, 0.5])
  weights = dict(max_encoder_cosine_sim=np.array([0.1, 0.2, 0.3, 0.4]),
                 max_decoder_cosine_sim=np.array([1.0, 0.0, 0.0, 0.0]))
  m = saebench.misc_metrics(density, weights)
  assert m == pytest.approx(dict(
      freq_over_1_percent=0.5, freq_over_10_percent=0.25,
      normalized_freq_over_1_percent=0.52 / 0.525, normalized_freq_over_10_percent=0.5 / 0.525,
      average_max_encoder_cosine_sim=0.25, average_max_decoder_cosine_sim=0.25, frac_alive=0.75))


def test_weight_metrics_of_planted_and_random_weights():
  sae = _sae()
  e = np.eye(D_IN, dtype=np.float32)
  w_enc = np.zeros((D_IN, 3), np.float32)
  w_enc[:, 0], w_enc[:, 1], w_enc[:, 2] = 2 * e[0], e[0] + e[1], -e[1]
  w_dec = np.stack([e[0], e[2], e[2]])  # rows 1 and 2 equal; 0 orthogonal to both
  params = sae.params.replace(W_enc=w_enc, W_dec=w_dec, b_enc=np.array([1., 2., 3.], np.float32),
                              threshold=np.ones(3, np.float32))
  m = saebench.weight_metrics(sae.replace(params=params))
  r = 1 / np.sqrt(2)
  np.testing.assert_allclose(m["max_encoder_cosine_sim"], [r, r, 0], atol=1e-6)  # 2: max(0, -r)
  np.testing.assert_allclose(m["max_decoder_cosine_sim"], [0, 1, 1], atol=1e-6)
  np.testing.assert_allclose(m["encoder_decoder_cosine_sim"], [1, 0, 0], atol=1e-6)
  np.testing.assert_allclose(m["encoder_norm"], [2, np.sqrt(2), 1], atol=1e-6)
  np.testing.assert_allclose(m["encoder_bias"], [1, 2, 3])
  # More latents than one block of the chunked pass: brute force agrees.
  big = _sae(seed=3, d_sae=1500)
  got = saebench.weight_metrics(big)["max_decoder_cosine_sim"]
  w = np.asarray(big.params.W_dec, np.float64)
  w /= np.linalg.norm(w, axis=-1, keepdims=True)
  sims = w @ w.T
  np.fill_diagonal(sims, -np.inf)
  np.testing.assert_allclose(got, sims.max(-1), atol=1e-5)


def _core(sae=None):
  sae = sae or _sae()
  x = _activations(512)
  activation = evals.activation_metrics(sae, [(x, np.ones(512, np.float32))], d_in=D_IN,
                                        d_sae=D_SAE)
  config = dict(model_name="tiny", llm_dtype="float32", batch_size_prompts=2,
                n_eval_reconstruction_batches=2, n_eval_sparsity_variance_batches=1,
                dataset="planted", context_size=16, compute_kl=True, compute_ce_loss=True,
                compute_l2_norms=True, compute_sparsity_metrics=True,
                compute_variance_metrics=True, compute_featurewise_density_statistics=True,
                compute_featurewise_weight_based_metrics=True,
                exclude_special_tokens_from_reconstruction=True, verbose=False)
  return saebench.core_output(sae, activation, _lm(), eval_config=config,
                              sae_cfg={"architecture": "jumprelu"}, eval_id="id", millis=1)


CATEGORIES = {
    "model_behavior_preservation": {"kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"},
    "model_performance_preservation": {"ce_loss_score", "ce_loss_with_ablation",
                                       "ce_loss_with_sae", "ce_loss_without_sae"},
    "reconstruction_quality": {"explained_variance", "explained_variance_legacy", "mse",
                               "cossim"},
    "shrinkage": {"l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"},
    "sparsity": {"l0", "l1"},
    "token_stats": {"total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"},
    "misc_metrics": {"freq_over_1_percent", "freq_over_10_percent",
                     "normalized_freq_over_1_percent", "normalized_freq_over_10_percent",
                     "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim",
                     "frac_alive"},
}
DETAIL = {"index", "feature_density", "consistent_activation_heuristic", "encoder_bias",
          "encoder_norm", "encoder_decoder_cosine_sim", "max_decoder_cosine_sim",
          "max_encoder_cosine_sim"}


def test_core_output_has_every_key_and_the_details():
  out = _core()
  assert out["eval_type_id"] == "core"
  metrics = out["eval_result_metrics"]
  assert {k: set(v) for k, v in metrics.items()} == CATEGORIES
  details = out["eval_result_details"]
  assert len(details) == D_SAE and all(set(d) == DETAIL for d in details)
  # consistent_activation_heuristic: LM-pass firings / contexts fired; never fired: -1.
  assert [d["consistent_activation_heuristic"] for d in details[:4]] == pytest.approx(
      [0.5 * 10 / 2, 0.2 * 10 / 1, 0.3 * 10 / 3, -1])
  assert metrics["token_stats"]["total_tokens_eval_sparsity_variance"] == 512
  json.dumps(out, allow_nan=False)  # plain JSON: no NaN left


def test_core_output_validates_against_sae_bench_schema(tmp_path):
  """sae-bench's own pydantic model reads the file (sae-bench 0.6.0, installed without
  its torch dependencies: only its output schema is imported)."""
  pytest.importorskip("pydantic")
  core = pytest.importorskip("sae_bench.evals.core.eval_output")
  path = saebench.write(tmp_path, "jsae_test", "blocks.6.hook_resid_post", _core())
  assert path.name == "jsae_test_blocks.6.hook_resid_post_eval_results.json"
  raw = json.loads(path.read_text())
  parsed = core.CoreEvalOutput(**raw)
  assert parsed.eval_result_metrics.sparsity.l0 == pytest.approx(raw["eval_result_metrics"]
                                                                  ["sparsity"]["l0"])
  assert len(parsed.eval_result_details) == D_SAE
  broken = json.loads(path.read_text())
  del broken["eval_result_metrics"]["shrinkage"]["l2_ratio"]
  with pytest.raises(Exception, match="l2_ratio"):  # the schema can fail
    core.CoreEvalOutput(**broken)


def test_missing_lm_evaluation_is_a_clear_error():
  lm = _lm()
  del lm["ce_zero_ablation_every_position"]
  with pytest.raises(saebench.SAEBenchError, match="config.eval.saebench=True"):
    saebench.check_lm_metrics(lm, "eval.json")
  with pytest.raises(saebench.SAEBenchError, match="no spaces"):
    saebench.write("/tmp", "my release", "x", {})
