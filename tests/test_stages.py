"""Stages know when they are stale: the whole pipeline on a tiny GGUF LM and local text,
then each input change re-runs (or refuses) the stage it defines, and nothing else."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")

import tiny_gguf
from configs import demo
from jsae import pipeline, stages
from jsae.data import shards

WORDS = ("the king said that his hand is not yet done with the crown of all men and"
         " women who come to this hour").split()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("stage_inputs")
  model = tiny_gguf.make_tiny_gguf(root / "tiny.gguf")
  text = tiny_gguf.write_corpus(root / "text", WORDS, n_docs=24, words_per_doc=120)
  return model, text


def _config(inputs, **overrides):
  model, text = inputs
  c = demo.get_config()
  c.lm.checkpoint, c.lm.site = str(model), "resid_post.1"
  c.text.source, c.text.seq_len = f"local:{text}", 32
  c.text.max_train_tokens, c.text.max_eval_tokens = 6000, 3000
  c.eval.min_density_tokens, c.eval.lm_contexts, c.eval.batch_size = 500, 4, 4
  c.sae.d_in, c.sae.d_sae = 64, 128
  c.data.batch_size = 256
  c.train.num_tokens, c.train.log_every = 40 * 256, 10
  c.ckpt.every_steps, c.eval.every_steps = 20, 20
  c.optim.warmup_steps, c.loss.dead_window_steps = 5, 20
  if "sparsity_warmup_steps" in c.loss:
    c.loss.sparsity_warmup_steps = 5
  for dotted, value in overrides.items():
    group, key = dotted.split("__")
    c[group][key] = value
  return c


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("stages")
  pipeline.run(_config(inputs), workdir, report=False)
  return workdir


def _rerun(inputs, workdir, capsys, **overrides):
  capsys.readouterr()
  metrics = pipeline.run(_config(inputs, **overrides), workdir, report=False)
  return metrics, capsys.readouterr().out


def _copy(finished, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(finished, workdir)
  return workdir


def test_unchanged_inputs_reuse_every_stage(inputs, finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  before = json.loads((workdir / "sae/eval.json").read_text())
  metrics, out = _rerun(inputs, workdir, capsys)
  for stage in ("tokenised text", "train activations", "eval activations", "finished SAE",
                "evaluation"):
    assert "reusing" in out and stage in out, (stage, out)
  assert "again" not in out
  assert metrics["fvu"] == before["fvu"]


def test_longer_training_redoes_export_and_eval(inputs, finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  before = json.loads((workdir / "sae/eval.json").read_text())
  metrics, out = _rerun(inputs, workdir, capsys, train__num_tokens=60 * 256)
  assert "resuming at step 40" in out
  assert "exporting again" in out and "evaluating again" in out and "sae: was" in out
  saved = json.loads((workdir / "sae/eval.json").read_text())
  assert saved["stage"]["sae"] != before["stage"]["sae"]
  assert metrics["fvu"] == saved["fvu"] != before["fvu"]
  # The export holds the 60-step SAE: its weights equal the run's latest checkpoint.
  import jax
  import jsae
  exported, run = jsae.load(workdir / "sae/export"), jsae.runs.read_sae(workdir / "sae")
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(run)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_changed_eval_settings_redo_only_the_eval(inputs, finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  _, out = _rerun(inputs, workdir, capsys, eval__lm_contexts=2)
  assert "evaluating again" in out and "eval.lm_contexts: was 4, now 2" in out
  assert "reusing the finished SAE" in out and "exporting again" not in out
  assert json.loads((workdir / "sae/eval.json").read_text())["stage"]["eval"]["lm_contexts"] == 2


def test_other_lm_dtype_is_refused_for_finished_activations(inputs, finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  with pytest.raises(shards.ShardError, match=r"finished harvest of other inputs.*lm.dtype:"
                     r" was 'float32', now 'bfloat16'.*another --workdir"):
    _rerun(inputs, workdir, capsys, lm__dtype="bfloat16")


def test_other_lm_dtype_is_refused_for_an_unfinished_harvest(inputs, tmp_path, monkeypatch):
  from jsae import harvest
  config = _config(inputs)
  lm = pipeline.load_lm(config)
  contexts, source = pipeline.text_contexts(config, lm, tmp_path)
  real_capture = harvest.capture_fn

  def failing_capture(*args):  # the LM dies after two batches
    fn, calls = real_capture(*args), []
    def run(*a):
      calls.append(1)
      if len(calls) > 2:
        raise KeyboardInterrupt
      return fn(*a)
    return run
  monkeypatch.setattr(harvest, "capture_fn", failing_capture)
  config.harvest.rows_per_shard = 64
  with pytest.raises(KeyboardInterrupt):
    pipeline.harvest_stage(config, lm, contexts, source, tmp_path)
  monkeypatch.setattr(harvest, "capture_fn", real_capture)
  directory = tmp_path / "activations/train/resid_post.1"
  assert not shards.load_manifest(directory).complete and shards.load_manifest(directory).num_rows
  bf16 = _config(inputs, lm__dtype="bfloat16", harvest__rows_per_shard=64)
  with pytest.raises(shards.ShardError, match="unfinished harvest of other inputs.*lm.dtype"):
    pipeline.harvest_stage(bf16, pipeline.load_lm(bf16), contexts, source, tmp_path)
  # The same inputs resume it.
  dirs = pipeline.harvest_stage(config, lm, contexts, source, tmp_path)
  assert shards.load_manifest(dirs["train"]).complete


def test_changed_text_retokenises_and_refuses_the_old_activations(inputs, finished, tmp_path,
                                                                  capsys):
  workdir = _copy(finished, tmp_path)
  with pytest.raises(shards.ShardError, match="contexts: was"):
    _rerun(inputs, workdir, capsys, text__max_train_tokens=5000)
  out = capsys.readouterr().out
  assert "tokenising again" in out and "text.max_train_tokens: was 6000, now 5000" in out


def test_differences_names_nested_fields():
  assert stages.differences({"a": {"b": 1}, "c": 2}, {"a": {"b": 2}, "c": 2}) == [
      "a.b: was 1, now 2"]
  assert stages.differences(None, {"a": 1}) == ["no definition recorded (written by an older jsae)"]
  assert stages.differences({"a": 1}, {"a": 1}) == []


def test_changed_learning_rate_is_refused_unless_allowed(inputs, finished, tmp_path, capsys):
  from jsae import config as config_lib, resume
  workdir = _copy(finished, tmp_path)
  with pytest.raises(config_lib.ConfigError, match="--allow_changes=optim.lr"):
    _rerun(inputs, workdir, capsys, optim__lr=1e-4, train__num_tokens=50 * 256)
  capsys.readouterr()
  pipeline.run(_config(inputs, optim__lr=1e-4, train__num_tokens=50 * 256), workdir,
               report=False, allow_changes=("optim.lr",))
  assert "resuming at step 40" in capsys.readouterr().out
  assert resume.read_history(workdir / "sae")[-1]["changes"]["optim.lr"]["now"] == 1e-4


def test_token_caps_are_exact(finished):
  """The 6,000-token train cap harvests 6,000 rows, not whole contexts rounded up (a
  2,048-token eval cap at seq_len 1,024 used to harvest 3,069)."""
  assert shards.load_manifest(finished / "activations/train/resid_post.1").num_rows == 6000


def test_cap_tokens_cuts_the_crossing_context_into_padding():
  from jsae.data.text import TokenContexts
  tokens = np.arange(1, 13, dtype=np.int32).reshape(3, 4)
  mask = np.ones((3, 4), bool)
  mask[:, 0] = False  # BOS: 3 tokens per context
  ctx = TokenContexts(tokens, mask)
  for cap, kept in [(0, 9), (9, 9), (20, 9), (3, 3), (5, 5), (7, 7)]:
    out = pipeline.cap_tokens(ctx, cap, pad_id=0)
    assert out.n_tokens == kept
    n = out.n_contexts
    assert n == -(-kept // 3)
    kept_positions = out.mask
    np.testing.assert_array_equal(out.tokens[kept_positions], tokens[:n][kept_positions])
    assert (out.tokens[:n][mask[:n] & ~kept_positions] == 0).all()  # cut positions are padding
    np.testing.assert_array_equal(out.tokens[:, 0], tokens[:n, 0])  # BOS kept
