"""Benchmarks: each module here prints its figures. `make bench` runs them all."""
