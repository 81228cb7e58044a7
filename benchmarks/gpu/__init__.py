"""The GPU check (``bash benchmarks/gpu/gpu_check.sh``): build, tests, benchmarks and loops on a device."""
