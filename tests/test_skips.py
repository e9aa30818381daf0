"""In CI (STUDY_NO_SKIPS=1) a skipped test fails the run, unless its reason is allowed."""

import pytest

from .conftest import REPO

SKIPPING = """
import pytest

def test_needs_a_file():
    pytest.skip("{reason}")

def test_fine():
    pass
"""


@pytest.mark.parametrize(
    ("reason", "strict", "outcome"),
    [
        ("../shared/data is absent", "1", pytest.ExitCode.TESTS_FAILED),
        ("../shared/data is absent", "0", pytest.ExitCode.OK),
        ("needs an NVIDIA GPU", "1", pytest.ExitCode.OK),
    ],
)
def test_a_skip_fails_the_run_in_ci(pytester, monkeypatch, reason, strict, outcome):
    monkeypatch.setenv("STUDY_NO_SKIPS", strict)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # So that the run can use our conftest.
    pytester.makeconftest("from tests.conftest import *  # noqa: F403")
    pytester.makepyfile(SKIPPING.format(reason=reason))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == outcome
    result.assert_outcomes(passed=1, skipped=1)
    if outcome == pytest.ExitCode.TESTS_FAILED:
        result.stdout.fnmatch_lines(
            ["*skipped, and not on the allowed list*", "*test_needs_a_file*"]
        )
