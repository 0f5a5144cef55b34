"""`--dry_run` on the Gemma 2 9B configs: figures against a hand computation."""

import subprocess
import sys
from pathlib import Path

import pytest

from configs import gemma2_9b
from jsae import dryrun, dryrun_lm

REPO = Path(__file__).resolve().parent.parent
H100 = next(h for h in dryrun.HARDWARE if h.name == "1x H100")
V3 = next(h for h in dryrun.HARDWARE if h.name == "TPU v3-8")

# Gemma 2 9B, one block: q, k, v, o (16 query and 8 key/value heads of 256) and the
# gated MLP (3 x 3584 x 14336).
LAYER_WEIGHTS = 3584 * 256 * (16 + 8 + 8 + 16) + 3 * 3584 * 14336


def _harvest_flops_per_token(layer, seq_len=1024):
  attention = 4 * (seq_len + 1) / 2 * 16 * 256  # scores and values over the causal context
  return (layer + 1) * (2 * LAYER_WEIGHTS + attention)


def test_single_run_dry_run_matches_hand_computation():
  e = dryrun.estimate(gemma2_9b.get_config("site=resid_post,layer=20,width=131072,"
                                           "family=jumprelu"))
  d, n, b = 3584, 131072, 4096
  params = 2 * d * n + 2 * n + d  # W_enc, W_dec, b_enc, threshold, b_dec
  (g,) = e["groups"]
  assert g["params_per_sae"] == params == 939_789_824
  assert g["param_bytes"] == 4 * params
  assert g["opt_bytes"] == pytest.approx(4 * params, abs=64)  # Adam's second moment (b1 = 0)
  assert e["flops_per_step"] == 5 * 2 * b * d * n  # 19.2 TFLOP
  assert e["steps"] == 8_000_000_000 // b == 1_953_125
  assert e["shard_bytes"] == e["steps"] * b * d * 4
  h = e["harvest"]
  assert h["flops_per_token"] == pytest.approx(_harvest_flops_per_token(20), rel=1e-12)
  assert h["disk_bytes"] == (8_000_000_000 + 2048 * 1024) * d * 4
  rows = {r["hardware"]: r for r in e["hardware"]}
  # Latent-parallel over TPU v3-8's 8 cores: every [d_sae]-sized array is split 8 ways.
  v3 = rows["TPU v3-8"]
  assert v3["mesh"] == {"sweep": 1, "data": 1, "model": 8}
  assert v3["state_bytes"] == pytest.approx(2 * 4 * params / 8, rel=1e-3)
  h100 = rows["1x H100"]
  step_s = 5 * 2 * b * d * n / (989e12 * 0.246)  # float32 matmuls: the TF32 MFU
  assert h100["step_s"] == pytest.approx(step_s, rel=1e-9)
  assert h100["wall_s"] == pytest.approx(step_s * 1_953_125, rel=1e-9)
  # The program compiled for this machine's devices counts about the same FLOPs.
  assert e["compiled"]["flops_per_step"] == pytest.approx(e["flops_per_step"], rel=0.05)


def test_sweep_dry_run_matches_hand_computation():
  e = dryrun.estimate(gemma2_9b.get_config("site=attn_z,layer=9,width=16384,"
                                           "families=gated+topk"))
  d, n, b = 16 * 256, 16384, 4096
  groups = {g["name"]: g for g in e["groups"]}
  assert groups["gated"]["params_per_sae"] == 2 * d * n + 3 * n + d  # b_gate, b_mag, r_mag
  assert groups["topk"]["params_per_sae"] == 2 * d * n + n + d
  assert groups["gated"]["members"] == groups["topk"]["members"] == 6
  assert e["saes"] == 12
  assert e["flops_per_step"] == 6 * (8 + 5) * 2 * b * d * n
  assert e["steps"] == 4_000_000_000 // b  # GS's 4B tokens at width 2^14
  assert e["harvest"]["flops_per_token"] == pytest.approx(_harvest_flops_per_token(9),
                                                          rel=1e-12)
  v3 = {r["hardware"]: r for r in e["hardware"]}["TPU v3-8"]
  assert v3["mesh"] == {"sweep": 1, "data": 8, "model": 1}  # data parallel at 2^14
  state = 6 * 2 * 4 * (groups["gated"]["params_per_sae"] + groups["topk"]["params_per_sae"])
  assert v3["state_bytes"] == pytest.approx(state, rel=1e-3)  # replicated over 'data'
  # One group's step at a time (6 members), not both groups' activations together.
  assert v3["activation_bytes"] == 6 * 6 * 4 * (b // 8) * n
  assert v3["step_s"] == pytest.approx(e["flops_per_step"] / (8 * 61.5e12 * 0.508))


def test_cli_dry_run_prints_the_figures_without_data_or_workdir():
  run = subprocess.run(
      [sys.executable, "-m", "jsae.cli", "train", "--dry_run",
       "--config=configs/gemma2_9b.py:site=resid_post,layer=20,family=jumprelu"],
      cwd=REPO, text=True, capture_output=True, timeout=300)
  assert run.returncode == 0, run.stderr
  for text in ("939,789,824 params per SAE", "19.2 TFLOP per step", "1,953,125 steps",
               "TPU v3-8", "TPU v5p-8", "1x H100", "compiled for the local"):
    assert text in run.stdout, run.stdout
  bad = subprocess.run([sys.executable, "-m", "jsae.cli", "sweep", "--dry_run",
                        "--config=configs/gemma2_9b.py:site=mlp,layer=20"],
                       cwd=REPO, text=True, capture_output=True, timeout=300)
  assert bad.returncode == 2 and "site=mlp: one of" in bad.stderr


def test_transcoder_dry_run_counts_both_widths_the_skip_and_both_sites():
  from configs import transcoder
  c = transcoder.get_config("skip=1")
  c.data.shards_dir = "unused"
  c.sae.d_out = 640
  c.mesh.data = 8  # the 8 local (fake) devices, so the step compiles here too
  e = dryrun.estimate(c)
  b, d_in, d_out, n = c.data.batch_size, 640, 640, c.sae.d_sae
  # 2 encoder matmuls at d_in, 3 decoder ones at d_out, the skip's forward and 2 gradients.
  assert e["flops_per_step"] == 2 * b * n * (2 * d_in + 3 * d_out) + 3 * 2 * b * d_in * d_out
  assert e["compiled"]["flops_per_step"] == pytest.approx(e["flops_per_step"], rel=0.05)
  h = e["harvest"]
  assert h["site"] == "mlp_in.6 + mlp_out.6"
  assert h["disk_bytes"] == h["tokens"] * (d_in + d_out) * 4


# Gemma 2 9B's weights on one device of a model=4 mesh, bfloat16 matrices and float32
# norms (tests/test_lm_mesh.py checks it against jax.eval_shape): a quarter of the
# embedding and of every block's matrices, the norms whole.
NINE_B_SHARE = (256_000 * 3584 // 4 + 42 * LAYER_WEIGHTS // 4) * 2 + (1 + 4 * 42) * 3584 * 4


def test_lm_dry_run_of_the_9b_harvest_picks_meshes_that_fit_each_machine():
  config = gemma2_9b.get_config("site=resid_post,layer=20,family=jumprelu")
  e = dryrun_lm.estimate(config, "harvest")
  rows = {r["hardware"]: r for r in e["rows"]}
  v3 = rows["TPU v3-8"]  # 17.2 GiB of weights: a 16-GiB core needs them split
  assert (v3["data"], v3["model"]) == (2, 4) and v3["weight_bytes"] == NINE_B_SHARE
  assert v3["fits"] and v3["weight_bytes"] + v3["activation_bytes"] < 16 * 2**30
  assert (rows["TPU v5p-8"]["data"], rows["TPU v5p-8"]["model"]) == (4, 1)
  assert (rows["1x H100"]["data"], rows["1x H100"]["model"]) == (1, 1)
  tokens = 8_000_000_000 + 2048 * 1024
  assert e["tokens"] == tokens and e["disk"] == {"float32": tokens * 3584 * 4,
                                                 "bfloat16": tokens * 3584 * 2}
  assert e["flops_per_token"] == pytest.approx(_harvest_flops_per_token(20), rel=1e-12)
  wall = e["flops_per_token"] * tokens / (8 * V3.peak_tflops * 1e12 * dryrun.LM_MFU)
  assert v3["wall_s"] == pytest.approx(wall, rel=1e-12)  # every core on the LM
  # One core for the whole model does not fit, and the refusal names what does.
  config.lm.mesh.model = 1
  v3 = {r["hardware"]: r for r in dryrun_lm.estimate(config, "harvest")["rows"]}["TPU v3-8"]
  assert "17.2 GiB on each device, more than its 16.0 GiB" in v3["refused"]
  assert "--config.lm.mesh.model=2" in v3["refused"]
  # The config's hardware argument sets the same meshes explicitly.
  fixed = gemma2_9b.get_config("site=resid_post,layer=20,family=jumprelu,hardware=v3-8")
  assert (fixed.lm.mesh.data, fixed.lm.mesh.model) == (2, 4)


def test_lm_dry_run_of_the_evaluation_counts_every_forward_and_the_logits():
  config = gemma2_9b.get_config("site=resid_post,layer=20,family=jumprelu")
  e = dryrun_lm.estimate(config, "eval")
  unembed = 2 * 3584 * 256_000
  attention = lambda layers: layers * 4 * (1024 + 1) / 2 * 16 * 256  # every layer global-capped
  suffix = 22 * 2 * LAYER_WEIGHTS + unembed  # layers 20..41, then the logits
  assert e["tokens"] == 2048 * 1024
  # The shared prefix (layers 0..19) once, then clean, zero-ablated and spliced suffixes.
  assert e["flops_per_token"] == pytest.approx(
      20 * 2 * LAYER_WEIGHTS + attention(20) + 3 * (suffix + attention(22)), rel=1e-12)


def test_cli_lm_dry_runs_print_without_weights_or_workdir():
  for command in ("harvest", "eval"):
    out = subprocess.run(
        [sys.executable, "-m", "jsae.cli", command,
         "--config=configs/gemma2_9b.py:site=resid_post,layer=20,family=jumprelu", "--dry_run",
         "--config.lm.mesh.model=3"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "model=3 does not divide gemma2_9b's n_heads=16" in out.stdout
    assert "TPU v3-8" in out.stdout and "1x H100" in out.stdout
