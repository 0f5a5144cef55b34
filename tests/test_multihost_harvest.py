"""Multi-host harvest with real processes: two `jax.distributed` processes (launch/local.sh,
4 CPU devices each) harvest one dataset, byte for byte the single-process one; a process
killed mid-write resumes its part; two processes train on it like one process on the
single-process dataset."""

import os
import signal
import subprocess
import sys
import textwrap
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
    np.testing.assert_allclose(np.asarray(value), np.asarray(getattr(one.state.params, name)),
                               rtol=2e-4, atol=2e-5, err_msg=name)


def test_a_process_killed_mid_write_resumes_its_part(setup, tmp_path):
  root, config, single = setup
  killer = tmp_path / "killer.py"
  killer.write_text(KILLER)
  port = str(20000 + os.getpid() % 20000)
  args = ["harvest", f"--config={config}", f"--workdir={tmp_path}/mp"]
  env = lambda i: _env(JSAE_COORDINATOR=f"127.0.0.1:{port}", JSAE_NUM_PROCESSES="2",
                       JSAE_PROCESS_ID=str(i),
                       XLA_FLAGS="--xla_force_host_platform_device_count=4")
  p0 = subprocess.Popen([sys.executable, "-m", "jsae.cli", *args], cwd=REPO, env=env(0),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  p1 = subprocess.Popen([sys.executable, str(killer), *args], cwd=REPO, env=env(1),
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    assert p1.wait(timeout=300) == -signal.SIGKILL, p1.stderr.read()[-3000:]
  finally:
    p0.kill()
    p0.wait()
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
