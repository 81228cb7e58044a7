"""Measurements of refit-kernels and refit: ``suites/`` (pytest-benchmark), ``gpu/`` and ``studies/``.

From the repository root: ``pytest benchmarks/ --benchmark-only`` runs the suites, and a study runs as a
module, ``python -m benchmarks.studies.scale --quick``. ``benchmarks.paths`` holds what they share.
"""
