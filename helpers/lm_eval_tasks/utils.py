"""Helpers for the course's lm_eval tasks: keep only the held-out pairs of one kind."""

from __future__ import annotations


def _only(dataset, kind: str):
    return dataset.filter(lambda doc: doc["kind"] == kind)


def helpful_vs_evasive(dataset):
    """The pairs where a helpful answer is preferred to an evasive one."""
    return _only(dataset, "helpful_vs_evasive")


def concise_vs_rambling(dataset):
    """The pairs where a concise answer is preferred to a rambling one."""
    return _only(dataset, "concise_vs_rambling")


def correct_vs_wrong(dataset):
    """The pairs where a correct answer is preferred to a wrong one."""
    return _only(dataset, "correct_vs_wrong")


def follows_system(dataset):
    """The pairs where the answer that follows the system prompt is preferred."""
    return _only(dataset, "follows_system")
