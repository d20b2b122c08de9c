"""Benchmarks: each prints one JSON report on stdout (see the README for the commands)."""
