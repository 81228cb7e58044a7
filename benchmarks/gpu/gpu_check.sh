#!/usr/bin/env bash
# One prepared command that proves and measures every CUDA and Triton path on a lent GPU.
#
#   benchmarks/gpu/gpu_check.sh             on the GPU machine, from the repository root
#   benchmarks/gpu/gpu_check.sh --dry-run   the same phases on the CPU with tiny shapes (tests/test_gpu_check.py)
#
# A lent GPU comes with 15 minutes of device time for a whole task and 10
# minutes per command, so the run is one command that ends well inside 8
# minutes (a rerun still fits): every phase has a cap, and all of them one
# deadline (GPU_CHECK_DEADLINE_S, default 450 s) after which the remaining
# phases are skipped and the report is still written.
#
# Phases, with the time each is expected to take on an H200 (16 cores):
#   preflight  ~5 s     a CUDA device is visible (else stop at once); versions; the ML-1M split,
#                       or a stand-in of its size (benchmarks/gpu/gpu_data.py: no data travels)
#   build      60-120 s refit_kernels._C with the CUDA kernels, in place: FORCE_CUDA=1,
#                       MAX_JOBS=$(nproc), TORCH_CUDA_ARCH_LIST of this GPU; the cuda backend must load
#   info       ~5 s     python -m refit_kernels.info; cuda and triton usable, Triton compiled (not interpreted)
#   tests      60-150 s pytest -m cuda, then every Triton case compiled (TRITON_INTERPRET unset),
#                       --maxfail=5, a per-test timeout (pytest-timeout) and the phase's cap;
#                       CUDA tests skipped for want of the backend count as a failure; Triton
#                       tests written for the interpreter (CPU tensors) are skipped and counted
#                       (benchmarks/gpu/gpu_pytest_plugin.py)
#   bench      90-180 s benchmarks/gpu/gpu_bench.py: every kernel on CUDA tensors against the reference
#                       eager and under torch.compile, synchronised inside every timed call, with the
#                       device-to-device copy bandwidth measured in the same run; the targets reported
#   loops      30-60 s  benchmarks/gpu/gpu_loops.py: one DiffRec ReFiT iteration (fp32, bf16) and the
#                       reverse loops (ReFiT sampling, evaluation, DreamRec's sampler), eager against
#                       CUDA graphs (refit.cudagraph), with the graph's capture-safety checks
#   report     ~1 s     $OUT/summary.md (also printed last)
# A failure in preflight, build, info or tests stops the run (tests only
# record theirs with GPU_CHECK_KEEP_GOING=1); bench and loops failures are
# recorded and the run goes on. The exit status is 0 only when every phase
# passed.
#
# Files under $OUT (default runs/gpu-check; 8 files, one folder deep):
#   summary.md  bench.json (pytest-benchmark)  loops.json
#   logs/info.txt  logs/build.log  logs/tests.log  logs/bench.log  logs/loops.log
#
# --dry-run: no GPU and no CUDA build (the extension already built here is
# used); the tests run -m cuda (all skipped) and a few Triton cases in the
# interpreter; the benchmarks run with REFIT_BENCH_QUICK=1 on CPU tensors (the
# cpu kernel in the kernels' place, torch.compile tracing only); the loops run
# with --quick on the CPU (the capture-safe loop eagerly).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
SELF="$ROOT/benchmarks/gpu/gpu_check.sh"

PHASE=""
case "${1:-}" in
    --dry-run) export GPU_CHECK_MODE=dry-run ;;
    --phase) PHASE="${2:?--phase needs a name}" ;;  # internal: one phase, run by run_phase under its limit
    "") export GPU_CHECK_MODE=gpu ;;
    -h|--help) sed -n '2,/^set -uo/p' "$SELF" | sed '$d'; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (use --dry-run or nothing)" >&2; exit 2 ;;
esac
MODE="${GPU_CHECK_MODE:-gpu}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# pytest with a per-test timeout where pytest-timeout is installed (it is on the GPU machine).
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts= -ra)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST+=(--timeout=150); fi
KERNEL_TESTS=(tests/test_gaussian_logprob.py tests/test_gather_rows.py tests/test_topk_hits.py tests/test_fuzz_ops.py
              tests/test_dispatch.py tests/test_evaluate.py)

# --- the phases --------------------------------------------------------------------------------------

phase_preflight() {
    echo "== versions"
    "$PY" - <<'PYEOF'
import platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as exc:  # noqa: BLE001
    print(f"triton: {exc}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"device {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
              f"{p.multi_processor_count} SMs")
PYEOF
    echo "cores: $(nproc)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no .git here)')," \
         "$(git status --porcelain 2>/dev/null | wc -l) changed files"
    if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; fi
    if [[ $MODE == gpu ]]; then
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
        fi
        "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else
                  f'no CUDA device is visible to torch {torch.__version__}: this run needs a GPU (or --dry-run)')" \
            || return 1
    else
        echo "dry run: no GPU needed"
    fi
    echo "== data"
    local standin=()
    if [[ -n ${REFIT_GPU_CHECK_STANDIN:-} ]]; then standin=(--standin); fi
    "$PY" -m benchmarks.gpu.gpu_data "$SCRATCH/data" "${standin[@]}" >"$SCRATCH/data_root" || return 1
    echo "REFIT_DATA=$(cat "$SCRATCH/data_root")"
}

phase_build() {
    if [[ $MODE == dry-run ]]; then
        echo "dry run: not building; a GPU run builds with"
        echo "  FORCE_CUDA=1 MAX_JOBS=\$(nproc) TORCH_CUDA_ARCH_LIST=<this GPU> $PY setup.py build_ext --inplace"
        "$PY" -c "import refit_kernels._C as c; print('using', c.__file__)"
        return
    fi
    local arch
    arch="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")" || return 1
    echo "TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc)"
    # In place, next to the sources: nothing is installed, and PYTHONPATH points here.
    FORCE_CUDA=1 MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="$arch" "$PY" setup.py build_ext --inplace || return 1
    "$PY" - <<'PYEOF'
import sys
import refit_kernels as rk
from refit_kernels import _extension
facts = _extension.build_facts()
print("built:", facts)
reason = rk.available_backends()["cuda"]
sys.exit(None if reason is None and facts and facts["with_cuda"] else f"the cuda backend is unusable: {reason}")
PYEOF
}

phase_info() {
    "$PY" -m refit_kernels.info || return 1
    if [[ $MODE == dry-run ]]; then return 0; fi
    env -u TRITON_INTERPRET "$PY" - <<'PYEOF'
import sys
import refit_kernels as rk
import refit_kernels.triton as rt
bad = {k: v for k, v in rk.available_backends().items() if v is not None}
if bad:
    sys.exit(f"unusable backends on the GPU: {bad}")
if rt.interpret_mode():
    sys.exit("Triton would run in its interpreter: TRITON_INTERPRET is set")
print("cuda and triton usable; Triton compiles its kernels")
PYEOF
}

phase_tests() {
    local workers=() rc ids
    if [[ $MODE == gpu ]]; then
        unset TRITON_INTERPRET  # tests/conftest.py sets it only without a GPU; never inherit it here
        if "$PY" -c "import xdist" 2>/dev/null; then workers=(-n 8); fi  # Triton compiles in parallel
        echo "== pytest -m cuda: the CUDA kernels, the CUDA graphs, every GPU path"
        "${PYTEST[@]}" "${workers[@]}" --maxfail=5 -m cuda --junitxml="$SCRATCH/cuda.xml" tests || return 1
        "$PY" - "$SCRATCH/cuda.xml" <<'PYEOF' || return 1
import sys
import xml.etree.ElementTree as ET
ran, skipped, bad = 0, 0, []
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    s = case.find("skipped")
    if s is None:
        ran += 1
        continue
    skipped += 1
    msg = s.get("message", "")
    if "unusable" in msg or "no CUDA device" in msg:
        bad.append(f"{case.get('name')}: {msg}")
print(f"-m cuda: {ran} ran, {skipped} skipped")
if ran == 0 or bad:
    sys.exit("CUDA tests were skipped for want of the CUDA backend:\n" + "\n".join(bad[:10]))
PYEOF
        echo "== the Triton cases, compiled"
        # Tests written for the interpreter hand the triton backend CPU tensors, which it refuses when
        # compiled: the plugin reports exactly those as skips (and counts them), every other failure stays.
        mkdir -p "$SCRATCH/plugins" && cp benchmarks/gpu/gpu_pytest_plugin.py "$SCRATCH/plugins/" || return 1
        PYTHONPATH="$SCRATCH/plugins:$PYTHONPATH" "${PYTEST[@]}" "${workers[@]}" -p gpu_pytest_plugin --maxfail=5 \
            -m "not cuda" -k triton "${KERNEL_TESTS[@]}"
    else
        export TRITON_INTERPRET=1
        echo "== pytest -m cuda (dry run: collected, and skipped without a GPU)"
        "${PYTEST[@]}" --maxfail=5 -m cuda tests
        rc=$?
        if ((rc != 0 && rc != 5)); then return 1; fi
        echo "== the Triton cases: collected, and the first few run in the interpreter"
        "${PYTEST[@]}" --collect-only -m "not cuda" -k triton "${KERNEL_TESTS[@]}" | grep '::' >"$SCRATCH/triton_ids"
        echo "$(wc -l <"$SCRATCH/triton_ids") Triton cases collected"
        mapfile -t ids < <(grep float32 "$SCRATCH/triton_ids" | head -n 6)
        ((${#ids[@]} > 0)) || return 1
        "${PYTEST[@]}" --maxfail=1 "${ids[@]}"
    fi
}

phase_bench() {
    REFIT_DATA="$(cat "$SCRATCH/data_root")"
    export REFIT_DATA REFIT_BENCH_ROWS="$SCRATCH/bench_rows.jsonl"
    local args=(benchmarks/gpu/gpu_bench.py --benchmark-only --benchmark-json="$OUT/bench.json"
                --benchmark-columns=median,iqr,rounds --benchmark-sort=name --maxfail=5)
    if [[ $MODE == gpu ]]; then
        unset TRITON_INTERPRET
        REFIT_BENCH_DEVICE=cuda "${PYTEST[@]}" "${args[@]}"
    else
        REFIT_BENCH_DEVICE=cpu REFIT_BENCH_QUICK=1 REFIT_BENCH_COMPILE_BACKEND=eager "${PYTEST[@]}" "${args[@]}"
    fi
}

phase_loops() {
    local args=(-m benchmarks.gpu.gpu_loops --json "$OUT/loops.json")
    if [[ $MODE == gpu ]]; then
        unset TRITON_INTERPRET
        "$PY" "${args[@]}" --device cuda --data "$(cat "$SCRATCH/data_root")/ml-1m_clean"
    else
        "$PY" "${args[@]}" --device cpu --quick
    fi
}

if [[ -n $PHASE ]]; then
    "phase_$PHASE"
    exit $?
fi

# --- the run -----------------------------------------------------------------------------------------

OUT="${OUT:-$ROOT/runs/gpu-check}"
DEADLINE="${GPU_CHECK_DEADLINE_S:-450}"
mkdir -p "$OUT/logs"
rm -f "$OUT/summary.md" "$OUT/bench.json" "$OUT/loops.json" "$OUT"/logs/*.log "$OUT/logs/info.txt"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
export OUT SCRATCH
PHASES="$SCRATCH/phases.tsv"
: >"$PHASES"
START=$SECONDS
FAILED=0

say() { printf '[gpu_check %4ds] %s\n' "$((SECONDS - START))" "$*"; }

record() {  # phase status seconds cap note
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >>"$PHASES"
}

finish() {
    local cmd="benchmarks/gpu/gpu_check.sh"
    if [[ $MODE == dry-run ]]; then cmd+=" --dry-run"; fi
    "$PY" -m benchmarks.gpu.gpu_report "$OUT" "$PHASES" "$MODE" "$cmd" || { echo "gpu_check: the report failed" >&2; FAILED=1; }
    say "done in $((SECONDS - START)) s: $([[ $FAILED == 0 ]] && echo 'every phase passed' || echo 'FAILED')"
    exit "$FAILED"
}

# run_phase NAME CAP_S hard|soft LOG: runs the phase under the smaller of its cap and the time left
# before the deadline, appending its output to LOG; records how long it took and how it ended.
# A hard phase that fails ends the run (with the report).
run_phase() {
    local name=$1 cap=$2 hard=$3 log=$4
    local left=$((DEADLINE - (SECONDS - START) - 15))
    if ((left < 10)); then
        say "$name: skipped, the deadline of ${DEADLINE} s is reached"
        record "$name" "skipped (deadline)" 0 "$cap" "the run's deadline came first"
        FAILED=1
        if [[ $hard == hard ]]; then finish; fi
        return 1
    fi
    local budget=$((cap < left ? cap : left))
    say "$name: started (at most ${budget} s; log ${log#"$OUT"/})"
    local t0=$SECONDS rc
    echo "=== phase $name ($(date -u +%H:%M:%S) UTC)" >>"$log"
    timeout --kill-after=15 "$budget" bash "$SELF" --phase "$name" >>"$log" 2>&1
    rc=$?
    local took=$((SECONDS - t0))
    if ((rc == 0)); then
        say "$name: ok in ${took} s"
        record "$name" ok "$took" "$budget"
        return 0
    fi
    local why="exit status $rc"
    if ((rc == 124 || rc == 137)); then why="timed out after ${budget} s"; fi
    say "$name: FAILED ($why) after ${took} s; the end of its log:"
    tail -n 40 "$log" | sed 's/^/    /'
    record "$name" FAILED "$took" "$budget" "$why"
    FAILED=1
    if [[ $hard == hard ]]; then finish; fi
    return 1
}

say "mode $MODE; output in $OUT; deadline ${DEADLINE} s"
run_phase preflight 60 hard "$OUT/logs/info.txt"
run_phase build 240 hard "$OUT/logs/build.log"
run_phase info 60 hard "$OUT/logs/info.txt"
# GPU_CHECK_KEEP_GOING=1: a failed test is recorded (and fails the run) but the measurements still run,
# for a rerun whose only aim is the numbers once a failure is understood.
run_phase tests 180 "$([[ -n ${GPU_CHECK_KEEP_GOING:-} ]] && echo soft || echo hard)" "$OUT/logs/tests.log"
run_phase bench 210 soft "$OUT/logs/bench.log"
if [[ ! -s $OUT/bench.json && -s $SCRATCH/bench_rows.jsonl ]]; then  # cut short: keep the rows it timed
    "$PY" -c "import json, sys; rows = [json.loads(l) for l in open(sys.argv[1])]
json.dump({'benchmarks': rows, 'partial': True}, open(sys.argv[2], 'w'), indent=1)" \
        "$SCRATCH/bench_rows.jsonl" "$OUT/bench.json"
fi
run_phase loops 120 soft "$OUT/logs/loops.log"
finish
