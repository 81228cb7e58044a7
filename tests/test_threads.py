"""The thread count a refit command takes on a busy machine."""

import os
import sys

import pytest
import torch

from refit import cli
from refit.limits import ThreadGovernor, _proc_stat_busy, adapt_threads, threads_for_load


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


# --- the governor of a running loop ------------------------------------------------------------------

class FakeMachine:
    """The measurements a ThreadGovernor reads: wall clock, busy CPU seconds of the machine, this
    process's CPU seconds; ``run(wall, others, ours)`` advances them by one window."""

    def __init__(self):
        self.t = self.busy = self.ours = 0.0

    def run(self, wall, others, ours):
        self.t += wall
        self.busy += (others + ours) * wall
        self.ours += ours * wall

    def governor(self, **kw):
        return ThreadGovernor(env={}, busy=lambda: self.busy, cpu_time=lambda: self.ours, clock=lambda: self.t,
                              cpus=[0, 1], **kw)


def test_the_governor_follows_other_processes_after_two_windows(threads):
    m = FakeMachine()
    g = m.governor()
    assert g.enabled and g.ceiling == 2 and g.cores == 2
    m.run(0.5, others=0.05, ours=2.0)
    assert g.tick() is None and torch.get_num_threads() == 2
    m.run(0.5, others=0.7, ours=1.3)  # a busy process takes its share of a core: one window is not enough
    assert g.tick() is None and torch.get_num_threads() == 2
    m.run(0.5, others=0.8, ours=1.2)
    assert g.tick() == "other processes hold 0.8 of 2 cores: using 1 thread instead of 2"
    assert torch.get_num_threads() == 1
    m.run(0.5, others=1.0, ours=1.0)
    assert g.tick() is None and torch.get_num_threads() == 1
    m.run(0.5, others=0.02, ours=1.0)  # it stopped
    assert g.tick() is None
    m.run(0.5, others=0.01, ours=1.0)
    assert g.tick() == "other processes now hold 0.0 of 2 cores: using 2 threads instead of 1"
    assert torch.get_num_threads() == 2


def test_the_governor_waits_for_a_long_enough_window_and_ignores_bursts(threads):
    m = FakeMachine()
    g = m.governor(window_s=0.2)
    m.run(0.05, others=2.0, ours=0.0)  # too short a window: not judged, and kept open
    assert g.tick() is None
    m.run(0.25, others=1.0, ours=1.0)
    assert g.tick() is None  # the window's verdict (1.2 cores held) waits for the next one
    m.run(0.3, others=0.1, ours=2.0)  # a burst, not a trend
    assert g.tick() is None and torch.get_num_threads() == 2
    m.run(0.3, others=0.1, ours=2.0)
    assert g.tick() is None and torch.get_num_threads() == 2


def test_the_governor_never_goes_above_its_ceiling_or_below_one(threads):
    torch.set_num_threads(1)
    m = FakeMachine()
    assert not m.governor().enabled  # one thread: nothing to govern
    torch.set_num_threads(2)
    g = m.governor()
    for _ in range(3):
        m.run(0.5, others=5.0, ours=0.5)
        g.tick()
    assert torch.get_num_threads() == 1
    for _ in range(3):
        m.run(0.5, others=0.0, ours=1.0)
        g.tick()
    assert torch.get_num_threads() == 2  # the count it started from, though 2 cores were free anyway


def test_the_governor_can_be_switched_off_and_survives_a_missing_proc_stat(threads):
    off = ThreadGovernor(env={"REFIT_ADAPT_THREADS": "0"})
    assert not off.enabled and off.tick() is None
    blind = ThreadGovernor(env={}, busy=lambda: None)
    assert not blind.enabled and blind.tick() is None and torch.get_num_threads() == 2


def test_proc_stat_is_read_per_cpu(tmp_path):
    stat = tmp_path / "stat"
    hz = os.sysconf("SC_CLK_TCK")
    stat.write_text("cpu  9 9 9 9 9 9 9 9 0 0\n"
                    f"cpu0 {hz} 0 {hz} 500 7 0 0 {hz} 0 0\n"
                    f"cpu1 {2 * hz} 0 0 500 0 0 {hz} 0 0 0\n"
                    "intr 1 2 3\n")
    assert _proc_stat_busy([0], str(stat)) == 3.0  # user + system + steal; idle and iowait are not busy
    assert _proc_stat_busy([1], str(stat)) == 3.0
    assert _proc_stat_busy(None, str(stat)) == 6.0
    assert _proc_stat_busy(None, str(tmp_path / "missing")) is None


def test_a_training_step_consults_the_governor(monkeypatch):
    """ReFiT.step ticks the governor first and logs what it changes."""
    from refit.posttrain import trainer as tr

    calls = []

    class Stub:
        def tick(self):
            calls.append("tick")
            return "other processes hold 1.0 of 2 cores: using 1 thread instead of 2"

    class Method:
        def step(self):
            calls.append("step")
            return {}

    t = tr.ReFiT.__new__(tr.ReFiT)
    t.threads, t.method = Stub(), Method()
    logged = []
    monkeypatch.setattr(tr.log, "warning", lambda msg, *a: logged.append(msg))
    assert t.step() == {}
    assert calls == ["tick", "step"] and logged == ["other processes hold 1.0 of 2 cores: using 1 thread instead of 2"]
