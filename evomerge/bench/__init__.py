"""Benchmarks behind `evomerge bench ...`: each prints ratios measured in the same run."""
