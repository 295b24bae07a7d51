"""CAIRN_REQUIRE_ALL=1 (scripts/test.sh, so CI, sets it): a skip of any kind fails the run, with its reason.

pytest.skip, importorskip (also at module level, while collecting), skipif, xfail and xpass: each report becomes a
failure whose one-line message says what was skipped and why, so a green run means every selected test ran. Tests
of hardware a machine may lack are deselected by marker (cuda, netem), not skipped. The root conftest imports
these hooks; the switch is read when a report is made, so a test can run pytest inside with and without it."""

from __future__ import annotations

import os

import pytest


def require_all() -> bool:
    return os.environ.get("CAIRN_REQUIRE_ALL") == "1"


def skip_message(rep) -> str:
    """The one line a skipped (or xfailed / xpassed) report fails with: what was skipped and why."""
    if hasattr(rep, "wasxfail"):
        why = f"{'xfail' if rep.skipped else 'xpass'}: {rep.wasxfail or 'no reason given'}"
    elif isinstance(rep.longrepr, tuple):  # (path, line, "Skipped: reason")
        path, line, reason = rep.longrepr
        why = f"{reason} ({path}:{line})" if line is not None else f"{reason} ({path})"
    else:
        why = str(rep.longrepr)
    return f"CAIRN_REQUIRE_ALL=1 turns skips into failures: {why}"


def _fail_skipped(rep) -> None:
    if rep.skipped or hasattr(rep, "wasxfail"):
        rep.longrepr = skip_message(rep)
        rep.outcome = "failed"
        if hasattr(rep, "wasxfail"):
            del rep.wasxfail  # pytest counts a report with wasxfail as an expected outcome, never as a failure


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if require_all():
        _fail_skipped(rep)
    return rep


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_make_collect_report(collector):
    rep = yield
    if require_all():
        _fail_skipped(rep)
    return rep


def pytest_report_header(config):
    if require_all():
        return "CAIRN_REQUIRE_ALL=1: any skip, importorskip, skipif or xfail fails the run"
    return None
