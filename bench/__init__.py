"""Benchmarks: each prints ratios against the anchor tools measured in the same run."""
