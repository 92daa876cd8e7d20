"""Adapters: see the module docstring once filled in."""

ADAPTERS = []
