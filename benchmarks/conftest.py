"""Benchmark fixtures and the end-of-session summary table (see suites/_bench.py), for suites/ and gpu/."""

import pytest

from benchmarks.suites import _bench


@pytest.fixture(scope="session")
def copy_bandwidth():
    """Bytes per second that a large copy moves here (read + write), median of runs."""
    return _bench.copy_bandwidth_fixture()


def pytest_terminal_summary(terminalreporter):
    _bench.write_summary(terminalreporter)
