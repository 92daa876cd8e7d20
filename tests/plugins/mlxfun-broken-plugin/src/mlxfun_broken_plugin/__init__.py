"""Fails on import, like a plugin whose dependency is missing or incompatible."""

raise RuntimeError("mlxfun-broken-plugin fails on import on purpose")
