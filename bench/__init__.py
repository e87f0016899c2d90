"""Benchmarks (run as python -m bench.NAME); results land in bench/results/."""
