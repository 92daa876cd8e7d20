"""Registers the built-in adapters. Importing this module must not import MLX."""

from mlxfun.core.hookspecs import hookimpl


@hookimpl
def register_adapters(register):
    from .catalog import ADAPTERS

    for adapter in ADAPTERS:
        register(adapter)
