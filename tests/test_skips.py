"""The suite's own rules (tests/conftest.py): in CI (STUDY_NO_SKIPS=1) a skipped test fails
the run unless its reason is allowed, and under pytest-xdist the tests that share a costly
fixture run on one worker, so that it is made once."""

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


SHARING = """
import os
from pathlib import Path

import pytest

LOG = Path(os.environ["SHARING_LOG"])


@pytest.fixture(scope="module")
def local_ray():  # One of conftest's shared fixtures (here a cheap one).
    with LOG.open("a") as log:
        log.write("made\\n")


@pytest.mark.parametrize("n", range(6))
def test_shares(local_ray, n):
    with LOG.open("a") as log:
        log.write(f"ran on {os.environ['PYTEST_XDIST_WORKER']}\\n")


@pytest.mark.parametrize("n", range(6))
def test_alone(n):
    pass
"""


def test_tests_that_share_a_fixture_run_on_one_worker(pytester, monkeypatch, tmp_path):
    log = tmp_path / "log"
    monkeypatch.setenv("SHARING_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makeconftest("from tests.conftest import *  # noqa: F403")
    pytester.makepyfile(SHARING)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup"
    )
    result.assert_outcomes(passed=12)
    lines = log.read_text().splitlines()
    assert lines.count("made") == 1, lines
    assert len({line for line in lines if line.startswith("ran on")}) == 1, lines
