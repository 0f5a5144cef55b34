"""Training end to end: planted-feature recovery, threshold movement, exact resume,
divergence handling and the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import default, tiny
from crashing_source import CrashingSource
from jsae import config as config_lib
from jsae import data, train

REPO = Path(__file__).resolve().parent.parent


def _tiny(**overrides):
  c = tiny.get_config()
  c.mesh.data = c.mesh.model = 1  # one device: sharding has its own tests
  for dotted, value in overrides.items():
    node = c
    *parents, leaf = dotted.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def test_recovers_planted_features(tmp_path):
  """The tiny config recovers the planted dictionary (ground truth known)."""
  config = _tiny()
  result = train.train(config, tmp_path, progress=False)
  source = data.make_source(config)
  W = np.asarray(result.state.params.W_dec)
  W = W / np.linalg.norm(W, axis=1, keepdims=True)
  best_cos = (source.features @ W.T).max(axis=1)
  planted_l0 = float(source.probs.sum())
  # Measure L0 on fresh batches (not the training metric).
  x = np.concatenate([np.asarray(source.batch(10_000 + i)) for i in range(4)]) / source.norm_scale
  f = jax.jit(train.saes.get("jumprelu").encode)(result.state.params, x)
  l0 = float((np.asarray(f) != 0).sum(-1).mean())
  print(f"mean best cosine {best_cos.mean():.3f}, L0 {l0:.2f} vs planted {planted_l0:.2f}")
  assert best_cos.mean() >= 0.9
  assert abs(l0 - planted_l0) <= 0.3 * planted_l0


@pytest.mark.parametrize("threshold_param", ["raw", "log"])
def test_threshold_moves_at_adam_step_size(tmp_path, threshold_param):
  """Raw theta travels ~lr per step under Adam; log theta only ~theta*lr (the known freeze)."""
  config = _tiny(recipe="gemma_scope", sae__threshold_param=threshold_param, optim__lr=7e-5,
                 optim__warmup_steps=0,
                 sae__init_threshold=0.05, sae__bandwidth=0.05, train__num_tokens=100 * 512,
                 loss__sparsity_warmup_steps=0, ckpt__every_steps=100)
  result = train.train(config, tmp_path, progress=False)
  moved = np.abs(np.asarray(result.state.params.theta()) - 0.05)
  travel = np.median(moved) / (7e-5 * 100)
  print(f"{threshold_param}: median theta travel = {travel:.3f} x (lr * steps)")
  if threshold_param == "raw":
    assert travel > 0.5
  else:
    assert travel < 0.1


@pytest.mark.parametrize("lean", [False, True])
def test_exact_resume_is_bit_identical(tmp_path, monkeypatch, lean):
  """Also when the run mixes the lean step (between logs) with the logging step: tiny's
  2^17 latent cells are below `loop.MIN_LEAN_CELLS`, so the bound is lowered for that."""
  from jsae import loop  # pylint: disable=import-outside-toplevel
  if lean:
    monkeypatch.setattr(loop, "MIN_LEAN_CELLS", 0)
  flags, step = [], train._OneSAE.step  # pylint: disable=protected-access

  def recording_step(self, batch, *, with_metrics):
    flags.append(with_metrics)
    return step(self, batch, with_metrics=with_metrics)

  monkeypatch.setattr(train._OneSAE, "step", recording_step)  # pylint: disable=protected-access
  n = 60
  config = _tiny(train__num_tokens=2 * n * 512, ckpt__every_steps=n, train__log_every=20)
  straight = train.train(config, tmp_path / "straight", progress=False)
  assert (False in flags) is lean and True in flags  # the lean step ran only where allowed

  crashing = CrashingSource(data.make_source(config), crash_at=n + 7)
  with pytest.raises(KeyboardInterrupt):
    train.train(config, tmp_path / "resumed", progress=False, source=crashing)
  resumed = train.train(config, tmp_path / "resumed", progress=False)

  for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  steps = [json.loads(l)["step"] for l in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()]
  assert steps == [20, 40, 60, 80, 100, 120]  # no duplicated lines after the resume


@pytest.mark.parametrize("steps,log_every,every_steps,evaluating,eval_every,cells,lean", [
    (20, 10, 10, False, 1000, 2**20, False),    # 20 - {10, 20}: 18 steps without metrics
    (60, 10, 30, False, 1000, 2**20, True),     # 60 - {10, 20, ..., 60}: 54
    (60, 10, 30, False, 1000, 2**19 - 1, False),  # too few cells for the metrics to cost
    (57, 10, 28, False, 1000, 2**19, False),    # 57 - {10, 20, 28, 30, 40, 50, 56, 57}: 49
    (58, 10, 28, False, 1000, 2**19, True),     # 58 - {10, 20, 28, 30, 40, 50, 56, 58}: 50
    (62, 10, 1000, False, 2, 2**20, True),      # 62 - {10, ..., 60, 62}: 55
    (62, 10, 1000, True, 2, 2**20, False),      # every 2nd step evaluates, so logs: 31
    (100, 1, 100, False, 1000, 2**20, False),   # every step logs
])
def test_the_lean_step_is_compiled_only_where_it_can_pay(steps, log_every, every_steps,
                                                         evaluating, eval_every, cells, lean):
  """`loop.uses_lean_steps` against counting by hand the steps that neither log, save
  nor evaluate (the last step does all three): at least MIN_LEAN_STEPS = 50 of them, and
  at least MIN_LEAN_CELLS = 2^19 latent cells a step."""
  from jsae import loop  # pylint: disable=import-outside-toplevel
  c = _tiny(train__log_every=log_every, ckpt__every_steps=every_steps,
            eval__every_steps=eval_every)
  assert (loop.MIN_LEAN_STEPS, loop.MIN_LEAN_CELLS) == (50, 2**19)
  assert loop.uses_lean_steps(c, steps, evaluating, cells) is lean


def test_a_sweeps_latent_cells_count_every_member():
  """A sweep's step passes over every member's latents: the cells add up over groups
  (sweep_tiny: batch 512, 256 latents, three members a family)."""
  from configs import sweep_tiny  # pylint: disable=import-outside-toplevel
  from jsae import sweep  # pylint: disable=import-outside-toplevel
  groups = sweep.plan(sweep_tiny.get_config("families=topk+relu"))
  assert [len(g.members) for g in groups] == [3, 3]
  assert sweep.latent_cells(groups) == 6 * 512 * 256


class _PoisonedSource(CrashingSource):
  def batch(self, step):
    rows = np.asarray(self.inner.batch(step))
    return rows * np.nan if step >= self.crash_at else rows


def test_nan_stops_with_last_good_checkpoint(tmp_path):
  config = _tiny(train__num_tokens=100 * 512, ckpt__every_steps=40, train__log_every=10)
  source = _PoisonedSource(data.make_source(config), crash_at=55)
  with pytest.raises(train.TrainingDivergedError, match="last good checkpoint is step 40"):
    train.train(config, tmp_path, progress=False, source=source)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["40"]


def test_resume_with_other_shape_is_refused_before_compiling(tmp_path):
  config = _tiny(train__num_tokens=20 * 512, ckpt__every_steps=20)
  train.train(config, tmp_path, progress=False)
  with pytest.raises(config_lib.ConfigError, match="d_sae: checkpoint 256 vs config 512"):
    train.train(_tiny(train__num_tokens=20 * 512, sae__d_sae=512), tmp_path, progress=False)


def test_resume_with_other_hyperparameters_is_refused_but_longer_runs_resume(tmp_path):
  config = _tiny(train__num_tokens=20 * 512, ckpt__every_steps=20)
  train.train(config, tmp_path, progress=False)
  with pytest.raises(config_lib.ConfigError,
                     match=r"loss.sparsity_coeff: checkpoint 0.02 vs config 0.05.*new --workdir"):
    train.train(_tiny(train__num_tokens=20 * 512, loss__sparsity_coeff=0.05), tmp_path,
                progress=False)
  with pytest.raises(config_lib.ConfigError, match=r"data.synthetic.l0: checkpoint 6.0 vs config 3.0"):
    train.train(_tiny(train__num_tokens=20 * 512, data__synthetic__l0=3.0), tmp_path,
                progress=False)
  # Length, logging, the matmul dtype and the sparse step may change: the run
  # continues to step 30.
  longer = _tiny(train__num_tokens=30 * 512, ckpt__every_steps=10, train__log_every=5,
                 sae__compute_dtype="bfloat16", sae__sparse_capacity=64)
  assert train.train(longer, tmp_path, progress=False).steps == 30


@pytest.mark.parametrize("field,value,message", [
    ("sae__bandwidth", 0.0, "config.sae.bandwidth: must be > 0"),
    ("sae__family", "topk_typo", "config.sae.family: unknown family"),
    ("loss__sparsity", "l1", "config.loss.sparsity"),
    ("train__num_tokens", 10, "less than one batch"),
])
def test_bad_config_values(field, value, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(_tiny(**{field: value}))


def test_every_default_field_is_commented():
  source = (REPO / "configs/default.py").read_text()
  for line in source.splitlines():
    if line.strip().startswith("c.") and "ConfigDict()" not in line:
      assert "#" in line, f"config field without a comment: {line.strip()}"
  config_lib.validate(default.get_config())


def _jsae(*args, cwd):
  return subprocess.run([sys.executable, "-m", "jsae.cli", *args], cwd=cwd, text=True,
                        capture_output=True, timeout=300)


def test_cli_train_runs_and_reports_bad_flags(tmp_path):
  run = _jsae("train", "--config=configs/tiny.py", f"--workdir={tmp_path}/run",
              "--config.train.num_tokens=51200", "--config.ckpt.every_steps=50", cwd=REPO)
  assert run.returncode == 0, run.stderr
  assert "trained 100 steps" in run.stdout
  assert (tmp_path / "run/checkpoints/100").is_dir()
  saved = json.loads((tmp_path / "run/config.json").read_text())
  assert saved["train"]["num_tokens"] == 51200
  again = _jsae("train", "--config=configs/tiny.py", f"--workdir={tmp_path}/run",
                "--config.train.num_tokens=51200", "--config.ckpt.every_steps=50", cwd=REPO)
  assert again.returncode == 0, again.stderr
  last = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1])
  assert "is complete: 100 steps of 100" in again.stdout + again.stderr
  assert "already complete: trained 100 steps" in again.stdout and "nan" not in again.stdout
  assert f"L0 {last['l0']:.1f}, FVU {last['fvu']:.3f}" in again.stdout
  bad = _jsae("train", "--config=tiny", f"--workdir={tmp_path}/x", "--config.optim.lrr=1", cwd=tmp_path)
  assert bad.returncode == 2 and "did you mean config.optim.lr" in bad.stderr and "Traceback" not in bad.stderr
  missing = _jsae("train", "--config=configs/nope.py", "--workdir=x", cwd=tmp_path)
  assert missing.returncode == 2 and "config file 'configs/nope.py' not found" in missing.stderr


def _write_planted_shards(directory, config, rows=8192):
  from jsae.data.shards import ShardWriter
  source = data.make_source(config)
  with ShardWriter(directory, d_in=config.sae.d_in, rows_per_shard=1000) as writer:
    for step in range(rows // config.data.batch_size):
      writer.write(np.asarray(source.batch(50_000 + step)))
  return source


def test_trains_from_shards_with_manifest_normalisation(tmp_path):
  config = _tiny(train__num_tokens=40 * 512, ckpt__every_steps=40)
  source = _write_planted_shards(tmp_path / "acts", config)
  from jsae.data.shards import load_manifest
  manifest = load_manifest(tmp_path / "acts")
  config.data.source, config.data.shards_dir = "shards", str(tmp_path / "acts")
  result = train.train(config, tmp_path / "run", progress=False)
  assert result.metrics["fvu"] < 1.0
  from jsae import checkpoint
  manager = checkpoint.make_manager(tmp_path / "run")
  meta = checkpoint.latest_meta(manager)
  manager.close()
  assert meta["norm_scale"] == pytest.approx(manifest.norm_scale)
  assert meta["norm_scale"] == pytest.approx(source.norm_scale, rel=0.05)  # same distribution
  assert meta["data_fingerprint"] == manifest.fingerprint()
  # Shards of another width are refused before compiling.
  config.sae.d_in = 32
  with pytest.raises(ValueError, match="d_in"):
    train.train(config, tmp_path / "other", progress=False)


def test_init_b_dec_mean_is_the_data_mean(tmp_path):
  config = _tiny(train__num_tokens=512, ckpt__every_steps=1, sae__init_b_dec="mean",
                 sae__init_b_dec_batches=3, optim__lr=1e-12)
  source = data.make_source(config)
  expected = np.concatenate([np.asarray(source.batch(s)) for s in range(3)]).mean(0)
  result = train.train(config, tmp_path, progress=False)
  np.testing.assert_allclose(result.state.params.b_dec, expected / source.norm_scale,
                             rtol=1e-4, atol=1e-6)


def test_held_out_metrics_during_training(tmp_path):
  config = _tiny(train__num_tokens=200 * 512, eval__every_steps=50, train__log_every=100,
                 ckpt__every_steps=200)
  result = train.train(config, tmp_path, progress=False)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals_logged = [l for l in lines if "eval_fvu" in l]
  assert [l["step"] for l in evals_logged] == [50, 100, 150, 200]
  assert evals_logged[-1]["eval_fvu"] < evals_logged[0]["eval_fvu"]  # it learns
  # The logged value equals a direct computation on the same held-out batches.
  held_out = data.make_eval_source(config)
  x = np.concatenate([np.asarray(held_out.batch(i)) for i in range(config.eval.batches)])
  x_norm = x / held_out.norm_scale
  family = train.saes.get("jumprelu")
  x_hat = family.decode(result.state.params, family.encode(result.state.params, x_norm))
  fvu = float(train.losses.fvu(x_norm, x_hat))
  assert evals_logged[-1]["eval_fvu"] == pytest.approx(fvu, rel=1e-3)


def test_a_run_saved_before_a_field_existed_reads_with_its_default(tmp_path):
  """Runs outlive releases: a checkpoint whose config lacks a field added since
  (here sae.sparse_capacity) reads as if it had the field's default."""
  from jsae import runs  # pylint: disable=import-outside-toplevel
  config = default.get_config("family=topk")
  config.sae.d_in, config.sae.d_sae, config.mesh.data, config.mesh.model = 64, 256, 1, 1
  config.train.num_tokens, config.ckpt.every_steps = 4 * config.data.batch_size, 4
  train.train(config, tmp_path, progress=False)
  (meta_file,) = (tmp_path / "checkpoints").glob("*/meta/metadata")
  meta = json.loads(meta_file.read_text())
  del meta["config"]["sae"]["sparse_capacity"]
  meta_file.write_text(json.dumps(meta))
  run = runs.read_run(tmp_path)
  assert run.config.sae.sparse_capacity == -1
  assert run.params.W_enc.shape == (64, 256)
