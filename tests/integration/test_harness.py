"""The test harness itself: FORKD_TEST_SHOW_LOGS=1 puts the output of every forkd a
failing test started into its report, and breaks nothing."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parent.parent

INNER = '''
import pytest
from support import responds

@pytest.mark.timeout(60)
def test_fails(run_forkd):
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "1")
    port = proc.port()
    proc.wait_ready(1)
    assert not responds(port), "inner test fails on purpose"

@pytest.mark.timeout(60)
def test_passes(run_forkd):
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "1", "--name", "quiet-one")
    proc.wait_ready(1)
'''


@pytest.mark.timeout(90)
def test_show_logs_prints_a_failing_tests_forkd_output(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORKD_TEST_SHOW_LOGS", "1")
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makepyfile(test_inner=INNER)
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # (support.py)
    # (a short base directory: FORKD_HOME holds a unix socket, of 107 bytes at most)
    base = tempfile.mkdtemp(prefix="fkh")
    try:
        result = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "-W", "error", f"--rootdir={pytester.path}",
            f"--basetemp={base}/t", timeout=80)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out = result.stdout.str()
    # one failure, one pass, no error at teardown
    result.assert_outcomes(passed=1, failed=1, errors=0)
    assert "Captured stdout teardown" in out, out
    assert "inner test fails on purpose" in out
    # the failing test's forkd: its start and its graceful stop (stopped before printing)
    assert "--- forkd testapp:app -b 127.0.0.1:0 -w 1 (pid " in out, out
    assert "event=primary-started" in out and "event=stopped code=0" in out, out
    # the passing test's forkd is not shown
    assert "quiet-one" not in out, out
