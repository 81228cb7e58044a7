"""What long loops share: progress bars, stop requests (signals) and time budgets.

* :class:`Progress` shows a tqdm bar only where one helps: by default when
  stderr is a terminal (tqdm's own convention), always when asked for, never
  when told not to. Bars written into a log file or a pipe flood it.
* :class:`StopRequests` turns SIGTERM and SIGINT into a flag the loop reads at
  its next boundary, so a stopped run still writes its checkpoint and a
  summary marked as stopped. A second signal interrupts at once.
* :class:`TimeBudget` decides whether one more unit of work (an epoch, an
  iteration) fits in what is left of a time budget, from the measured cost
  of earlier units, so a run stops *before* overrunning rather than after.
"""

from __future__ import annotations

import signal
import statistics
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

from . import distributed as dist


def progress_enabled(setting: Optional[bool]) -> bool:
    """``True``: always; ``False``: never; ``None``: when stderr is a terminal."""
    if setting is None:
        try:
            return sys.stderr.isatty()
        except (AttributeError, ValueError):  # replaced or closed stderr
            return False
    return bool(setting)


class Progress:
    """A tqdm bar, or a silent stand-in (see :func:`progress_enabled`)."""

    def __init__(self, setting: Optional[bool], **kwargs):
        self.bar = None
        if progress_enabled(setting):
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(**kwargs)
            except ImportError:  # pragma: no cover - tqdm is a dependency
                self.bar = None

    def update(self, n=1, **postfix):
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class StopRequests:
    """Context manager: SIGTERM / SIGINT set :attr:`signal_name` instead of killing the loop.

    The loop polls :meth:`requested` at its boundaries (under torch.distributed
    the answer is collective: any rank's signal stops every rank at the same
    iteration). A second signal of either kind raises ``KeyboardInterrupt``
    at once. Outside the main thread (where Python cannot install handlers)
    it does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: Optional[str] = None
        self._previous: Dict[int, object] = {}

    def _handler(self, signum, frame):
        if self.signal_name is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def requested(self) -> bool:
        local = self.signal_name is not None
        if dist.is_distributed():
            flag = dist.any_rank(local)
            if flag and self.signal_name is None:
                self.signal_name = "signal on another rank"
            return flag
        return local

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        for s in self.SIGNALS:
            if self.signal_name == signal.Signals(s).name:
                return 128 + int(s)
        return 128 + int(signal.SIGTERM)


class TimeBudget:
    """Stops before a unit of work would end past ``seconds`` (``None``: no budget).

    ``started`` is the clock reading (``time.perf_counter``) the budget counts
    from; ``spent_before`` seconds of an earlier, resumed part count too. A
    unit is predicted to cost the median of the units measured so far (the
    first unit always runs: nothing predicts it), so the run ends at most one
    unit's spread and one final evaluation past the budget.
    """

    def __init__(self, seconds: Optional[float], started: float, spent_before: float = 0.0):
        if seconds is not None and seconds <= 0:
            raise ValueError(f"time budget must be > 0 seconds, got {seconds}")
        self.seconds, self.started, self.spent_before = seconds, started, spent_before
        self.costs: List[float] = []

    def elapsed(self) -> float:
        return self.spent_before + time.perf_counter() - self.started

    def record(self, seconds: float) -> None:
        self.costs.append(seconds)

    def next_fits(self, extra: Sequence[float] = ()) -> bool:
        """Whether one more unit (plus ``extra`` predicted seconds, e.g. an evaluation) fits.

        Collective under torch.distributed: clocks differ between ranks, so the
        run stops when any rank is out of time.
        """
        if self.seconds is None:
            return True
        predicted = (statistics.median(self.costs) if self.costs else 0.0) + sum(extra)
        out = self.elapsed() + predicted > self.seconds
        return not dist.any_rank(out)


__all__ = ["Progress", "progress_enabled", "StopRequests", "TimeBudget"]
