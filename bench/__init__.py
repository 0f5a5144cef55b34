"""Benchmarks: each prints ratios against a baseline measured in the same run.

`python -m bench` runs them all (see `bench/run.py`).
"""
