"""A pytest plugin (loaded by conftest.py): under JSAE_REQUIRE_ALL=1, which `.ci/run` sets,
a skipped test or test module is a failure, saying why it skipped.

Tests skip themselves when an optional part is missing (the real model, the corpus, a
package, Chromium): right on a developer's machine, wrong in CI, where a skip would
count as a pass and hide a missing install step.
"""

import os

import pytest

REQUIRE_ALL = "JSAE_REQUIRE_ALL"


def _required() -> bool:
  return os.environ.get(REQUIRE_ALL) == "1"


def _reason(report) -> str:
  longrepr = report.longrepr
  return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail(report) -> None:
  report.outcome = "failed"
  report.longrepr = (f"skipped ({_reason(report)}), but {REQUIRE_ALL}=1 makes every skip a"
                     " failure: install what it needs (see .ci/run).")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """A test that skipped fails instead."""
  del item, call
  report = (yield).get_result()
  if _required() and report.skipped and not hasattr(report, "wasxfail"):
    _fail(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  """A module that skipped at import (`pytest.importorskip`) fails instead."""
  del collector
  report = (yield).get_result()
  if _required() and report.skipped:
    _fail(report)
