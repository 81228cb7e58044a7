"""The thread count a refit command takes on a busy machine."""

import os
import sys

import pytest
import torch

from refit import cli
from refit.limits import adapt_threads, threads_for_load


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("current, cores, load, want", [
    (2, 2, 0.0, 2), (2, 2, 0.4, 2), (2, 2, 0.6, 1), (2, 2, 1.0, 1), (2, 2, 2.3, 1), (2, 2, 9.0, 1),
    (8, 16, 3.2, 8), (16, 16, 3.2, 13), (4, 4, -1.0, 4),
])
def test_the_threads_are_the_cores_the_load_leaves(current, cores, load, want):
    assert threads_for_load(current, cores, load) == want


def test_a_busy_machine_lowers_the_threads_and_says_so(threads):
    line = adapt_threads({}, loadavg=lambda: (1.1, 0.5, 0.2), cores=2)
    assert torch.get_num_threads() == 1
    assert line == ("the machine is busy (1-minute load 1.10 on 2 cores): using 1 thread instead of 2; "
                    "set OMP_NUM_THREADS to choose")


def test_a_chosen_thread_count_and_a_quiet_machine_are_left_alone(threads):
    assert adapt_threads({"OMP_NUM_THREADS": "2"}, loadavg=lambda: (2.0, 2.0, 2.0), cores=2) is None
    assert adapt_threads({}, loadavg=lambda: (0.3, 0.3, 0.3), cores=2) is None
    assert torch.get_num_threads() == 2

    def no_load():
        raise OSError("no load average")

    assert adapt_threads({}, loadavg=no_load, cores=2) is None and torch.get_num_threads() == 2


def test_the_command_says_when_it_changes_the_threads(threads, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    monkeypatch.setattr(sys, "argv", ["refit", "info"])
    assert cli.main() == 0
    assert torch.get_num_threads() == 1
    assert "refit: the machine is busy (1-minute load 3.00" in capsys.readouterr().err
    torch.set_num_threads(2)
    assert cli.main(["info"]) == 0  # called from Python: its threads are the caller's
    assert torch.get_num_threads() == 2
