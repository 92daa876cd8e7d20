"""Selector invariants on many random score arrays: removed counts, protections, targets,
min-keep, groups, determinism, ties by expert id, and one-line errors for impossible requests."""

import numpy as np
import pytest
from mlxfun.core import plugins, testing
from mlxfun.core.errors import MlxfunError
from mlxfun.methods.selectors import (
    SELECTORS,
    BottomSelector,
    ModelWideSelector,
    StridedSelector,
    _prepare,
    normalized,
    removal_report,
)

BOTTOM, STRIDED, MODEL_WIDE = BottomSelector(), StridedSelector(), ModelWideSelector()
SEEDS = range(60)


def random_case(seed):
    """Random scores (with deliberate ties), constraints and an n that is feasible."""
    rng = np.random.default_rng(seed)
    layers, experts = int(rng.integers(1, 6)), int(rng.choice([4, 6, 8, 12, 16]))
    scores = rng.random((layers, experts))
    if seed % 3 == 0:
        scores = np.round(scores * 4) / 4  # many ties
    top_k = int(rng.integers(1, 3))
    min_keep = top_k + int(rng.integers(0, 2))
    protect, target = {}, {}
    for layer in range(layers):
        ids = rng.permutation(experts)
        if rng.random() < 0.5:
            protect[layer] = sorted(int(e) for e in ids[: rng.integers(1, 3)])
        if rng.random() < 0.5:
            target[layer] = sorted(int(e) for e in ids[3 : 3 + rng.integers(1, 2)])
    return scores, dict(top_k=top_k, min_keep=min_keep, protect=protect, target=target)


def check_partition(selection, scores, options):
    layers, experts = scores.shape
    assert selection.num_experts == [experts] * layers
    for layer in range(layers):
        keep, removed = selection.keep[layer], selection.removed[layer]
        assert keep == sorted(keep) and removed == sorted(removed)
        assert sorted(keep + removed) == list(range(experts))
        assert len(keep) >= options.get("min_keep", options.get("top_k", 1))
        assert not set(removed) & set(options.get("protect", {}).get(layer, []))
        assert set(options.get("target", {}).get(layer, [])) <= set(removed)


def per_layer_n(scores, options, rng):
    """A per-layer n every layer can satisfy."""
    experts = scores.shape[1]
    lows, highs = [], []
    for layer in range(scores.shape[0]):
        targets = len(options["target"].get(layer, []))
        free = experts - len(options["protect"].get(layer, []))
        lows.append(targets)
        highs.append(min(free, experts - options["min_keep"]))
    low, high = max(lows), min(highs)
    return None if low > high else int(rng.integers(low, high + 1))


@pytest.mark.parametrize("seed", SEEDS)
def test_bottom_removes_the_n_lowest(seed):
    scores, options = random_case(seed)
    n = per_layer_n(scores, options, np.random.default_rng(seed))
    if n is None:
        pytest.skip("no n fits every layer")
    selection = BOTTOM.select(scores, n=n, **options)
    check_partition(selection, scores, options)
    for layer in range(scores.shape[0]):
        removed = selection.removed[layer]
        assert len(removed) == n
        targets = set(options["target"].get(layer, []))
        protected = set(options["protect"].get(layer, []))
        free_removed = [e for e in removed if e not in targets]
        free_kept = [e for e in selection.keep[layer] if e not in protected]
        if free_removed and free_kept:
            highest = max((scores[layer, e], e) for e in free_removed)
            assert highest < min((scores[layer, e], e) for e in free_kept)


@pytest.mark.parametrize("seed", SEEDS)
def test_strided_counts_and_constraints(seed):
    scores, options = random_case(seed)
    n = per_layer_n(scores, options, np.random.default_rng(seed))
    if n is None:
        pytest.skip("no n fits every layer")
    selection = STRIDED.select(scores, n=n, **options)
    check_partition(selection, scores, options)
    assert all(len(r) == n for r in selection.removed.values())
    assert STRIDED.select(scores.copy(), n=n, **options) == selection


def reference_model_wide(scores, n, top_k, min_keep, protect, target):
    """Brute force: targets first, then the globally lowest (score, layer, expert) pairs while
    the layer stays at or above min_keep."""
    layers, experts = scores.shape
    removed = {layer: set(target.get(layer, [])) for layer in range(layers)}
    pairs = sorted(
        (scores[layer, e], layer, e)
        for layer in range(layers)
        for e in range(experts)
        if e not in protect.get(layer, []) and e not in target.get(layer, [])
    )
    budget = n - sum(len(r) for r in removed.values())
    for _, layer, e in pairs:
        if budget == 0:
            break
        if experts - len(removed[layer]) > min_keep:
            removed[layer].add(e)
            budget -= 1
    return {layer: sorted(r) for layer, r in removed.items()}


@pytest.mark.parametrize("seed", SEEDS)
def test_model_wide_equals_a_brute_force_reference(seed):
    scores, options = random_case(seed)
    rng = np.random.default_rng(seed + 1000)
    layers, experts = scores.shape
    low = sum(len(t) for t in options["target"].values())
    high = sum(
        min(experts - len(options["protect"].get(layer, [])), experts - options["min_keep"])
        for layer in range(layers)
    )
    if (
        any(
            len(options["target"].get(layer, [])) > experts - options["min_keep"]
            for layer in range(layers)
        )
        or low > high
    ):
        with pytest.raises(MlxfunError):
            MODEL_WIDE.select(scores, n=max(low, 0), **options)
        return
    n = int(rng.integers(low, high + 1))
    selection = MODEL_WIDE.select(scores, n=n, **options)
    check_partition(selection, scores, options)
    assert selection.total_removed == n
    assert selection.removed == reference_model_wide(scores, n, **options)
    assert MODEL_WIDE.select(scores.copy(), n=n, **options) == selection


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("selector", SELECTORS, ids=lambda s: s.name)
def test_groups_lose_the_same_number_each(seed, selector):
    rng = np.random.default_rng(seed)
    groups, size = int(rng.choice([2, 4])), int(rng.choice([3, 4]))
    scores = rng.random((3, groups * size))
    protect = {0: [0]}
    target = {1: [size + 1]} if size > 1 else {}
    n = groups * (int(rng.integers(1, size - 1)) if selector.name != "model-wide" else 1)
    n = n if selector.name != "model-wide" else groups * int(rng.integers(1, 4))
    selection = selector.select(
        scores, n=n, top_k=2, min_keep=2 * groups, groups=groups, protect=protect, target=target
    )
    for layer, removed in selection.removed.items():
        per_group = [sum(1 for e in removed if e // size == g) for g in range(groups)]
        assert len(set(per_group)) == 1, per_group
        assert 0 not in removed or layer != 0
    assert set(target.get(1, [])) <= set(selection.removed[1])
    assert selection.total_removed == (n if selector.name == "model-wide" else 3 * n)


def test_grouped_model_wide_compares_the_mean_of_one_expert_per_group():
    scores = np.array([[0.1, 0.9, 0.2, 0.8], [0.3, 0.4, 0.35, 0.45]])
    # layer 0: first step removes experts 0 and 2 (mean 0.15); layer 1: 0 and 2 (mean 0.325)
    selection = MODEL_WIDE.select(scores, n=2, groups=2, top_k=1)
    assert selection.removed == {0: [0, 2], 1: []}


def test_ties_are_broken_by_expert_id_and_layer_position():
    scores = np.ones((3, 8))
    assert BOTTOM.select(scores, n=3).removed == {0: [0, 1, 2], 1: [0, 1, 2], 2: [0, 1, 2]}
    selection = MODEL_WIDE.select(scores, n=10, top_k=2)
    assert selection.removed == {0: [0, 1, 2, 3, 4, 5], 1: [0, 1, 2, 3], 2: []}


def test_strided_spreads_removals_over_both_groups():
    scores = np.arange(16, dtype=float)[None, :]  # expert e has score e
    # m = 8: U = experts 0..7 (4 at positions 0, 2, 4, 6), I = 8..15 (4 at 0, 2, 4, 6)
    assert STRIDED.select(scores, n=8).removed[0] == [0, 2, 4, 6, 8, 10, 12, 14]
    # m = 3: U = 0..2 (2 at positions 0, 1), I = 3..15 (1 at position 0)
    assert STRIDED.select(scores, n=3).removed[0] == [0, 1, 3]
    # the most important expert is never taken while others can be
    assert 15 not in STRIDED.select(scores, n=2).removed[0]


def test_model_wide_lets_layers_lose_different_numbers():
    scores = np.array([[0.1, 0.2, 5, 6], [1, 2, 3, 4], [0.05, 7, 8, 9]])
    selection = MODEL_WIDE.select(scores, n=4, top_k=1, min_keep=2)
    assert selection.removed == {0: [0, 1], 1: [0], 2: [0]}
    assert not selection.is_uniform


def test_model_wide_normalize_compares_layers_on_their_own_scale():
    # layer 1 has scores 100x larger: raw comparison removes only from layer 0
    scores = np.array([[1.0, 2.0, 3.0, 4.0], [100.0, 150.0, 400.0, 350.0]])
    assert MODEL_WIDE.select(scores, n=2, top_k=1).removed == {0: [0, 1], 1: []}
    selection = MODEL_WIDE.select(scores, n=2, top_k=1, normalize="mean")
    assert selection.removed == {0: [0], 1: [0]}
    means = np.abs(scores).mean(axis=1, keepdims=True)
    _, layers, _ = _prepare(scores, {})
    np.testing.assert_allclose(normalized(scores, layers, "mean"), scores / means)


def test_ratio_rounds_down_per_layer_and_in_total():
    scores = np.random.default_rng(0).random((4, 8))
    assert all(len(r) == 2 for r in BOTTOM.select(scores, ratio=0.3).removed.values())
    assert MODEL_WIDE.select(scores, ratio=0.25).total_removed == 8
    assert BOTTOM.select(scores, ratio=0.0).total_removed == 0


def test_per_layer_n_and_num_experts():
    scores = np.random.default_rng(1).random((2, 8))
    selection = BOTTOM.select(scores, n=[1, 3], num_experts=[6, 8])
    assert selection.num_experts == [6, 8]
    assert [len(r) for r in selection.removed.values()] == [1, 3]
    assert max(selection.keep[0] + selection.removed[0]) == 5


def test_report_rows():
    scores = np.array([[1.0, 2.0, 3.0, 4.0]])
    selection = BOTTOM.select(scores, n=1)
    (row,) = removal_report(selection, scores, layer_indices=[5])
    assert row["layer"] == 5 and row["removed_ids"] == [0] and row["kept"] == 3
    assert row["removed_score_share"] == pytest.approx(0.1)


ERRORS = [
    (BOTTOM, dict(n=7, top_k=2), "at most 6 can go"),
    (BOTTOM, dict(n=-1), "0 or more"),
    (BOTTOM, dict(n=2, ratio=0.5), "exactly one"),
    (BOTTOM, dict(), "exactly one"),
    (BOTTOM, dict(ratio=1.0), "ratio must be in"),
    (BOTTOM, dict(n=1.5), "whole number"),
    (BOTTOM, dict(n=2, min_keep=1, top_k=2), "below top-k"),
    (BOTTOM, dict(n=1, target={0: [1, 2]}), "use n >= 2"),
    (BOTTOM, dict(n=3, protect={0: [0, 1, 2, 3, 4, 5]}), "at most 2"),
    (BOTTOM, dict(n=1, protect={9: [0]}), "positions are 0..2"),
    (BOTTOM, dict(n=1, target={0: [8]}), "do not exist in layer 0"),
    (BOTTOM, dict(n=1, protect={0: [1]}, target={0: [1]}), "both protected and targeted"),
    (BOTTOM, dict(n=3, groups=2), "multiple of 2"),
    (BOTTOM, dict(n=2, groups=3), "not divisible into 3 groups"),
    (STRIDED, dict(n=8), "fewer than min_keep"),
    (MODEL_WIDE, dict(n=19, top_k=2), "at most 18"),
    (MODEL_WIDE, dict(n=1, target={0: [1], 1: [2]}), "use n >= 2"),
    (MODEL_WIDE, dict(n=3, min_keep=7, target={0: [1, 2]}), "can lose at most 1"),
    (MODEL_WIDE, dict(n=[1, 2, 3]), "one n"),
    (MODEL_WIDE, dict(n=2, normalize="zscore"), "unknown normalize"),
    (BOTTOM, dict(n=1, min_keep=9), "min_keep 9 is more than the 8 experts of layer 0"),
    (STRIDED, dict(n=1, min_keep=[1, 1, 9]), "more than the 8 experts of layer 2"),
    (MODEL_WIDE, dict(n=1, min_keep=9), "use min_keep <= 8"),
    (BOTTOM, dict(n=1, normalize="mean"), "only applies to the model-wide selector"),
    (STRIDED, dict(n=1, normalize="max"), "only applies to the model-wide selector"),
    (BOTTOM, dict(n=1, normalize="zscore"), "unknown normalize"),
]


@pytest.mark.parametrize("selector,options,message", ERRORS)
def test_impossible_requests_fail_with_one_line(selector, options, message):
    scores = np.random.default_rng(3).random((3, 8))
    with pytest.raises(MlxfunError) as info:
        selector.select(scores, **options)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# MoE layer positions 0, 1, 2 are decoder layers 1, 3, 5 (dense layers in between): every
# message names the decoder layer, as the user gave it, never the position.
LAYER_MESSAGES = [
    (BOTTOM, dict(n=4, protect={0: [0, 1, 2, 3, 4, 5, 6]}), "layer 1 can lose at most 1"),
    (BOTTOM, dict(n=1, target={2: [9]}), "do not exist in layer 5"),
    (BOTTOM, dict(n=8), "in layer 1, fewer than min_keep"),
    (BOTTOM, dict(n=1, target={1: [0, 1]}), "layer 3 has 2 targeted"),
    (STRIDED, dict(n=1, protect={2: [1]}, target={2: [1]}), "of layer 5 are both"),
    (BOTTOM, dict(n=1, min_keep=[1, 1, 9]), "experts of layer 5"),
    (BOTTOM, dict(n=1, top_k=[1, 2, 1], min_keep=1), "(layer 3)"),
    (BOTTOM, dict(n=1, num_experts=[8, 9, 8]), "layer 3 has 9 experts"),
    (BOTTOM, dict(n=2, groups=3), "layer 1 has 8 experts, not divisible"),
    (MODEL_WIDE, dict(n=3, min_keep=7, target={1: [1, 2]}), "layer 3 has 2 targeted"),
]


@pytest.mark.parametrize("selector,options,message", LAYER_MESSAGES)
def test_messages_name_decoder_layers(selector, options, message):
    scores = np.random.default_rng(3).random((3, 8))
    with pytest.raises(MlxfunError) as info:
        selector.select(scores, layer_indices=[1, 3, 5], **options)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_nan_scores_name_decoder_layers():
    scores = np.ones((2, 4))
    scores[1, 2] = np.nan
    with pytest.raises(MlxfunError, match=r"NaN \(layers \[7\]\)"):
        BOTTOM.select(scores, n=1, layer_indices=[2, 7])


def test_nan_scores_are_refused():
    scores = np.ones((2, 4))
    scores[1, 2] = np.nan
    with pytest.raises(MlxfunError, match="NaN"):
        BOTTOM.select(scores, n=1)


@pytest.mark.parametrize("selector", SELECTORS, ids=lambda s: s.name)
def test_conformance_and_registration(selector):
    testing.check_selector(selector, n=4 if selector.name == "model-wide" else 2)
    assert plugins.get_selector(selector.name) == selector
