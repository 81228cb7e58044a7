#!/usr/bin/env bash
# The GPU check lives in benchmarks/gpu/; this path is kept because lent-device
# instructions name it (`bash benchmarks/gpu_check.sh`).
exec bash "$(dirname "${BASH_SOURCE[0]}")/gpu/gpu_check.sh" "$@"
