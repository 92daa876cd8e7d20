"""Data types shared by plugins, and the protocol each plugin kind follows.

A plugin object is any object with the attributes its kind requires (duck typing); the
``typing.Protocol`` classes below document them and ``mlxfun.core.testing`` checks them.
Nothing here imports MLX or numpy, so listing plugins stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:  # annotations only: importing numpy costs ~0.1-0.2 s of every CLI start
    import numpy as np

KINDS = ("adapter", "scorer", "selector", "compressor", "intervention")

# Attributes each kind must provide, in addition to ``name`` and ``description``.
REQUIRED_ATTRIBUTES = {
    "adapter": ("model_types", "matches", "moe_layers"),
    "scorer": ("needs", "init", "update", "finalize"),
    "selector": ("select",),
    "compressor": ("compress",),
    "intervention": ("apply",),
}

# What a scorer may ask the observer for (``Scorer.needs``).
OBSERVABLES = frozenset({"selected", "weights", "logits", "norms", "outputs"})


@attrs.define(frozen=True)
class PluginInfo:
    """One registered plugin object, or one plugin that failed (``obj`` None, ``error`` set)."""

    kind: str
    name: str
    description: str
    distribution: str
    version: str
    obj: Any = attrs.field(default=None, repr=False, eq=False)
    error: str | None = None

    def as_dict(self) -> dict:
        data = {
            "kind": self.kind,
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "description": self.description,
        }
        if self.error is not None:
            data["error"] = self.error
        return data


@attrs.define
class LayerObservation:
    """What one MoE layer saw on one batch, for the valid (non-padding) tokens only.

    ``selected`` and ``weights`` are (tokens, top_k): the experts the block used and the gate
    weights that multiply their outputs. ``norms`` is ||f_j(x)||_2 of each selected expert's raw
    output. ``outputs`` (tokens, top_k, hidden) and ``logits`` (tokens, experts) are present only
    when a scorer asked for them.
    """

    layer: int
    num_experts: int
    selected: np.ndarray
    weights: np.ndarray
    norms: np.ndarray | None = None
    logits: np.ndarray | None = None
    outputs: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.selected.shape[0])


@attrs.define(frozen=True)
class Selection:
    """A selector's answer: kept expert ids per MoE layer position (sorted) and what went."""

    keep: dict[int, list[int]]
    removed: dict[int, list[int]]
    num_experts: list[int]

    @property
    def total_removed(self) -> int:
        return sum(len(r) for r in self.removed.values())

    @property
    def is_uniform(self) -> bool:
        return len({len(k) for k in self.keep.values()}) <= 1


@runtime_checkable
class Adapter(Protocol):
    """One MoE architecture family. See ``mlxfun.core.adapter.MoEAdapter`` for the base class.

    Optional: ``model_module``, the dotted name of a module exposing ``Model`` and ``ModelArgs``
    like mlx-lm's model modules, for model types mlx-lm lacks (``mlxfun.core.architectures``).
    """

    name: str
    description: str
    model_types: tuple[str, ...]

    def matches(self, config: dict) -> bool: ...

    def moe_layers(self, model) -> list: ...


@runtime_checkable
class Scorer(Protocol):
    """Observes routing and ranks experts: higher score = more important.

    ``needs`` is a subset of ``OBSERVABLES``. ``init`` returns float64 accumulator arrays,
    ``update`` adds one ``LayerObservation`` into them, ``finalize`` turns them into a
    (num_moe_layers, num_experts) array. ``combine(a, b)`` (optional, default: sum) merges two
    accumulators so that collecting twice and combining equals one collect over both datasets.
    """

    name: str
    description: str
    needs: frozenset

    def init(self, num_layers: int, num_experts: int) -> dict[str, np.ndarray]: ...

    def update(self, acc: dict[str, np.ndarray], obs: LayerObservation) -> None: ...

    def finalize(self, acc: dict[str, np.ndarray]) -> np.ndarray: ...


@runtime_checkable
class Selector(Protocol):
    """Chooses experts to remove: ``select(scores, n=..., ratio=..., top_k=..., protect=...,
    target=..., min_keep=...) -> Selection``."""

    name: str
    description: str

    def select(self, scores: np.ndarray, **options) -> Selection: ...


@runtime_checkable
class Compressor(Protocol):
    """Writes a compressed model directory: ``compress(request) -> dict`` (a summary)."""

    name: str
    description: str

    def compress(self, request) -> dict: ...


@runtime_checkable
class Intervention(Protocol):
    """Changes a loaded model's behaviour: ``apply(model, adapter, **options)``."""

    name: str
    description: str

    def apply(self, model, adapter, **options): ...
