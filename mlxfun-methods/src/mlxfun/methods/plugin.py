"""Registers the built-in methods. Importing this module must not import MLX or SciPy, and
registering them must not import numpy either (``mlxfun plugins`` would take 0.1-0.25 s more)."""

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
    from .compressors import COMPRESSORS

    for compressor in COMPRESSORS:
        register(compressor)


@hookimpl
def register_interventions(register):
    from .interventions import INTERVENTIONS

    for intervention in INTERVENTIONS:
        register(intervention)


@hookimpl
def register_neuron_scorers(register):
    from .neuron_scorers import NEURON_SCORERS

    for scorer in NEURON_SCORERS:
        register(scorer)
