"""Helpers for the NeuralHermes-2.5 DPO course: profiles, data, the tiny model and the recipe's steps."""

__version__ = "0.1.0"
