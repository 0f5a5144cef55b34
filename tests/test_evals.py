"""Evaluation metrics against closed forms, and delta LM loss on a tiny random Gemma."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

import jsae
from jsae import evals, saes
from jsae.data.text import TokenContexts
from jsae.lm import gemma, next_token
from reference import three_forward_eval


@struct.dataclass
class ScaledIdentity:
  """encode(x) = relu(x) (or x), decode(f) = scale * f: a closed-form 'SAE'."""
  scale: float = struct.field(pytree_node=False, default=1.0)
  rectify: bool = struct.field(pytree_node=False, default=True)

  def encode(self, x):
    return jax.nn.relu(x) if self.rectify else x

  def decode(self, f):
    return self.scale * f


def _planted(n=500, d=8, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.exponential(1.0, (n, d)) * (rng.random((n, d)) < np.linspace(0.05, 0.9, d))
  x[:, 0] = 0.0  # a dead latent
  x[:, -1] = rng.exponential(1.0, n) + 0.1  # a dense latent (always on)
  return x.astype(np.float32)


def test_activation_metrics_closed_forms():
  x = _planted()
  w = np.ones(len(x), np.float32)
  w[::7] = 0  # masked positions must not count
  m = evals.activation_metrics(ScaledIdentity(0.5), [(x[:250], w[:250]), (x[250:], w[250:])],
                               d_in=8, d_sae=8)
  xs = x[w == 1].astype(np.float64)
  x_hat = 0.5 * xs
  fvu = np.sum((xs - x_hat) ** 2) / np.sum((xs - xs.mean(0)) ** 2)
  assert m["tokens"] == len(xs)
  assert m["fvu"] == pytest.approx(fvu, rel=1e-5)
  assert m["l0"] == pytest.approx((xs != 0).sum(1).mean(), rel=1e-6)
  freq = (xs != 0).mean(0)
  np.testing.assert_allclose(m["firing_frequency"], freq, rtol=1e-6)
  assert m["dead_frac"] == pytest.approx(np.mean(freq == 0))
  assert m["dense_frac"] == pytest.approx(np.mean(freq > 0.1))
  assert m["relative_reconstruction_bias"] == pytest.approx(0.5, rel=1e-5)
  nz = np.linalg.norm(xs, axis=1) > 0
  assert m["cosine"] == pytest.approx(nz.mean(), rel=1e-5)  # cos is 1 where x != 0
  assert sum(m["l0_histogram"]) == len(xs)
  assert m["l0_histogram"][3] == int(((xs != 0).sum(1) == 3).sum())


def test_identity_fvu_is_zero():
  x = _planted()
  m = evals.activation_metrics(ScaledIdentity(1.0), [(x, np.ones(len(x)))], d_in=8, d_sae=8)
  assert m["fvu"] == 0.0 and m["relative_reconstruction_bias"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tiny_lm():
  config = gemma.get_config("tiny_gemma3")
  return gemma.init_params(jax.random.key(0), config), config


def _contexts(config, n=6, seq=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, config.vocab_size, (n, seq)).astype(np.int32)
  tokens[:, 0] = 2  # BOS
  mask = np.ones_like(tokens, bool)
  mask[:, 0] = False
  mask[-1, 10:] = False  # padding
  return TokenContexts(tokens, mask)


def test_identity_sae_has_zero_delta_lm_loss(tiny_lm):
  params, config = tiny_lm
  site = "resid_post.0"
  m = evals.evaluate(params, config, ScaledIdentity(1.0, rectify=False), site=site,
                     contexts=_contexts(config), batch_size=4, min_density_tokens=0,
                     progress=False)
  assert m["delta_lm_loss"] == 0.0 and m["kl_div"] == 0.0 and m["fvu"] == 0.0
  # Clean and zero-ablated CE equal direct computations with the same masking.
  # (On a random LM zero-ablation need not hurt; the real-model test checks that.)
  c = _contexts(config)
  tokens, mask = jnp.asarray(c.tokens), jnp.asarray(c.mask)
  logits, _ = gemma.forward(params, tokens, config)
  zeroed, _ = gemma.forward(params, tokens, config,
                            splice={site: lambda a: jnp.where(mask[..., None], 0.0, a)})
  assert m["ce_clean"] == pytest.approx(float(gemma.mean_nll(logits, tokens, mask)), rel=1e-5)
  assert m["ce_zero_ablation"] == pytest.approx(float(gemma.mean_nll(zeroed, tokens, mask)),
                                                rel=1e-5)
  assert m["delta_lm_loss_zero"] != 0
  assert m["lm_targets"] == int(c.mask[:, 1:].sum())


def test_trained_style_sae_delta_between_zero_and_ablation(tiny_lm):
  params, config = tiny_lm
  sae = jsae.SAE.from_training(
      saes.get("jumprelu").init(jax.random.key(1), d_in=config.d_model, d_sae=4 * config.d_model),
      3.0)
  m = evals.evaluate(params, config, sae, site="mlp_out.1", contexts=_contexts(config),
                     batch_size=3, min_density_tokens=0, progress=False)
  assert m["d_sae"] == 4 * config.d_model and m["d_in"] == config.d_model
  assert np.isfinite(m["delta_lm_loss"]) and m["kl_div"] >= 0


def test_small_eval_set_and_wrong_width_are_clear_errors(tiny_lm):
  params, config = tiny_lm
  with pytest.raises(ValueError, match="fewer than the 100,000 needed"):
    evals.evaluate(params, config, ScaledIdentity(), site="resid_post.0",
                   contexts=_contexts(config), progress=False)
  with pytest.raises(ValueError, match="has width"):
    evals.check_sae_matches_site(7, config, "resid_post.0")


def test_shard_batches_cover_every_row_once(tmp_path):
  from jsae.data.shards import ShardWriter
  x = _planted(n=1000)
  with ShardWriter(tmp_path, d_in=8, rows_per_shard=300) as w:
    w.write(x)
  batches = list(evals.shard_batches(tmp_path, batch_rows=128))
  rows = np.concatenate([b[b_w == 1] for b, b_w in batches])
  np.testing.assert_array_equal(rows, x)
  assert {b.shape for b, _ in batches} == {(128, 8)}  # one compiled shape


def _reference_lm_metrics(params, config, sae, site, contexts):
  targets, *sums = three_forward_eval.lm_sums(
      params, config, sae, site=site, contexts=contexts, batch_size=2)
  names = ("ce_clean", "ce_spliced", "ce_zero_ablation", "kl_div", "kl_div_zero_ablation",
           "ce_zero_ablation_every_position", "kl_div_zero_ablation_every_position")
  return dict(lm_targets=targets, **{k: v / targets for k, v in zip(names, sums)})


_LM_KEYS = ("ce_clean", "ce_spliced", "ce_zero_ablation", "kl_div", "kl_div_zero_ablation")


def _assert_lm_metrics_equal(metrics, reference, label, keys=_LM_KEYS):
  assert metrics["lm_targets"] == reference["lm_targets"], label
  for key in keys:
    assert metrics[key] == pytest.approx(reference[key], rel=2e-5, abs=1e-6), (label, key)


@pytest.mark.parametrize("model,site,memory_bytes", [
    ("tiny_gemma3", "resid_post.1", 100_000),
    ("tiny_gemma3", "attn_z.2", evals.DEFAULT_MEMORY_BYTES),
    ("tiny_gemma2", "mlp_out.0", 100_000)])  # Gemma 2: soft-capped logits
def test_chunked_eval_equals_the_three_forward_reference(model, site, memory_bytes):
  """The shared-prefix, chunked evaluation equals three whole forwards with full
  logits: CE clean/spliced/zero-ablated and KL, with BOS and padding masked and a
  last batch padded by wrapping. 100 kB forces 8-position chunks that do not
  divide the positions (padding); the default budget takes one chunk per batch."""
  config = gemma.get_config(model)
  params = gemma.init_params(jax.random.key(0), config)
  d = evals.site_width(config, site)
  sae = jsae.SAE.from_training(
      saes.get("jumprelu").init(jax.random.key(1), d_in=d, d_sae=4 * d), 3.0)
  contexts = _contexts(config, n=5)
  m = evals.evaluate(params, config, sae, site=site, contexts=contexts, batch_size=2,
                     memory_bytes=memory_bytes, min_density_tokens=0, progress=False)
  reference = _reference_lm_metrics(params, config, sae, site, contexts)
  assert m["kl_div"] > 1e-4 and m["ce_spliced"] != m["ce_clean"]  # a real difference
  _assert_lm_metrics_equal(m, reference, site)


def test_chunk_and_batch_sizes_follow_the_memory_budget():
  vocab = 262_144
  assert next_token.chunk_positions(vocab, 1 << 30) == 128  # 6 x 4 B x 262144 x 128 = 768 MiB
  assert next_token.chunk_positions(vocab, 1 << 20) == 8  # never below 8 rows
  assert next_token.chunk_positions(256, 1 << 40) == 4096  # nor above 4096
  config = gemma.get_config("gemma3_270m")
  one = evals.auto_batch_size(config, "resid_post.6", 1024, 1, 1 << 30)
  assert one == (1 << 30) // (1024 * (640 * 5 + 4 * 1024 + 3 * 2048 + 8 * 640) * 4)
  assert evals.auto_batch_size(config, "resid_post.6", 1024, 64, 1 << 30) < one
  assert evals.auto_batch_size(config, "resid_post.6", 1024, 1, 1 << 20) == 1
  assert evals.auto_batch_size(config, "resid_post.6", 8, 1, 1 << 40) == 64


@pytest.mark.parametrize("site", ["resid_post.1", "attn_z.0"])  # after a block; inside one
def test_shared_prefix_sweep_eval_equals_the_reference_per_sae(tiny_lm, site):
  """evaluate_many (prefix, clean and zero-ablated forwards once per batch, every
  SAE's losses in one chunked pass) gives each SAE of two families and widths the
  reference's LM numbers and `evaluate`'s reconstruction numbers."""
  params, config = tiny_lm
  d = evals.site_width(config, site)
  models = {
      "jumprelu": jsae.SAE.from_training(
          saes.get("jumprelu").init(jax.random.key(1), d_in=d, d_sae=4 * d), 3.0),
      "topk": jsae.SAE.from_training(
          saes.get("topk").init(jax.random.key(2), d_in=d, d_sae=2 * d, k=5), 3.0),
      "identity": ScaledIdentity(0.9),
  }
  contexts = _contexts(config, n=5)
  many = evals.evaluate_many(params, config, models, site=site, contexts=contexts,
                             batch_size=2, progress=False, zero_every_position=True)
  for name, sae in models.items():
    _assert_lm_metrics_equal(many[name], _reference_lm_metrics(params, config, sae, site,
                                                               contexts), name,
                             _LM_KEYS + ("ce_zero_ablation_every_position",
                                         "kl_div_zero_ablation_every_position"))
    assert (many[name]["ce_zero_ablation_every_position"]
            != pytest.approx(many[name]["ce_zero_ablation"]))  # BOS zeroed too: another number
    one = evals.evaluate(params, config, sae, site=site, contexts=contexts, batch_size=3,
                         min_density_tokens=0, progress=False)
    every_position = {"ce_zero_ablation_every_position", "kl_div_zero_ablation_every_position"}
    assert one["delta_lm_loss"] != 0 and sorted(set(many[name]) - every_position) == sorted(one)
    for key in ("l0", "fvu", "cosine", "dead_frac", "delta_lm_loss"):
      assert many[name][key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), (name, key)
    np.testing.assert_allclose(many[name]["firing_frequency"], one["firing_frequency"],
                               rtol=1e-6)


def test_forward_from_a_shared_prefix_equals_the_whole_forward(tiny_lm):
  params, config = tiny_lm
  tokens = jnp.asarray(_contexts(config).tokens)
  whole, acts = gemma.forward(params, tokens, config, capture=("mlp_out.2",))
  resid = gemma.residual_before(params, tokens, config, 2)
  suffix, acts2 = gemma.forward(params, tokens, config, capture=("mlp_out.2",), start_layer=2,
                                resid=resid)
  np.testing.assert_allclose(suffix, whole, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(acts2["mlp_out.2"], acts["mlp_out.2"], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="before start_layer=2"):
    gemma.forward(params, tokens, config, capture=("resid_post.1",), start_layer=2, resid=resid)
  with pytest.raises(ValueError, match="needs resid of shape"):
    gemma.forward(params, tokens, config, start_layer=2)


def test_bfloat16_unembedding_is_close_to_float32_and_auto_follows_the_backend(tiny_lm):
  """bfloat16 inputs to the unembedding (float32 accumulation) move CE and KL by
  rounding only; 'auto' picks it only on backends where it was measured."""
  params, config = tiny_lm
  sae = jsae.SAE.from_training(
      saes.get("jumprelu").init(jax.random.key(1), d_in=config.d_model,
                                d_sae=4 * config.d_model), 3.0)
  run = lambda dtype: evals.evaluate_many(params, config, {"s": sae}, site="resid_post.1",
                                          contexts=_contexts(config), batch_size=3,
                                          progress=False, unembed_dtype=dtype)["s"]
  f32, bf16 = run("float32"), run("bfloat16")
  for key in ("ce_clean", "ce_spliced", "ce_zero_ablation", "kl_div"):
    assert bf16[key] == pytest.approx(f32[key], rel=1e-2), key
  assert bf16["ce_clean"] != f32["ce_clean"]  # it did run in bfloat16
  assert evals.unembed_dtype("auto", backend="cpu") == "bfloat16"
  assert evals.unembed_dtype("auto", backend="gpu") == "float32"
  assert evals.unembed_dtype("float32", backend="cpu") == "float32"


def test_write_json_makes_its_folder_and_puts_frequencies_beside(tmp_path):
  """`jsae eval --out=NEW_DIR/eval.json` must not fail after the whole evaluation."""
  path = tmp_path / "new" / "eval.json"
  evals.write_json(path, dict(l0=1.5, fvu=float("nan"), firing_frequency=np.array([0.5, 0.0])))
  import json
  assert json.loads(path.read_text()) == {"l0": 1.5, "fvu": None}
  np.testing.assert_array_equal(np.load(tmp_path / "new" / "eval_firing_frequency.npy"), [0.5, 0])
