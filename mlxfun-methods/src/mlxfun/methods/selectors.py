"""The built-in selectors: which experts to remove, given a (num_moe_layers, num_experts) score
array (higher = more important). Definitions (also in docs/prune.md):

Every selector returns a ``types.Selection``: for every MoE layer position the sorted kept and
removed expert ids, and each layer's expert count before removal. Options (keyword arguments):

- ``n``: experts to remove per layer (``bottom``, ``strided``; an int or one int per layer) or in
  total (``model-wide``); or ``ratio`` in [0, 1): ``floor(ratio * experts)`` per layer, or of
  all experts for ``model-wide``, rounded down to a multiple of ``groups``. Exactly one of the
  two.
- ``top_k`` (int or per layer, default 1) and ``min_keep`` (int or per layer, default top-k,
  never below top-k): no layer keeps fewer than ``min_keep`` experts.
- ``protect`` / ``target``: ``{layer position: [expert ids]}``. Protected experts are never
  removed; targeted experts are always removed and count towards ``n`` (so ``n`` must be at
  least the number of targets of a layer, or of the model for ``model-wide``).
- ``num_experts`` (per layer, default ``scores.shape[1]``): layers with fewer experts than the
  score array has columns ignore the extra columns.
- ``groups`` (default 1): for group-limited routers (``n_group`` contiguous groups of experts),
  every layer removes the same number of experts from each group, so the groups keep their
  meaning; each group then behaves as a small layer of its own (its own removal order, below).
- ``normalize`` (``model-wide`` only): ``none`` (default), ``mean`` or ``max``; the per-layer
  selectors refuse any other value than ``none``.
- ``layer_indices`` (default: the positions 0, 1, ...): the decoder layer index of each MoE
  layer position, used only to name layers in messages (``prune`` passes the model's, so that
  errors speak of the layers the user named).

Removal order of a layer (or of each group): its targeted experts first, then the other
unprotected experts by ascending score, ties by ascending expert id; protected experts never.

- ``bottom``: each layer removes the first ``n`` of its removal order: the ``n`` lowest.
- ``strided`` (seed 004): targets first; the remaining ``m = n - targets`` removals are spread
  over the score spectrum for diversity. The candidates (unprotected, untargeted experts,
  ascending) split into the unimportant group U (the lowest ``m``) and the important group I
  (the rest). ``u = ceil(m / 2)`` experts go from U and ``i = m - u`` from I (if I is smaller,
  all of I and the rest from U), each at regular intervals from the least important end: from
  a group of size ``s`` removing ``c``, the experts at positions ``floor(j * s / c)`` for
  ``j = 0 .. c-1``. (The MLX-FUN reference takes the last position of each interval, which
  removes the single most important expert of the layer whenever one expert is taken from I;
  this definition takes the first.)
- ``model-wide`` (seed 000): removes the ``n`` lowest (layer, expert) pairs of the whole model,
  so layers lose different numbers. Scores are compared across layers as they are
  (``normalize="none"``), or divided by the layer's mean (``mean``) or maximum (``max``) of
  absolute scores first (a layer whose scores are all 0 is left as it is). Raw REAP scores
  grow with the size of a layer's outputs, which differs between layers, so ``mean`` is often
  the fairer comparison. Targets are removed first; then pairs by ascending (normalised) score,
  ties by layer position then expert id, skipping any that would take a layer below
  ``min_keep``. With ``groups``, the unit is one expert from each group of a layer (the j-th
  of each group's removal order), compared by the mean of their scores.

Impossible requests raise ``MlxfunError`` with one line saying what is possible.

numpy is imported inside the functions that compute: ``mlxfun plugins`` imports this module to
list the selectors, and numpy would add 0.1-0.25 s to it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import attrs
from mlxfun.core.errors import MlxfunError
from mlxfun.core.types import Selection

if TYPE_CHECKING:
    import numpy as np

NORMALIZE = ("none", "mean", "max")


@attrs.define
class _Layer:
    """One layer's constraints and its per-group removal orders."""

    position: int
    index: int  # decoder layer index, for messages
    num_experts: int
    top_k: int
    min_keep: int
    protect: set
    target: set
    groups: int
    scores: np.ndarray  # (num_experts,) raw scores
    orders: list = attrs.field(factory=list)  # per group: targets, then free ascending
    targets: list = attrs.field(factory=list)  # per group: number of targets
    free: list = attrs.field(factory=list)  # per group: unprotected, untargeted, ascending

    @property
    def group_size(self) -> int:
        return self.num_experts // self.groups

    def ascending(self, ids) -> list[int]:
        ids = sorted(ids)
        return sorted(ids, key=lambda e: (self.scores[e], e))

    def build(self) -> None:
        size = self.group_size
        for g in range(self.groups):
            members = range(g * size, (g + 1) * size)
            targets = self.ascending(e for e in members if e in self.target)
            free = self.ascending(
                e for e in members if e not in self.target and e not in self.protect
            )
            self.orders.append(targets + free)
            self.targets.append(len(targets))
            self.free.append(free)

    @property
    def min_steps(self) -> int:
        """Removals per group forced by the targets."""
        return max(self.targets)

    @property
    def max_steps(self) -> int:
        """Most removals per group allowed by protections and min_keep."""
        by_protect = min(len(order) for order in self.orders)
        by_keep = (self.num_experts - self.min_keep) // self.groups
        return min(by_protect, by_keep)

    def describe(self) -> str:
        return f"layer {self.index}"


def _per_layer(value, num_layers: int, what: str) -> list:
    import numpy as np

    if isinstance(value, list | tuple | np.ndarray):
        values = [int(v) for v in value]
        if len(values) != num_layers:
            raise MlxfunError(f"{what} has {len(values)} values for {num_layers} MoE layers")
        return values
    return [int(value)] * num_layers


def _expert_map(value, what: str) -> dict[int, set]:
    import numpy as np

    if not value:
        return {}
    result: dict[int, set] = {}
    for layer, experts in dict(value).items():
        if isinstance(layer, bool) or not isinstance(layer, int | np.integer):
            raise MlxfunError(f"{what}: layer {layer!r} is not a layer position")
        result.setdefault(int(layer), set()).update(int(e) for e in experts)
    return result


def _check_normalize(options, selector: str | None) -> None:
    """``normalize`` is one of ``NORMALIZE``; only ``model-wide`` (``selector=None``) uses a
    value other than ``none``."""
    mode = options.get("normalize") or "none"
    if mode not in NORMALIZE:
        raise MlxfunError(f"unknown normalize {mode!r}; use one of {', '.join(NORMALIZE)}")
    if selector is not None and mode != "none":
        raise MlxfunError(
            f"normalize {mode!r} only applies to the model-wide selector ({selector} compares "
            "experts within each layer); drop it or use the model-wide selector"
        )


def _prepare(scores, options, selector: str | None = None) -> tuple[np.ndarray, list[_Layer], int]:
    """Check the options and build the layers. ``selector``: the name of a per-layer selector
    (which refuses ``normalize``), ``None`` for ``model-wide``."""
    scores, indices = _checked_scores(scores, options, selector)
    num_layers, width = scores.shape
    num_experts = _per_layer(options.get("num_experts") or width, num_layers, "num_experts")
    for position, count in enumerate(num_experts):
        if not 1 <= count <= width:
            raise MlxfunError(
                f"layer {indices[position]} has {count} experts but the scores have {width} columns"
            )
    top_k = _per_layer(options.get("top_k") or 1, num_layers, "top_k")
    min_keep_option = options.get("min_keep")
    if min_keep_option is None:
        min_keep = list(top_k)
    else:
        min_keep = _per_layer(min_keep_option, num_layers, "min_keep")
    groups = int(options.get("groups") or 1)
    if groups < 1:
        raise MlxfunError(f"groups must be at least 1, got {groups}")
    protect, target = _protect_and_target(options, num_experts, indices)
    layers = []
    for position in range(num_layers):
        layer = _Layer(
            position=position,
            index=indices[position],
            num_experts=num_experts[position],
            top_k=top_k[position],
            min_keep=min_keep[position],
            protect=protect.get(position, set()),
            target=target.get(position, set()),
            groups=groups,
            scores=scores[position, : num_experts[position]],
        )
        _check_constraints(layer)
        layer.build()
        layers.append(layer)
    return scores, layers, groups


def _checked_scores(scores, options, selector: str | None) -> tuple[np.ndarray, list[int]]:
    """``(scores as float64, decoder layer index of each row)``, once the scores are a
    NaN-free (layers, experts) array and ``normalize`` suits the selector."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise MlxfunError(
            f"scores must be a (MoE layers, experts) array, got shape {tuple(scores.shape)}"
        )
    num_layers = scores.shape[0]
    indices = options.get("layer_indices")
    indices = list(range(num_layers)) if indices is None else [int(i) for i in indices]
    if len(indices) != num_layers:
        raise MlxfunError(f"layer_indices has {len(indices)} values for {num_layers} MoE layers")
    _check_normalize(options, selector)
    if np.isnan(scores).any():
        layers = sorted({indices[int(i)] for i in np.argwhere(np.isnan(scores))[:, 0]})
        raise MlxfunError(f"the scores contain NaN (layers {layers}); collect again")
    return scores, indices


def _protect_and_target(options, num_experts: list[int], indices: list[int]) -> tuple:
    """``(protect, target)``: ``{layer position: expert ids}``, every id an existing expert."""
    protect = _expert_map(options.get("protect"), "protect")
    target = _expert_map(options.get("target"), "target")
    for what, mapping in (("protected", protect), ("targeted", target)):
        for layer, experts in mapping.items():
            if not 0 <= layer < len(num_experts):
                raise MlxfunError(
                    f"{what} experts name layer position {layer}; the MoE layer positions are "
                    f"0..{len(num_experts) - 1}"
                )
            bad = sorted(e for e in experts if not 0 <= e < num_experts[layer])
            if bad:
                raise MlxfunError(
                    f"{what} experts {bad} do not exist in layer {indices[layer]} (experts "
                    f"0..{num_experts[layer] - 1})"
                )
    return protect, target


def _check_constraints(layer: _Layer) -> None:
    """One layer's constraints agree: top-k <= min_keep <= experts, equal groups, no expert
    both protected and targeted."""
    k, keep, index = layer.top_k, layer.min_keep, layer.index
    if k < 1:
        raise MlxfunError(f"top_k must be at least 1, got {k} for layer {index}")
    if keep < k:
        raise MlxfunError(
            f"min_keep {keep} is below top-k {k} (layer {index}): a layer must keep at "
            f"least top-k experts; use min_keep >= {k}"
        )
    if keep > layer.num_experts:
        raise MlxfunError(
            f"min_keep {keep} is more than the {layer.num_experts} experts of layer "
            f"{index}; use min_keep <= {layer.num_experts}"
        )
    if layer.num_experts % layer.groups:
        raise MlxfunError(
            f"layer {index} has {layer.num_experts} experts, not divisible into "
            f"{layer.groups} groups"
        )
    both = layer.protect & layer.target
    if both:
        raise MlxfunError(
            f"experts {sorted(both)} of layer {index} are both protected and targeted"
        )


def _count(options, total: int, groups: int, what: str) -> int:
    n, ratio = options.get("n"), options.get("ratio")
    if (n is None) == (ratio is None):
        raise MlxfunError("pass exactly one of n (how many experts to remove) and ratio")
    if ratio is not None:
        ratio = float(ratio)
        if not 0.0 <= ratio < 1.0:
            raise MlxfunError(f"ratio must be in [0, 1), got {ratio}")
        count = math.floor(ratio * total + 1e-9)
        return count - count % groups
    if isinstance(n, bool) or int(n) != n:
        raise MlxfunError(f"n must be a whole number, got {n!r}")
    n = int(n)
    if n < 0:
        raise MlxfunError(f"n must be 0 or more, got {n}")
    if n % groups:
        low, high = n - n % groups, n - n % groups + groups
        raise MlxfunError(
            f"n={n} {what} cannot be split equally over the router's {groups} expert groups; "
            f"use a multiple of {groups} (e.g. {low} or {high})"
        )
    return n


def _per_layer_counts(options, layers: list[_Layer], groups: int) -> list[int]:
    import numpy as np

    n = options.get("n")
    if isinstance(n, list | tuple | np.ndarray) and options.get("ratio") is None:
        counts = _per_layer(n, len(layers), "n")
        return [_count({"n": c}, 0, groups, "per layer") for c in counts]
    return [_count(options, layer.num_experts, groups, "per layer") for layer in layers]


def _check_layer(layer: _Layer, n: int) -> int:
    """Removals per group for ``n`` removals in this layer, or a one-line error."""
    steps = n // layer.groups
    where = layer.describe()
    if n > layer.num_experts - layer.min_keep:
        raise MlxfunError(
            f"removing {n} experts leaves {layer.num_experts - n} in {where}, fewer than "
            f"min_keep {layer.min_keep}; at most {layer.num_experts - layer.min_keep} can go"
        )
    if steps < layer.min_steps:
        total = layer.min_steps * layer.groups
        raise MlxfunError(
            f"{where} has {len(layer.target)} targeted experts (at most "
            f"{layer.min_steps} in one group) but only {n} are removed there; targets count "
            f"towards n: use n >= {total}"
        )
    if steps > layer.max_steps:
        most = layer.max_steps * layer.groups
        raise MlxfunError(
            f"{where} can lose at most {most} experts ({len(layer.protect)} protected, "
            f"min_keep {layer.min_keep}{_group_words(layer)}); asked for {n}"
        )
    return steps


def _group_words(layer: _Layer) -> str:
    return f", equal removals from {layer.groups} groups" if layer.groups > 1 else ""


def _selection(layers: list[_Layer], removed: dict[int, set]) -> Selection:
    keep, gone = {}, {}
    for layer in layers:
        out = sorted(int(e) for e in removed.get(layer.position, set()))
        gone[layer.position] = out
        keep[layer.position] = [e for e in range(layer.num_experts) if e not in set(out)]
    return Selection(keep=keep, removed=gone, num_experts=[layer.num_experts for layer in layers])


def _strided_positions(size: int, count: int) -> list[int]:
    """``count`` positions at regular intervals in a group of ``size``, from position 0."""
    return [j * size // count for j in range(count)]


@attrs.define(frozen=True)
class BottomSelector:
    name: str = "bottom"
    description: str = "per layer, remove the n lowest-scoring experts (REAP's pruning)"

    def select(self, scores, **options) -> Selection:
        _, layers, groups = _prepare(scores, options, self.name)
        counts = _per_layer_counts(options, layers, groups)
        removed = {}
        for layer, n in zip(layers, counts):
            steps = _check_layer(layer, n)
            removed[layer.position] = {e for order in layer.orders for e in order[:steps]}
        return _selection(layers, removed)


@attrs.define(frozen=True)
class StridedSelector:
    name: str = "strided"
    description: str = (
        "per layer, remove n experts at regular intervals from the unimportant and the "
        "important group (diversity; seed 004)"
    )

    def select(self, scores, **options) -> Selection:
        _, layers, groups = _prepare(scores, options, self.name)
        counts = _per_layer_counts(options, layers, groups)
        removed = {}
        for layer, n in zip(layers, counts):
            steps = _check_layer(layer, n)
            chosen = set()
            for order, targets, free in zip(layer.orders, layer.targets, layer.free):
                chosen.update(order[:targets])
                m = steps - targets
                if m <= 0:
                    continue
                low, high = free[:m], free[m:]
                from_high = min(m // 2, len(high))
                from_low = m - from_high
                chosen.update(low[p] for p in _strided_positions(len(low), from_low))
                if from_high:
                    chosen.update(high[p] for p in _strided_positions(len(high), from_high))
            removed[layer.position] = chosen
        return _selection(layers, removed)


def normalized(scores: np.ndarray, layers: list, mode: str) -> np.ndarray:
    """Per-layer normalised scores for model-wide comparison (see the module docstring)."""
    import numpy as np

    if mode not in NORMALIZE:
        raise MlxfunError(f"unknown normalize {mode!r}; use one of {', '.join(NORMALIZE)}")
    result = np.array(scores, dtype=np.float64)
    if mode == "none":
        return result
    for layer in layers:
        row = np.abs(layer.scores)
        scale = row.mean() if mode == "mean" else row.max()
        if np.isfinite(scale) and scale > 0:
            result[layer.position, : layer.num_experts] = layer.scores / scale
    return result


@attrs.define(frozen=True)
class ModelWideSelector:
    name: str = "model-wide"
    description: str = (
        "remove the n lowest (layer, expert) pairs across the whole model, never below "
        "min_keep per layer (seed 000); normalize=mean compares layers fairly"
    )

    def select(self, scores, **options) -> Selection:
        import numpy as np

        scores, layers, groups = _prepare(scores, options)
        total = sum(layer.num_experts for layer in layers)
        n = options.get("n")
        if isinstance(n, list | tuple | np.ndarray):
            raise MlxfunError("model-wide takes one n: the number of experts removed in total")
        n = _count(options, total, groups, "in total")
        comparable = normalized(scores, layers, options.get("normalize") or "none")
        low = sum(layer.min_steps for layer in layers) * groups
        high = sum(max(layer.max_steps, 0) for layer in layers) * groups
        for layer in layers:
            if layer.min_steps > layer.max_steps:
                raise MlxfunError(
                    f"{layer.describe()} has {len(layer.target)} targeted experts but can lose "
                    f"at most {max(layer.max_steps, 0) * groups} ({len(layer.protect)} "
                    f"protected, min_keep {layer.min_keep}{_group_words(layer)})"
                )
        if n < low:
            raise MlxfunError(
                f"{low} experts are targeted and targets count towards n; use n >= {low}"
            )
        if n > high:
            raise MlxfunError(
                f"at most {high} experts can be removed model-wide (min_keep per layer, "
                f"protected experts{', equal group removals' if groups > 1 else ''}); "
                f"asked for {n}"
            )
        steps = {layer.position: layer.min_steps for layer in layers}
        candidates = []
        for layer in layers:
            row = comparable[layer.position]
            for step in range(layer.min_steps, layer.max_steps):
                cost = float(np.mean([row[order[step]] for order in layer.orders]))
                candidates.append((cost, layer.position, step))
        candidates.sort()
        for _, position, _ in candidates[: n // groups - sum(steps.values())]:
            steps[position] += 1
        removed = {
            layer.position: {e for order in layer.orders for e in order[: steps[layer.position]]}
            for layer in layers
        }
        return _selection(layers, removed)


def removal_report(selection: Selection, scores, layer_indices=None) -> list[dict]:
    """One row per MoE layer: what was removed and the share of the layer's score it held."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    rows = []
    for position in sorted(selection.keep):
        count = selection.num_experts[position]
        removed = selection.removed.get(position, [])
        row_scores = scores[position, :count]
        total = float(np.abs(row_scores).sum())
        share = float(np.abs(row_scores[removed]).sum()) / total if total > 0 else 0.0
        rows.append(
            {
                "layer": int(layer_indices[position]) if layer_indices is not None else position,
                "position": position,
                "experts": count,
                "kept": len(selection.keep[position]),
                "removed": len(removed),
                "removed_ids": list(removed),
                "removed_score_share": round(share, 6),
            }
        )
    return rows


SELECTORS = [BottomSelector(), StridedSelector(), ModelWideSelector()]
