"""Build checks that need no GPU: every CUDA source compiles with nvcc."""

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
HOST_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_host.cpp")))


def _nvcc():
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [shutil.which("nvcc")]
    if CUDA_HOME:
        candidates.append(os.path.join(CUDA_HOME, "bin", "nvcc"))
    for path in candidates:
        if path and os.path.exists(path):
            return path
    return None


NVCC = _nvcc()


def _cuda_include():
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if NVCC:
        roots.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(NVCC))))
    for root in filter(None, roots):
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return os.path.join(root, "include")
    return None


def test_there_are_cuda_sources():
    assert CU_SOURCES and HOST_SOURCES


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
@pytest.mark.parametrize("source", CU_SOURCES, ids=os.path.basename)
def test_cuda_source_compiles(source, tmp_path):
    cmd = [NVCC, "-c", "-arch=sm_90", "-std=c++17", "-O1", "-I", os.path.join(ROOT, "csrc", "include"),
           source, "-o", str(tmp_path / "out.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout}\n{out.stderr}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found, so no CUDA runtime headers")
@pytest.mark.parametrize("source", HOST_SOURCES, ids=os.path.basename)
def test_cuda_host_code_compiles(source, tmp_path):
    """The host glue is compiled against torch's headers only in CUDA builds; check its syntax here.

    A CPU build of torch ships the c10/cuda headers but not the one CMake
    generates for them, which only defines a build macro; a stand-in is made.
    """
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cuda_include = _cuda_include()
    if cuda_include is None:
        pytest.skip("cuda_runtime.h not found next to nvcc, in $CUDA_HOME or in /usr/local/cuda")
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DWITH_CUDA", "-w",
           "-I", os.path.join(ROOT, "csrc", "include"), "-I", str(tmp_path), "-I", cuda_include,
           "-I", sysconfig.get_paths()["include"]]
    for inc in include_paths():
        cmd += ["-I", inc]
    out = subprocess.run(cmd + [source], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)} {source}\n{out.stderr[-4000:]}"


def test_every_cuda_kernel_is_executed_under_the_emulation():
    """A CUDA kernel that has never executed anywhere is not done: each kernel source has a driver in
    tests/cuda_emu that runs it on the CPU, and the launch rewriting covers all of its launches."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tests", "cuda_emu"))
    try:
        import emulation
    finally:
        sys.path.pop(0)
    for source in CU_SOURCES:
        op = os.path.basename(source)[: -len("_cuda.cu")]
        assert os.path.exists(os.path.join(ROOT, "tests", "cuda_emu", f"{op}_main.cpp")), f"no emulation driver for {op}"
        text = open(source).read()
        rewritten, launches = emulation.rewrite(text)
        assert launches == text.count("<<<") and "<<<" not in rewritten, f"{op}: a launch the emulation misses"
        assert "extern __shared__" not in rewritten, f"{op}: dynamic shared memory the emulation misses"
        if op in emulation.LAUNCHES:
            assert launches == emulation.LAUNCHES[op]

