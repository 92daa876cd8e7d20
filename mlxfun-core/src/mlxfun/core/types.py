"""Data types shared by plugins, and the protocol each plugin kind follows.

A plugin object is any object with the attributes its kind requires (duck typing); the
``typing.Protocol`` classes below document them and ``mlxfun.core.testing`` checks them. The
annotations and the ``doc`` of every field are the reference: docs/plugins.md ("Types") is
generated from them (``scripts/plugin_types_doc.py``) and a test keeps the two equal.
Nothing here imports MLX or numpy, so listing plugins stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:  # annotations only: importing numpy costs ~0.1-0.2 s of every CLI start
    import mlx.nn
    import numpy as np

    from .adapter import MoELayer

KINDS = ("adapter", "scorer", "selector", "compressor", "intervention", "neuron_scorer")

# Attributes each kind must provide, in addition to ``name`` and ``description``.
REQUIRED_ATTRIBUTES = {
    "adapter": ("model_types", "matches", "moe_layers"),
    "scorer": ("needs", "init", "update", "finalize"),
    "selector": ("select",),
    "compressor": ("compress",),
    "intervention": ("apply",),
    "neuron_scorer": ("stats", "score"),
}

# What a scorer may ask the observer for (``Scorer.needs``).
OBSERVABLES = frozenset({"selected", "weights", "logits", "norms", "outputs"})

# The per-input-channel calibration statistics a neuron scorer may read (``NeuronScorer.stats``;
# definitions: docs/neuron-pruning.md).
CHANNEL_STATS = frozenset(
    {"count", "sq_norm", "mean", "mean_abs", "active", "top_mean", "tf", "df", "docs", "fisher"}
)

# The plain attributes of the protocols below (their methods say what they are themselves).
ATTRIBUTE_DOCS = {
    "name": "unique per kind; letters, digits, `_` and `-` (typed on the command line, used in "
    "stats file keys)",
    "description": "one line, shown by `mlxfun plugins`",
    "model_types": "the `config.json` `model_type` values it handles (one adapter per type)",
    "stats": "the per-input-channel statistics `score` reads: a subset of `CHANNEL_STATS` = {"
    + ", ".join(f"`{s}`" for s in sorted(CHANNEL_STATS))
    + "}",
    "needs": "what `update` reads besides `selected` and `weights`: a subset of "
    "`OBSERVABLES` = {" + ", ".join(f"`{o}`" for o in sorted(OBSERVABLES)) + "}",
}


def _doc(text: str, **kwargs):
    """An attrs field with a ``doc`` (the docs/plugins.md column "meaning")."""
    return attrs.field(metadata={"doc": text}, **kwargs)


def _optional_path(value):
    return None if value is None else Path(value)


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
    """What one MoE layer saw on one batch, for the valid (non-padding) tokens only: the
    argument ``obs`` of ``Scorer.update``. Fields a scorer did not ask for (``needs``) are None."""

    layer: int = _doc("the MoE layer position (0, 1, ...): the row of the scores")
    num_experts: int = _doc(
        "the experts of this layer (the router's columns); `init` got the largest of all layers"
    )
    selected: np.ndarray = _doc(
        "integer array (tokens, top_k) (uint32 in mlx-lm's models): the experts each token "
        "used, sorted by expert id within a token"
    )
    weights: np.ndarray = _doc(
        "float32 (tokens, top_k): the gate weight that multiplies each selected expert's output"
    )
    norms: np.ndarray | None = _doc(
        "float32 (tokens, top_k): ||f_j(x)||_2 of each selected expert's raw output", default=None
    )
    logits: np.ndarray | None = _doc(
        "float32 (tokens, num_experts): the router logits of every expert", default=None
    )
    outputs: np.ndarray | None = _doc(
        "float32 (tokens, top_k, hidden): each selected expert's raw output f_j(x)", default=None
    )

    @property
    def num_tokens(self) -> int:
        return int(self.selected.shape[0])


@attrs.define(frozen=True)
class Selection:
    """A selector's answer (``Selector.select`` returns it)."""

    keep: dict[int, list[int]] = _doc(
        "for every MoE layer position, the kept expert ids: sorted Python ints"
    )
    removed: dict[int, list[int]] = _doc(
        "for every MoE layer position, the removed expert ids: sorted Python ints; with "
        "`keep` exactly `range(num_experts[layer])`"
    )
    num_experts: list[int] = _doc(
        "each layer's expert count before removal: the `num_experts` option, one int per layer"
    )

    @property
    def total_removed(self) -> int:
        return sum(len(r) for r in self.removed.values())

    @property
    def is_uniform(self) -> bool:
        return len({len(k) for k in self.keep.values()}) <= 1


@attrs.define(frozen=True, kw_only=True)
class SelectOptions:
    """The keyword arguments of ``Selector.select(scores, **options)``, exactly as ``mlxfun
    prune`` and ``mlxfun merge`` pass them (``as_kwargs()``; ``n`` and ``ratio`` only when
    given). Lists hold one value per MoE layer position; ``protect`` and ``target`` are keyed by
    MoE layer position (0, 1, ...), not by decoder layer index."""

    top_k: list[int] = _doc("each layer's top-k: the experts every token uses")
    min_keep: list[int] = _doc(
        "the fewest experts each layer may keep (never below its top-k; group-limited routers "
        "need more)"
    )
    num_experts: list[int] = _doc(
        "each layer's expert count; the scores may have more columns (layers with fewer "
        "experts ignore the extra ones)"
    )
    protect: dict[int, list[int]] = _doc("experts that must not be removed, by layer position")
    target: dict[int, list[int]] = _doc(
        "experts that must be removed (they count towards `n`), by layer position"
    )
    groups: int = _doc(
        "router groups (`n_group` of group-limited routers, else 1): remove the same number "
        "from each of the contiguous groups of a layer",
        default=1,
    )
    normalize: str = _doc(
        "`none`, `mean` or `max` (--normalize); a selector that does not compare layers "
        "refuses anything but `none`",
        default="none",
    )
    layer_indices: list[int] = _doc(
        "each layer position's decoder layer index, to name layers in messages"
    )
    n: int | None = _doc("experts to remove (--n), passed only when given", default=None)
    ratio: float | None = _doc(
        "share of experts to remove, in [0, 1) (--ratio), passed only when given", default=None
    )

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``select``: every field, ``n`` and ``ratio`` only when set."""
        options = attrs.asdict(self, recurse=False)
        return {k: v for k, v in options.items() if v is not None or k not in ("n", "ratio")}


@attrs.define(kw_only=True)
class CompressRequest:
    """What ``mlxfun prune`` asks a compressor for (``Compressor.compress(request)``); ``mlxfun
    merge`` passes a subclass with the calibration text and merge settings."""

    model: Path = _doc("the source model directory (never modified)", converter=Path)
    stats: Path = _doc("the stats file `mlxfun collect` wrote for this model", converter=Path)
    output: Path | None = _doc(
        "the directory to write (None only with `dry_run`)", default=None, converter=_optional_path
    )
    scorer: str = _doc("the scorer whose scores rank the experts", default="reap")
    selector: str = _doc("the selector plugin that picks the experts", default="bottom")
    n: int | None = _doc("experts to remove (--n)", default=None)
    ratio: float | None = _doc("share of experts to remove (--ratio)", default=None)
    protect: dict[int | str, list[int]] = _doc(
        'experts never removed, by decoder layer index ("*": every MoE layer) (--protect)',
        factory=dict,
    )
    target: dict[int | str, list[int]] = _doc(
        'experts always removed, by decoder layer index ("*": every MoE layer) (--target)',
        factory=dict,
    )
    min_keep: int | None = _doc("experts every layer keeps at least (--min-keep)", default=None)
    normalize: str = _doc("`none`, `mean` or `max` (--normalize)", default="none")
    force: bool = _doc("replace an existing output (--force)", default=False)
    dry_run: bool = _doc("plan and return the summary, write nothing (--dry-run)", default=False)
    model_file: bool = _doc(
        "copy a plugin architecture's model module into the output as its `model_file`, so "
        "stock mlx-lm loads it with `trust_remote_code=True` (--model-file)",
        default=False,
    )


@runtime_checkable
class Adapter(Protocol):
    """One MoE architecture family. See ``mlxfun.core.adapter.MoEAdapter`` for the base class.

    Optional: ``model_module``, the dotted name of a module exposing ``Model`` and ``ModelArgs``
    like mlx-lm's model modules, for model types mlx-lm lacks (``mlxfun.core.architectures``).
    """

    name: str
    description: str
    model_types: tuple[str, ...]

    def matches(self, config: dict[str, Any]) -> bool:
        """Whether this adapter handles a model's parsed `config.json`."""

    def moe_layers(self, model: mlx.nn.Module) -> list[MoELayer]:
        """Every MoE block of a loaded model, in forward order (`MoELayer.position` 0, 1, ...)."""


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
    needs: frozenset[str]

    def init(self, num_layers: int, num_experts: int) -> dict[str, np.ndarray]:
        """Fresh float64 accumulators under plain string keys; `num_experts` is the largest
        layer's."""

    def update(self, acc: dict[str, np.ndarray], obs: LayerObservation) -> None:
        """Add one layer's observation into `acc`, in place (the return value is ignored)."""

    def finalize(self, acc: dict[str, np.ndarray]) -> np.ndarray:
        """The finite (num_layers, num_experts) float scores; must not modify `acc`."""

    def combine(self, a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Optional (default: the sum of every array): `a` and `b` merged into new arrays."""


@runtime_checkable
class Selector(Protocol):
    """Chooses experts to remove: ``select(scores, **options) -> Selection`` with the options
    of ``SelectOptions``."""

    name: str
    description: str

    def select(self, scores: np.ndarray, **options: Any) -> Selection:
        """`scores`: float64 (MoE layers, experts), higher = more important, not to be
        modified; `options`: the fields of `SelectOptions` (accept `**options`: more may come)."""


@runtime_checkable
class Compressor(Protocol):
    """Writes a compressed model directory: ``compress(request) -> dict`` (a summary)."""

    name: str
    description: str

    def compress(self, request: CompressRequest) -> dict[str, Any]:
        """Write `request.output` (nothing with `dry_run`); return a JSON-serialisable summary."""


@runtime_checkable
class Intervention(Protocol):
    """Changes a loaded model's behaviour: ``apply(model, adapter, **options)``, in place; returns
    a function that undoes the change, or None when the change stays (a weight edit)."""

    name: str
    description: str

    def apply(
        self, model: mlx.nn.Module, adapter: Adapter, **options: Any
    ) -> Callable[[], None] | None:
        """Change the loaded `model` in place (hooks, router biases, weight edits); `options`
        are the intervention's own (`steer`: `spec=`). Return a no-argument function that
        restores the model exactly (run-time changes), or None (permanent ones). Route
        through `mlxfun.core.router_bias` / `hooks` so observation sees the change."""


@runtime_checkable
class NeuronScorer(Protocol):
    """Scores every weight of one linear layer (or of one expert's projection) from the
    statistics of that layer's calibration inputs, per input channel: higher = more important.
    ``mlxfun sparsify`` zeroes the lowest scores of every output row (or of every group of M
    inputs of a row); ``mlxfun prune-neurons`` sums a down projection's scores per column
    (per intermediate neuron)."""

    name: str
    description: str
    stats: frozenset[str]

    def score(self, weight: np.ndarray, stats: dict[str, np.ndarray], **options: Any) -> np.ndarray:
        """`weight`: float32 (out, in), not to be modified; `stats`: the float64 statistics
        named in `stats`, each (in,) (`count` and `docs` are 0-d); `options`: exponents and the
        like (accept `**options`). Returns a finite float array of the weight's shape."""
