"""Memory estimates checked before a declared size is allocated.

A flag, a checkpoint or a data file can declare a size (diffusion steps,
layer widths, history windows, neighbours per user) far beyond what the
machine holds. Allocating it first ends in a MemoryError traceback, or worse,
in a process the kernel kills after it has swapped everything else out.
:func:`check_memory` compares an estimate of the bytes against the memory
available now and raises a ValueError that names the setting and says how much
it would take.

``REFIT_MEMORY_LIMIT`` (bytes, or with a K/M/G/T suffix) caps the estimate's
budget below the machine's, for shared machines and for tests.

The machine's other limit is its cores: :func:`adapt_threads` starts a command
on the cores the load leaves free, and :class:`ThreadGovernor` keeps a running
loop's thread count at the cores other processes leave free.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover - the loop returns


def _env_limit() -> Optional[int]:
    text = os.environ.get("REFIT_MEMORY_LIMIT", "").strip().upper().removesuffix("B").removesuffix("I")
    if not text:
        return None
    unit = text[-1] if text[-1] in _SUFFIX and not text[-1].isdigit() else ""
    try:
        value = float(text[: len(text) - len(unit)]) * _SUFFIX[unit]
    except ValueError:
        raise ValueError(f"REFIT_MEMORY_LIMIT must be a number of bytes (e.g. 8G), got "
                         f"{os.environ['REFIT_MEMORY_LIMIT']!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"REFIT_MEMORY_LIMIT must be a positive number of bytes, got "
                         f"{os.environ['REFIT_MEMORY_LIMIT']!r}")
    return int(value)


def available_memory() -> int:
    """Bytes this process may still allocate: MemAvailable (Linux), else the physical memory, capped by
    ``REFIT_MEMORY_LIMIT``."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not POSIX: no estimate, only the explicit cap
            avail = 1 << 62
    cap = _env_limit()
    return min(avail, cap) if cap is not None else avail


def check_memory(setting: str, nbytes: float, what: str) -> None:
    """Raises ValueError when ``nbytes`` (the estimate for ``what``, allocated because of ``setting``)
    exceeds the memory available.

    ``setting`` names what the user can change, e.g. ``"steps 100000000"``;
    ``what`` says what would be allocated, e.g. ``"the diffusion schedule"``.
    """
    avail = available_memory()
    if not nbytes <= avail:  # also refuses a NaN estimate
        raise ValueError(f"{setting}: {what} would take {format_bytes(nbytes)}, more than the "
                         f"{format_bytes(avail)} of memory available")




def check_finite(config, names) -> None:
    """ValueError naming the first of ``config``'s fields ``names`` that is not a finite real number (None
    passes: an unset optional setting). NaN slips through every ``<``/``>`` range check, and inf turns the
    weights to NaN an update later, so settings are checked for both before any range."""
    for name in names:
        v = getattr(config, name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")


def check_seed(seed) -> None:
    """torch.manual_seed and NumPy's RandomState take a seed in [0, 2**32 - 1]; outside it, NumPy's error does
    not say which setting was wrong."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**32 - 1:
        raise ValueError(f"seed must be an integer in [0, {2**32 - 1}], got {seed!r}")


def check_run_settings(config, *, positive: Sequence[str] = (), finite: Sequence[str] = (),
                       precisions: Optional[Sequence[str]] = None, selection: Optional[str] = None) -> None:
    """The checks that the settings of every kind of run share, each error naming its setting.

    ``positive``: fields that must be integers >= 1. The seed (if the config
    has one) must suit torch and NumPy. ``finite`` and ``lr``,
    ``weight_decay`` and ``time_budget`` must be finite numbers (checked before
    any range: NaN passes every comparison); then ``time_budget`` > 0 seconds
    (None: no budget), ``lr`` > 0 and ``weight_decay`` >= 0. ``precisions``:
    the values ``precision`` may take. ``selection``: the metric that selects
    the model, so ``ks`` (None passes) must include 20; it is stored sorted.
    """
    for name in positive:
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if hasattr(config, "seed"):
        check_seed(config.seed)
    shared = [n for n in ("lr", "weight_decay", "time_budget") if hasattr(config, n) and n not in finite]
    check_finite(config, tuple(finite) + tuple(shared))
    budget = getattr(config, "time_budget", None)
    if budget is not None and budget <= 0:
        raise ValueError(f"time_budget must be > 0 seconds, got {budget}")
    if hasattr(config, "lr") and not config.lr > 0:
        raise ValueError(f"lr must be > 0, got {config.lr}")
    if getattr(config, "weight_decay", 0) < 0:
        raise ValueError(f"weight_decay must be >= 0, got {config.weight_decay}")
    if precisions is not None and config.precision not in precisions:
        raise ValueError(f"precision must be one of {tuple(precisions)}, got {config.precision!r}")
    if selection is not None and config.ks is not None:
        config.ks = tuple(sorted(int(k) for k in config.ks))
        if 20 not in config.ks:
            raise ValueError(f"ks must include 20 (model selection uses {selection}), got {config.ks}")


__all__ = ["available_memory", "check_finite", "check_memory", "check_run_settings", "check_seed", "format_bytes"]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_for_load(current: int, cores: int, load: float) -> int:
    """How many threads to use beside a 1-minute load average of ``load`` on ``cores`` cores,
    at most ``current``: the cores the load leaves free, at least 1.

    A CPU kernel splits large calls over threads, and a split call waits for each of its threads;
    a thread on a core another process holds is descheduled for whole time slices, so a call
    can take several times longer than on fewer threads (benchmarks/results/contention.md).
    """
    busy = int(math.floor(max(0.0, load) + 0.5))
    return max(1, min(current, cores - busy))


def adapt_threads(env=None, *, loadavg=None, cores: Optional[int] = None) -> Optional[str]:
    """Lowers torch's thread count to the cores the machine's load leaves free, unless the thread
    count was chosen (``OMP_NUM_THREADS`` set). Returns a line saying what changed, or None.

    ``env``, ``loadavg`` and ``cores`` stand in for the process's environment, ``os.getloadavg``
    and :func:`usable_cores` (tests).
    """
    import torch

    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS"):
        return None
    try:
        load = (loadavg or os.getloadavg)()[0]
    except (AttributeError, OSError):  # no load average on this OS
        return None
    cores = usable_cores() if cores is None else cores
    current = torch.get_num_threads()
    want = threads_for_load(current, cores, load)
    if want >= current:
        return None
    torch.set_num_threads(want)
    return (f"the machine is busy (1-minute load {load:.2f} on {cores} cores): using {want} thread"
            f"{'s' if want != 1 else ''} instead of {current}; set OMP_NUM_THREADS to choose")


def _proc_stat_busy(cpus: Optional[Sequence[int]] = None, path: str = "/proc/stat") -> Optional[float]:
    """Seconds the CPUs ``cpus`` (all when None) have spent busy since boot, steal time included (a
    core the hypervisor gives to another machine is held as surely as one another process runs on);
    None where /proc/stat cannot be read."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted = None if cpus is None else {f"cpu{c}" for c in cpus}
    ticks = 0
    for line in lines:
        parts = line.split()
        if not parts or not parts[0].startswith("cpu") or parts[0] == "cpu":
            continue
        if wanted is not None and parts[0] not in wanted:
            continue
        fields = [int(v) for v in parts[1:9]] + [0] * (8 - len(parts[1:9]))
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        ticks += user + nice + system + irq + softirq + steal
    return ticks / os.sysconf("SC_CLK_TCK")


class ThreadGovernor:
    """Keeps torch's thread count at the cores other processes leave free, while a loop runs.

    A torch operation split over threads waits for each of them, and a thread on a core that another
    process holds waits for whole time slices: beside one busy process, an iteration on two threads
    took 1.4-2.3x its time on one quiet thread (benchmarks/results/contention.md). The load average
    that :func:`adapt_threads` reads at a command's start lags by a minute and misses what starts
    later, so :meth:`tick`, called once per iteration, measures instead: over a window of at least
    ``window_s`` seconds, the busy time of this process's CPUs (``/proc/stat``, steal time included)
    less this process's own CPU time is what other processes held. The thread count becomes the cores
    they leave free (a core counted busy from half its time), between 1 and the count when the
    governor was made, once two windows in a row agree, and back up when they leave.

    Off (``tick`` does nothing) where ``/proc/stat`` cannot be read, or with ``REFIT_ADAPT_THREADS=0``.
    ``busy``, ``cpu_time`` and ``clock`` stand in for the measurements (tests).
    """

    def __init__(self, *, window_s: float = 0.2, env=None, busy=None, cpu_time=None, clock=None,
                 cpus: Optional[Sequence[int]] = None):
        import time

        import torch

        env = os.environ if env is None else env
        if cpus is None:
            try:
                cpus = sorted(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                cpus = None
        self._cpus = cpus
        self.cores = len(cpus) if cpus is not None else usable_cores()
        self.ceiling = torch.get_num_threads()
        self.window_s = window_s
        self._busy = busy or (lambda: _proc_stat_busy(self._cpus))
        self._cpu_time = cpu_time or time.process_time
        self._clock = clock or time.perf_counter
        self.enabled = env.get("REFIT_ADAPT_THREADS", "1") != "0" and self.ceiling > 1
        self._start = self._sample() if self.enabled else None
        self.enabled = self._start is not None
        self._pending: Optional[int] = None
        self.others = 0.0  # cores other processes held in the last window

    def _sample(self):
        busy = self._busy()
        return None if busy is None else (self._clock(), busy, self._cpu_time())

    def tick(self) -> Optional[str]:
        """Closes the window when it is long enough and applies its verdict; a line saying what changed,
        or None."""
        if not self.enabled:
            return None
        import torch

        now = self._sample()
        if now is None:
            self.enabled = False
            return None
        wall = now[0] - self._start[0]
        if wall < self.window_s:
            return None
        others = ((now[1] - self._start[1]) - (now[2] - self._start[2])) / wall
        self._start = now
        self.others = max(0.0, others)
        held = int(math.floor(self.others + 0.5))
        want = max(1, min(self.ceiling, self.cores - held))
        current = torch.get_num_threads()
        if want == current:
            self._pending = None
            return None
        if self._pending != want:  # one window may be a burst: act when the next one agrees
            self._pending = want
            return None
        self._pending = None
        torch.set_num_threads(want)
        why = (f"other processes hold {self.others:.1f} of {self.cores} cores" if want < current
               else f"other processes now hold {self.others:.1f} of {self.cores} cores")
        return f"{why}: using {want} thread{'s' if want != 1 else ''} instead of {current}"
