"""``check_selector``: a selector returns a valid ``Selection`` for any scores."""

import numpy as np

from ..types import Selection
from .failures import fail, plugin_label
from .plugin import check_plugin


def check_selector(
    selector,
    num_layers: int = 4,
    num_experts: int = 8,
    options: dict | None = None,
    expect_removal: bool = True,
    seed: int = 0,
) -> None:
    """Given random scores, ``select(scores, **options)`` returns a valid ``types.Selection``.

    For every layer position, ``keep`` and ``removed`` are sorted lists of Python ints that
    partition ``range(num_experts)``; ``num_experts`` lists each layer's expert count; at least
    ``top_k`` experts (``options["top_k"]``, default 2) stay; the scores are not modified; the
    same input gives the same answer; ties (all scores equal) give a valid answer too.
    ``options`` defaults to ``{"n": 2, "top_k": 2}``.
    """
    check_plugin("selector", selector)
    label = plugin_label("selector", selector)
    options = {"n": 2, "top_k": 2} if options is None else dict(options)
    top_k = options.get("top_k", 1) or 1
    rng = np.random.default_rng(seed)
    scores = rng.random((num_layers, num_experts))
    original = scores.copy()
    selection = selector.select(scores, **options)
    if not np.array_equal(scores, original):
        fail(label, "select() modified the scores it was given")
    _check_selection(label, selection, num_layers, num_experts, top_k, options)
    if expect_removal and selection.total_removed == 0:
        fail(label, f"select(scores, **{options}) removed no expert")
    repeat = selector.select(scores.copy(), **options)
    if (repeat.keep, repeat.removed) != (selection.keep, selection.removed):
        fail(label, "select() gave a different selection for the same scores; seed any randomness")
    tied = selector.select(np.ones((num_layers, num_experts)), **options)
    _check_selection(label + " on tied scores", tied, num_layers, num_experts, top_k, options)


def _check_selection(label, selection, num_layers, num_experts, top_k, options) -> None:
    if not isinstance(selection, Selection):
        fail(
            label,
            f"select() must return mlxfun.core.types.Selection, got {type(selection).__name__}",
        )
    if list(selection.num_experts) != [num_experts] * num_layers:
        fail(
            label,
            f"Selection.num_experts is {selection.num_experts}, expected "
            f"{[num_experts] * num_layers} (the expert count of each layer before removal)",
        )
    layers = set(range(num_layers))
    if set(selection.keep) != layers:
        fail(
            label,
            f"Selection.keep has layer positions {sorted(selection.keep)}, expected "
            f"every position 0..{num_layers - 1}",
        )
    if not set(selection.removed) <= layers:
        fail(
            label,
            f"Selection.removed has unknown layer positions "
            f"{sorted(set(selection.removed) - layers)}",
        )
    for layer in range(num_layers):
        keep, removed = selection.keep[layer], selection.removed.get(layer, [])
        for what, ids in (("keep", keep), ("removed", removed)):
            if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids
            ):
                fail(
                    label,
                    f"{what}[{layer}] = {ids!r} must be a list of Python ints "
                    "(they are written to JSON; convert numpy integers with int())",
                )
            if ids != sorted(set(ids)):
                fail(label, f"{what}[{layer}] = {ids} must be sorted without duplicates")
        if set(keep) & set(removed):
            fail(
                label,
                f"layer {layer}: experts {sorted(set(keep) & set(removed))} are both "
                "kept and removed",
            )
        if set(keep) | set(removed) != set(range(num_experts)):
            fail(
                label,
                f"layer {layer}: keep {keep} and removed {removed} do not cover the "
                f"experts 0..{num_experts - 1}",
            )
        if len(keep) < top_k:
            fail(
                label,
                f"layer {layer} keeps {len(keep)} experts, fewer than top_k={top_k} "
                f"(options {options})",
            )
