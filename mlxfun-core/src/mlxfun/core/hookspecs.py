"""The hooks an mlxfun plugin can implement.

Each ``register_*`` hook receives a ``register`` callback; the plugin calls it once per object it
provides. The object must follow the protocol of its kind (see ``mlxfun.core.types``).
"""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("mlxfun")
hookimpl = HookimplMarker("mlxfun")


@hookspec
def register_adapters(register):
    """Register MoE architecture adapters: ``register(adapter)``."""


@hookspec
def register_scorers(register):
    """Register expert scorers (what to observe, how to rank experts): ``register(scorer)``."""


@hookspec
def register_selectors(register):
    """Register selectors (which experts to remove given scores): ``register(selector)``."""


@hookspec
def register_compressors(register):
    """Register compressors (prune, merge, ...): ``register(compressor)``."""


@hookspec
def register_interventions(register):
    """Register interventions (steer, abliterate, amplify, ...): ``register(intervention)``."""


@hookspec
def register_commands(app):
    """Add commands to the ``mlxfun`` CLI; ``app`` is a ``typer.Typer``."""
