"""The CPU kernels' portable loops, the ones a machine without AVX-512 runs.

Where the CPU has AVX-512, topk_hits (collecting candidates, the threshold's
selection, ranking by counting) and target_rank take hand-written AVX-512
loops, and the rest of the test suite never reaches the portable ones.
``REFIT_CPU_AVX512=0`` turns those loops off for a process; these tests run
the two kernels' own CPU tests again in such a process.
"""

import os
import subprocess
import sys

import pytest

import refit_kernels as rk
from refit_kernels import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env_without_avx512():
    return {**os.environ, "REFIT_CPU_AVX512": "0"}


def _needs_cpu_kernel():
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])


def test_the_switch_turns_the_loops_off():
    _needs_cpu_kernel()
    code = "from refit_kernels import _extension; print(_extension.build_facts()['cpu_avx512'])"
    out = subprocess.run([sys.executable, "-c", code], env=_env_without_avx512(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("module", ["test_topk_hits.py", "test_target_rank.py"])
def test_cpu_kernels_without_avx512(module):
    _needs_cpu_kernel()
    if not _extension.build_facts()["cpu_avx512"]:
        pytest.skip("the CPU kernels run their portable loops in every test here already")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.join("tests", module),
           "-k", "cpu and not triton and not emulated"]
    out = subprocess.run(cmd, cwd=ROOT, env=_env_without_avx512(), capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout.splitlines()[-1], out.stdout[-2000:]
