"""Test setup: 8 fake CPU devices (set before JAX initialises) and shared fixtures."""

import os

# Sharding tests need several devices; on CPU XLA can fake them. This must run
# before the first `import jax` anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Under JSAE_REQUIRE_ALL=1 (.ci/run) every skip is a failure.
pytest_plugins = ["no_silent_skips"]
