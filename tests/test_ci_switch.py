"""CAIRN_REQUIRE_ALL=1 (what scripts/test.sh sets): every kind of skip fails the run with its reason; without the
switch the same tests skip and the run passes. Each case runs pytest in a scratch directory with our hooks."""

import pytest

pytest_plugins = ["pytester"]

CASES = {
    "skip_call": """
        import pytest

        def test_it():
            pytest.skip("no widget here")
    """,
    "skipif_marker": """
        import pytest

        @pytest.mark.skipif(True, reason="no widget here")
        def test_it():
            pass
    """,
    "skip_in_fixture": """
        import pytest

        @pytest.fixture
        def widget():
            pytest.skip("no widget here")

        def test_it(widget):
            pass
    """,
    "importorskip_in_test": """
        import pytest

        def test_it():
            pytest.importorskip("no_widget_here_module")
    """,
    "importorskip_at_module_level": """
        import pytest

        pytest.importorskip("no_widget_here_module")

        def test_it():
            pass
    """,
    "xfail_marker": """
        import pytest

        @pytest.mark.xfail(reason="no widget here")
        def test_it():
            assert False
    """,
    "xpass": """
        import pytest

        @pytest.mark.xfail(reason="no widget here")
        def test_it():
            pass
    """,
    "xfail_call": """
        import pytest

        def test_it():
            pytest.xfail("no widget here")
    """,
}


PASSING = "def test_ok():\n    assert 1 + 1 == 2\n"
COLLECT_TIME = ("importorskip_at_module_level",)  # a skipped module: under the switch, a collection error
AT_RUN_TIME = [c for c in CASES if c not in COLLECT_TIME]


def run(pytester, monkeypatch, require_all: bool, **files):
    if require_all:
        monkeypatch.setenv("CAIRN_REQUIRE_ALL", "1")
    else:
        monkeypatch.delenv("CAIRN_REQUIRE_ALL", raising=False)
    pytester.makepyfile(test_ok=PASSING, **files)
    # -vv: summary lines untrimmed, as on CI
    return pytester.runpytest("-p", "tests.require_all", "-ra", "-vv", "-W", "ignore::pytest.PytestAssertRewriteWarning")


def test_any_skip_at_run_time_fails_under_the_switch(pytester, monkeypatch):
    result = run(pytester, monkeypatch, True, **{f"test_{c}": CASES[c] for c in AT_RUN_TIME})
    out = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, out
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 1 and outcomes.get("failed", 0) + outcomes.get("errors", 0) == len(AT_RUN_TIME)
    assert not {"skipped", "xfailed", "xpassed"} & set(outcomes), outcomes
    for case in AT_RUN_TIME:  # one summary line per case, naming the reason
        why = "no_widget_here_module" if "importorskip" in case else "no widget here"
        lines = [line for line in result.outlines if line.startswith(("FAILED", "ERROR")) and f"test_{case}.py" in line]
        assert len(lines) == 1 and why in lines[0], (case, out)


def test_without_the_switch_the_same_skips_pass(pytester, monkeypatch):
    result = run(pytester, monkeypatch, False, **{f"test_{c}": CASES[c] for c in CASES})
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.assert_outcomes(passed=1, skipped=5, xfailed=2, xpassed=1)
    assert "CAIRN_REQUIRE_ALL" not in result.stdout.str()


def test_a_module_skipped_while_collected_fails_under_the_switch(pytester, monkeypatch):
    result = run(pytester, monkeypatch, True, test_mod=CASES["importorskip_at_module_level"])
    assert result.ret != pytest.ExitCode.OK, result.stdout.str()
    assert "CAIRN_REQUIRE_ALL=1 turns skips into failures" in result.stdout.str()
    assert "no_widget_here_module" in result.stdout.str()


def test_a_skipping_conftest_fails_under_the_switch(pytester, monkeypatch):
    """tests/pool/conftest.py skips its whole directory when ray is missing: that must fail too."""
    sub = pytester.mkpydir("sub")
    (sub / "conftest.py").write_text('import pytest\n\npytest.importorskip("no_widget_here_module")\n')
    (sub / "test_x.py").write_text(PASSING)
    result = run(pytester, monkeypatch, True)
    assert result.ret != pytest.ExitCode.OK, result.stdout.str()
    assert "no_widget_here_module" in result.stdout.str()


def test_passing_tests_pass_under_the_switch(pytester, monkeypatch):
    result = run(pytester, monkeypatch, True)
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1)
