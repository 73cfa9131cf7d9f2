"""Benchmarks run with `make bench` (pytest -m bench); CI skips them. Fixtures: ../conftest.py."""
