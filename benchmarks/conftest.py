"""Benchmark fixtures and the end-of-session summary table (see _bench.py)."""

import pytest

import _bench


@pytest.fixture(scope="session")
def copy_bandwidth():
    """Bytes per second that a large copy moves here (read + write), median of runs."""
    return _bench.copy_bandwidth_fixture()


def pytest_terminal_summary(terminalreporter):
    _bench.write_summary(terminalreporter)
