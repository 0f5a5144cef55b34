"""JSAE_REQUIRE_ALL=1 (set by .ci/run) turns every skip into a failure: a missing optional
package or browser fails the run instead of passing unnoticed."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _pytest(tmp_path, require_all: bool, target: str = "."):
  (tmp_path / "test_optional.py").write_text(textwrap.dedent("""
      import pytest
      def test_runs():
        pass
      def test_needs_a_browser():
        pytest.skip("no chromium on PATH")
      """))
  (tmp_path / "test_missing_package.py").write_text(
      "import pytest\npytest.importorskip('no_such_package_xyz')\n\ndef test_x():\n  pass\n")
  env = {k: v for k, v in os.environ.items() if k != "JSAE_REQUIRE_ALL"}
  env["PYTHONPATH"] = str(TESTS)
  if require_all:
    env["JSAE_REQUIRE_ALL"] = "1"
  return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no_silent_skips",
                         "-p", "no:cacheprovider", "-n", "0", target],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_skips_pass_on_a_developers_machine(tmp_path):
  run = _pytest(tmp_path, require_all=False)
  assert run.returncode == 0, run.stdout
  assert "1 passed, 2 skipped" in run.stdout


def test_every_skip_fails_under_require_all(tmp_path):
  run = _pytest(tmp_path, require_all=True, target="test_optional.py")
  assert run.returncode != 0
  assert "1 failed, 1 passed" in run.stdout, run.stdout
  assert "no chromium on PATH" in run.stdout
  assert "JSAE_REQUIRE_ALL=1 makes every skip a failure" in run.stdout
  # A module skipped at import (a missing package) is a collection error: nothing runs.
  run = _pytest(tmp_path, require_all=True)
  assert run.returncode != 0 and "1 error" in run.stdout
  assert "no_such_package_xyz" in run.stdout
