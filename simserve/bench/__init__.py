"""Benchmarks behind ``simserve bench``: ratios measured side by side, medians reported."""
