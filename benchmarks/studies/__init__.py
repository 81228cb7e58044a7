"""Scripts behind RESULTS.md's tables that are not pytest suites; run as ``python -m benchmarks.studies.NAME``."""
