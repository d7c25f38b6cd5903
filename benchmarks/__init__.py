"""Measurement scripts for the course's CPU path and the recipe's GPU scale (see benchmarks/README.md).

A package so that the scripts and the tests import one another by name, never by file path: run each one from the
repository root as ``python -m benchmarks.NAME`` (e.g. ``python -m benchmarks.reference_model --quick``).
"""
