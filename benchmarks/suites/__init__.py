"""pytest-benchmark suites: each kernel and loop against the reference, ``torch.compile`` and the floor."""
