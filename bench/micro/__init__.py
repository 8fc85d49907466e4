"""Micro benchmarks (pytest-benchmark): `pytest bench/micro`. Not part of `pytest`'s
default run (testpaths is `tests`)."""
