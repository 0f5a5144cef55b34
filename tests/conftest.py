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

# Under JSAE_REQUIRE_ALL=1 (.ci/run) every skip is a failure.
pytest_plugins = ["no_silent_skips"]


def pytest_unconfigure(config):
  """The process that made the compilation cache (the xdist controller) removes it."""
  if _OWN_CACHE and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ["JSAE_TESTS_OWN_XLA_CACHE"], ignore_errors=True)
