"""Test setup: 8 fake CPU devices (set before JAX initialises), one XLA compilation
cache per test run, and shared fixtures."""

import os
import shutil
import tempfile

# Sharding tests need several devices; on CPU XLA can fake them. This must run
# before the first `import jax` anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests compile the same programs (the Gemma forward, the train steps) in other
# processes: the pytest-xdist workers and the subprocesses tests start. One persistent
# compilation cache, new for each test run (made by the first process, inherited by
# the rest through the environment), compiles each once. JAX_COMPILATION_CACHE_DIR set
# outside pytest is used as it is.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jsae-tests-xla-cache-")
  os.environ["JSAE_TESTS_OWN_XLA_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
  # Also the many small programs compiled again by test after test (JAX's default keeps
  # only compilations of 1 s and more).
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# Under JSAE_REQUIRE_ALL=1 (.ci/run) every skip is a failure.
pytest_plugins = ["no_silent_skips"]


def pytest_unconfigure(config):
  """The process that made the compilation cache (the xdist controller) removes it."""
  if _OWN_CACHE and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ["JSAE_TESTS_OWN_XLA_CACHE"], ignore_errors=True)


# The files that take longest (seconds of one worker, `pytest --durations` on the 2-core
# CI machine, 2026-12-07), run first. pytest-xdist hands each worker whole files
# (`--dist loadfile`), by default the files with the most tests first, which left these
# few-test, long files for the end and one worker running them alone; longest first
# (with `--no-loadscope-reorder` in pyproject.toml) keeps both workers busy to the end.
_LONGEST_FIRST = ("test_sweep.py", "test_demo.py", "test_transcoders.py",
                  "test_family_training.py", "test_gemma3_real.py", "test_multihost_harvest.py",
                  "test_evals.py", "test_train.py", "test_sparse_step.py", "test_sharding.py")


def pytest_collection_modifyitems(items):
  """Orders the collected tests: `_LONGEST_FIRST` files in that order, then the rest."""
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
