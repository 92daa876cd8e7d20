"""Registers the built-in methods. Importing this module must not import MLX or SciPy."""

from mlxfun.core.hookspecs import hookimpl


@hookimpl
def register_scorers(register):
    from .scorers import SCORERS

    for scorer in SCORERS:
        register(scorer)


@hookimpl
def register_selectors(register):
    from .selectors import SELECTORS

    for selector in SELECTORS:
        register(selector)


@hookimpl
def register_compressors(register):
    from .prune import COMPRESSORS
    from .ream import COMPRESSORS as MERGERS

    for compressor in (*COMPRESSORS, *MERGERS):
        register(compressor)
