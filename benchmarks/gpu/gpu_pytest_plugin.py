"""pytest plugin of benchmarks/gpu/gpu_check.sh for the Triton cases compiled on a GPU.

Some Triton tests are written for the interpreter that runs them on the CPU
(``TRITON_INTERPRET=1``): the opcheck, torch.compile, double-backward and
fuzz tests hand the triton backend CPU tensors. Compiled on a GPU, the
backend refuses CPU tensors by design (``BackendUnavailable``: "the triton
backend takes CUDA tensors ..."), so such a failure says nothing about the
kernels; nor does Triton's own refusal when a registered triton op is called
with CPU tensors directly ("... cannot be accessed from Triton (cpu
tensor?)"). This plugin reports exactly those failures as skips that name the
cause, and lists them in one line of the terminal summary (``gpu_check:
N interpreter-only Triton tests skipped ...``) for the run's report. Every
other failure stays a failure.

    pytest -p gpu_pytest_plugin ...   (with this file's folder on PYTHONPATH)
"""

from __future__ import annotations

import pytest

#: The refusals: refit's dispatcher's, and Triton's launcher's for a CPU pointer.
PHRASES = ("the triton backend takes CUDA tensors", "cannot be accessed from Triton (cpu tensor?)")
REASON = "interpreter-only Triton test: it hands the compiled triton backend CPU tensors"

_skipped: list = []


def caused_by_cpu_tensors(exc) -> bool:
    """Whether ``exc``, an exception it was raised from, or one in a group is the device refusal."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if any(p in str(e) for p in PHRASES):
            return True
        todo += [e.__cause__, e.__context__] + list(getattr(e, "exceptions", ()))  # chained, and grouped
    return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # The formatted traceback too: torch.compile may re-raise a refusal met while tracing as its own error.
    if report.when == "call" and report.failed and call.excinfo is not None \
            and (caused_by_cpu_tensors(call.excinfo.value) or any(p in str(report.longrepr) for p in PHRASES)):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), (item.location[1] or 0) + 1, REASON)


def pytest_runtest_logreport(report):
    # Runs where the reports are gathered (the controller under pytest-xdist too).
    if report.when == "call" and report.skipped and REASON in str(report.longrepr):
        _skipped.append(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    if _skipped:
        names = sorted({n.split("[")[0] for n in _skipped})
        terminalreporter.write_line(f"gpu_check: {len(_skipped)} interpreter-only Triton tests skipped "
                                    f"(CPU tensors for the compiled triton backend): {', '.join(names)}")
