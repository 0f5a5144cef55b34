"""Multi-host harvest with real processes: two `jax.distributed` processes (launch/local.sh,
4 CPU devices each) harvest one dataset, byte for byte the single-process one; so do three
on splits of fewer shards than processes; a process killed mid-write stops the other within
seconds and resumes its part; a process that fails stops the others within seconds, each
saying why in one paragraph; two processes train on the dataset like one process on the
single-process dataset."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")

import tiny_gguf
from jsae import cli, runs, train
from jsae.data import shards

pytestmark = pytest.mark.multiprocess
REPO = Path(__file__).resolve().parent.parent
SITE = "resid_post.1"
WORDS = "when shall we three meet again in thunder lightning or in rain".split()

KILLER = '''
import os, signal, sys
from jsae import cli
from jsae.data import shards
commit, commits = shards.ShardWriter._commit_shard, []
def commit_then_die(self):
  commit(self)
  if "part-00001-of-00002" in str(self.directory):
    commits.append(1)
    if len(commits) == 2:  # two shards of this part are durable; the rest is not
      os.kill(os.getpid(), signal.SIGKILL)
shards.ShardWriter._commit_shard = commit_then_die
sys.exit(cli.main(sys.argv[1:]))
'''

# Process 0's merge fails (as it did for a part before the last that ended on a partial
# shard); the time of the failure goes to the file $FAILED_AT.
FAILING_MERGE = '''
import os, sys, time
from pathlib import Path
from jsae import cli
from jsae.data import parts, shards
def merge(site_dir, process_count):
  Path(os.environ["FAILED_AT"]).write_text(str(time.time()))
  raise shards.ShardError(f"{site_dir}: synthetic merge failure; delete it and harvest again.")
parts.merge = merge
sys.exit(cli.main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  model = tiny_gguf.make_tiny_gguf(root / "tiny.gguf")
  text = tiny_gguf.write_corpus(root / "text", WORDS, n_docs=30, words_per_doc=100, seed=1)
  config = root / "config.py"
  config.write_text(textwrap.dedent(f"""
      from configs import demo
      def get_config(arg=None):
        c = demo.get_config(arg)
        c.lm.checkpoint, c.lm.site = {str(model)!r}, {SITE!r}
        c.text.source, c.text.seq_len = {"local:" + str(text)!r}, 32
        c.text.max_train_tokens, c.text.max_eval_tokens = 6000, 1500
        c.harvest.rows_per_shard = 256
        c.sae.d_in, c.sae.d_sae = 64, 128
        c.data.batch_size, c.train.num_tokens = 256, 30 * 256
        c.ckpt.every_steps, c.train.log_every, c.eval.every_steps = 30, 10, 1000
        c.optim.warmup_steps, c.loss.dead_window_steps = 5, 20
        c.mesh.data, c.mesh.model = 2, 4
        return c
      """))
  single = root / "single"
  assert cli.main(["harvest", f"--config={config}", f"--workdir={single}"]) == 0
  return root, config, single


def _env(**extra):
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", **extra)


def _local(command, *args, logs):
  run = subprocess.run(["bash", "launch/local.sh", command, *args], cwd=REPO, text=True,
                       capture_output=True, timeout=600,
                       env=_env(NUM_PROCESSES="2", DEVICES_PER_PROCESS="4", LOG_DIR=str(logs),
                                PYTHON=sys.executable))
  assert run.returncode == 0, run.stderr + "".join(
      p.read_text()[-3000:] for p in Path(logs).glob("*.log"))


def _dataset(workdir, split):
  directory = Path(workdir) / "activations" / split / SITE
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _assert_same_dataset(a, b):
  for split in ("train", "eval"):
    one, many = _dataset(a, split), _dataset(b, split)
    assert sorted(one) == sorted(many) and all(one[k] == many[k] for k in one), split
    assert shards.load_manifest(Path(b) / "activations" / split / SITE).complete


def test_two_processes_harvest_the_single_process_dataset_then_train_like_one(setup, tmp_path):
  root, config, single = setup
  _local("harvest", f"--config={config}", f"--workdir={tmp_path}/mp", logs=tmp_path / "logs")
  _assert_same_dataset(single, tmp_path / "mp")
  # Rows per (context, position): the shards hold the single-process order, context by context.
  m = shards.load_manifest(single / "activations/train" / SITE)
  assert m.num_rows > 4 * m.rows_per_shard  # several shards per process

  data = [f"--config.data.shards_dir={tmp_path}/mp/activations/train/{SITE}",
          "--config.data.source=shards"]
  _local("train", f"--config={config}", f"--workdir={tmp_path}/mp_run", *data,
         logs=tmp_path / "logs_train")
  c = _load_config(config)
  c.data.source, c.data.shards_dir = "shards", str(single / "activations/train" / SITE)
  one = train.train(c, tmp_path / "one_run", progress=False)
  two = runs.read_run(tmp_path / "mp_run")
  for name, value in vars(two.params).items():
    if value is None:  # an SAE's absent W_skip
      assert getattr(one.state.params, name) is None, name
      continue
    np.testing.assert_allclose(np.asarray(value), np.asarray(getattr(one.state.params, name)),
                               rtol=2e-4, atol=2e-5, err_msg=name)

  # The evaluation: each process runs half of the contexts on its own data=2 x model=2 LM
  # mesh (and half of the held-out rows), the sums are added, and eval.json is the one
  # process's (auto LM mesh: one device).
  evaluate = ["--config.eval.min_density_tokens=100", "--config.eval.lm_contexts=12",
              "--config.eval.batch_size=2", f"--sae={tmp_path}/mp_run"]
  _local("eval", f"--config={config}", f"--workdir={tmp_path}/mp", *evaluate,
         "--config.lm.mesh.data=2", "--config.lm.mesh.model=2", f"--out={tmp_path}/two.json",
         logs=tmp_path / "logs_eval")
  assert cli.main(["eval", f"--config={config}", f"--workdir={tmp_path}/mp", *evaluate,
                   f"--out={tmp_path}/one.json"]) == 0
  one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
  assert one.pop("lm_contexts_per_process") == [12]
  assert two.pop("lm_contexts_per_process") == [6, 6]  # 3 batches of 2 on each process
  assert one.pop("stage") == two.pop("stage")
  assert sorted(one) == sorted(two)
  # The tiny random model's zero ablation lowers its loss, so the loss recovered divides
  # by the 1e-12 floor: not a number to compare (its parts, the losses, are compared).
  for key in ("loss_recovered", "ce_loss_score"):
    assert abs(one.pop(key)) > 1e6 and abs(two.pop(key)) > 1e6  # its sign: the SAE's
  for key, value in one.items():
    if isinstance(value, float):  # float32 sums in another order; the LM split over 2
      nats = key.startswith(("ce_", "delta_lm", "kl_div")) and key != "kl_div_score"
      assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-5 if nats else 1e-7), key
    else:
      assert two[key] == value, key
  np.testing.assert_allclose(np.load(tmp_path / "two_firing_frequency.npy"),
                             np.load(tmp_path / "one_firing_frequency.npy"), rtol=1e-6)

  # The browser: each process streams half of the held-out contexts on its own LM mesh,
  # the accumulators merge in process order, and process 0 writes what one process writes.
  browse = ["--format=neuronpedia", f"--sae={tmp_path}/mp_run"]
  _local("browse", f"--config={config}", f"--workdir={tmp_path}/mp", *browse,
         "--config.lm.mesh.data=2", "--config.lm.mesh.model=2",
         f"--out={tmp_path}/two_browser", logs=tmp_path / "logs_browse")
  assert cli.main(["browse", f"--config={config}", f"--workdir={tmp_path}/mp", *browse,
                   f"--out={tmp_path}/one_browser"]) == 0
  files = sorted(p.name for p in (tmp_path / "one_browser").glob("batch-*.json"))
  assert files and files == sorted(p.name for p in (tmp_path / "two_browser").glob("batch-*.json"))
  for name in files:
    one, two = (json.loads((tmp_path / d / name).read_text())
                for d in ("one_browser", "two_browser"))
    _assert_close_json(two, one, name)


def _assert_close_json(got, want, where):
  """Equal structure, strings and integers; floats to 1e-5, or to the last of the 3
  decimals Neuronpedia's format rounds activations to (the LM split 2 ways moves them by
  float32 noise, which can cross a rounding boundary)."""
  if isinstance(want, dict):
    assert sorted(got) == sorted(want), where
    for k in want:
      _assert_close_json(got[k], want[k], f"{where}.{k}")
  elif isinstance(want, list):
    assert len(got) == len(want), where
    for i, (g, w) in enumerate(zip(got, want)):
      _assert_close_json(g, w, f"{where}[{i}]")
  elif isinstance(want, float):
    assert got == pytest.approx(want, rel=1e-5, abs=1.001e-3), where
  else:
    assert got == want, where


def _start(count, args, scripts=(), **env):
  """`count` processes of `jsae.cli ARGS` (process k runs scripts[k] instead, if given),
  1 CPU device each; returns the Popens (stderr to a file each, read by `_stderr`)."""
  port = str(_free_port())
  procs = []
  for k in range(count):
    script = scripts[k] if k < len(scripts) and scripts[k] else None
    command = [sys.executable, str(script)] if script else [sys.executable, "-m", "jsae.cli"]
    with open(_stderr_file(args, k), "w") as err:
      procs.append(subprocess.Popen(
          [*command, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
          env=_env(JSAE_COORDINATOR=f"127.0.0.1:{port}", JSAE_NUM_PROCESSES=str(count),
                   JSAE_PROCESS_ID=str(k), XLA_FLAGS="--xla_force_host_platform_device_count=1",
                   **env)))
  return procs


def _stderr_file(args, k):
  workdir = next(a for a in args if a.startswith("--workdir=")).split("=", 1)[1]
  return Path(f"{workdir}.proc{k}.err")


def _stderr(args, k):
  return _stderr_file(args, k).read_text()


def _wait_all(procs, timeout):
  """{process: (exit code, time.time() when it was seen to exit)}; a process still running
  after `timeout` s is killed and gets the code 'hung'."""
  ended, deadline = {}, time.time() + timeout
  while len(ended) < len(procs) and time.time() < deadline:
    for k, p in enumerate(procs):
      if k not in ended and p.poll() is not None:
        ended[k] = (p.returncode, time.time())
    time.sleep(0.1)
  for k, p in enumerate(procs):
    if k not in ended:
      p.kill()
      p.wait()
      ended[k] = ("hung", time.time())
  return ended


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _one_paragraph(text):
  """The error text a process printed, asserted to be jsae's paragraph, not a crash dump."""
  assert "Traceback" not in text and "Check failure" not in text and "F0" not in text, text
  lines = [l for l in text.splitlines() if "error:" in l]
  assert len(lines) == 1, text
  return lines[0]


def test_three_processes_harvest_splits_of_fewer_shards_than_processes(setup, tmp_path):
  """Train: 2 shards on 3 processes (part 1 ends on a partial shard, part 2 is empty); eval:
  less than one shard (parts 1 and 2 empty). Before the fix, the merge refused part 1."""
  root, config, _ = setup
  small = ["--config.harvest.rows_per_shard=1000", "--config.text.max_train_tokens=1500",
           "--config.text.max_eval_tokens=500"]
  single = tmp_path / "single"
  assert cli.main(["harvest", f"--config={config}", f"--workdir={single}", *small]) == 0
  m = shards.load_manifest(single / "activations/train" / SITE)
  assert len(m.shards) == 2 and m.shards[-1].rows < m.rows_per_shard
  assert shards.load_manifest(single / "activations/eval" / SITE).num_rows < 1000
  args = ["harvest", f"--config={config}", *small, f"--workdir={tmp_path}/mp"]
  ended = _wait_all(_start(3, args), timeout=120)
  assert [ended[k][0] for k in range(3)] == [0, 0, 0], [_stderr(args, k) for k in range(3)]
  _assert_same_dataset(single, tmp_path / "mp")


def test_a_failing_process_stops_the_others_within_seconds_saying_why(setup, tmp_path):
  """Process 0's merge fails while 1 and 2 wait at the barrier after it: all three exit
  within seconds, each with one paragraph (before the fix: 5 minutes in JAX's shutdown
  barrier, then a C++ stack dump)."""
  root, config, _ = setup
  failing = tmp_path / "failing_merge.py"
  failing.write_text(FAILING_MERGE)
  stamp = tmp_path / "failed_at"
  args = ["harvest", f"--config={config}", "--config.text.max_train_tokens=600",
          "--config.text.max_eval_tokens=300", f"--workdir={tmp_path}/mp"]
  ended = _wait_all(_start(3, args, scripts=[failing], FAILED_AT=str(stamp)), timeout=120)
  assert stamp.exists(), [_stderr(args, k) for k in range(3)]
  failed_at = float(stamp.read_text())
  assert max(t for _, t in ended.values()) - failed_at < 8, (ended, failed_at)
  assert ended[0][0] == 2 and "synthetic merge failure" in _one_paragraph(_stderr(args, 0))
  for k in (1, 2):
    line = _one_paragraph(_stderr(args, k))
    assert ended[k][0] == 1 and "process 0 of 3 failed" in line, line
    assert "synthetic merge failure" in line and f"Process {k} of 3 stopped too" in line


def test_a_process_killed_mid_write_stops_the_other_and_resumes_its_part(setup, tmp_path):
  root, config, single = setup
  killer = tmp_path / "killer.py"
  killer.write_text(KILLER)
  port = str(_free_port())
  args = ["harvest", f"--config={config}", f"--workdir={tmp_path}/mp"]
  env = lambda i: _env(JSAE_COORDINATOR=f"127.0.0.1:{port}", JSAE_NUM_PROCESSES="2",
                       JSAE_PROCESS_ID=str(i), JSAE_PEER_TIMEOUT_S="3",
                       XLA_FLAGS="--xla_force_host_platform_device_count=4")
  p0 = subprocess.Popen([sys.executable, "-m", "jsae.cli", *args], cwd=REPO, env=env(0),
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  p1 = subprocess.Popen([sys.executable, str(killer), *args], cwd=REPO, env=env(1),
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    assert p1.wait(timeout=300) == -signal.SIGKILL, p1.stderr.read()[-3000:]
    killed_at = time.time()
    code = p0.wait(timeout=30)  # before the fix: JAX's 100 s heartbeat timeout, a stack dump
  finally:
    p0.kill()
    p0.wait()
  assert time.time() - killed_at < 3 + 5
  line = _one_paragraph(p0.stderr.read())
  assert code == 1 and "process 1 of 2 stopped responding" in line, line
  part = tmp_path / "mp/activations/train" / SITE / "part-00001-of-00002"
  left = shards.load_manifest(part)
  assert not left.complete and len(left.shards) == 2
  _local("harvest", *args[1:], logs=tmp_path / "logs")
  _assert_same_dataset(single, tmp_path / "mp")


def _load_config(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("user_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
