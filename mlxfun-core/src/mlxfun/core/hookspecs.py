"""The hooks an mlxfun plugin can implement.

Each ``register_*`` hook receives a ``register`` callback; the plugin calls it once per object it
provides. The object must follow the protocol of its kind (see ``mlxfun.core.types``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pluggy import HookimplMarker, HookspecMarker

if TYPE_CHECKING:  # (typer is not imported even here: the core never needs it)
    from .types import Adapter, Compressor, Intervention, NeuronScorer, Scorer, Selector

hookspec = HookspecMarker("mlxfun")
hookimpl = HookimplMarker("mlxfun")


@hookspec
def register_adapters(register: Callable[[Adapter], None]) -> None:
    """Register MoE architecture adapters: ``register(adapter)``."""


@hookspec
def register_scorers(register: Callable[[Scorer], None]) -> None:
    """Register expert scorers (what to observe, how to rank experts): ``register(scorer)``."""


@hookspec
def register_selectors(register: Callable[[Selector], None]) -> None:
    """Register selectors (which experts to remove given scores): ``register(selector)``."""


@hookspec
def register_compressors(register: Callable[[Compressor], None]) -> None:
    """Register compressors (prune, merge, ...): ``register(compressor)``."""


@hookspec
def register_interventions(register: Callable[[Intervention], None]) -> None:
    """Register interventions (steer, abliterate, amplify, ...): ``register(intervention)``."""


@hookspec
def register_neuron_scorers(register: Callable[[NeuronScorer], None]) -> None:
    """Register neuron scorers (weight importance from input statistics, for `sparsify` and
    `prune-neurons`): ``register(neuron_scorer)``."""


@hookspec
def register_commands(app: typer.Typer) -> None:  # noqa: F821
    """Add commands to the ``mlxfun`` CLI; ``app`` is a ``typer.Typer``."""
