"""Benchmarks: real-size architectures (``archs``), speed and quality measurement."""
