"""Selector properties on generated cases (hypothesis): what docs/prune.md promises for
``bottom``, ``strided`` and ``model-wide`` holds for every score array, not only for the seeds
of test_selectors.py. The cases have ties, padded columns (layers with fewer experts than the
array has columns), per-layer top-k and min-keep, protected and targeted experts, and
group-limited routers with prune's minimum per layer (docs/prune.md, group-limited routers).

Expectations are computed here from the documented definitions (removal order: targets, then
the other unprotected experts by ascending (score, id)), never by calling the selectors'
helpers."""

import math

import attrs
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from mlxfun.core import plugins
from mlxfun.core.errors import MlxfunError

from .core.properties import PROPERTY, increasing_map

PER_LAYER = ["bottom", "strided"]
ALL = [*PER_LAYER, "model-wide"]


@attrs.define
class Case:
    scores: np.ndarray
    num_experts: list[int]
    top_k: list[int]
    min_keep: list[int]
    protect: dict[int, list[int]]
    target: dict[int, list[int]]
    groups: int = 1
    topk_group: int = 1

    @property
    def options(self) -> dict:
        return {
            "num_experts": list(self.num_experts),
            "top_k": list(self.top_k),
            "min_keep": list(self.min_keep),
            "protect": {p: list(e) for p, e in self.protect.items()},
            "target": {p: list(e) for p, e in self.target.items()},
            "groups": self.groups,
        }

    def members(self, position: int) -> list[range]:
        size = self.num_experts[position] // self.groups
        return [range(g * size, (g + 1) * size) for g in range(self.groups)]

    def free(self, position: int, group: range) -> list[int]:
        """Unprotected, untargeted experts of a group, by ascending (score, id)."""
        gone = set(self.protect.get(position, [])) | set(self.target.get(position, []))
        ids = [e for e in group if e not in gone]
        return sorted(ids, key=lambda e: (self.scores[position, e], e))

    def targets(self, position: int, group: range) -> list[int]:
        return [e for e in group if e in set(self.target.get(position, []))]

    def step_range(self, position: int) -> tuple[int, int]:
        """Fewest and most removals per group this layer allows (docs: targets count towards
        n; protected experts and min_keep cap it)."""
        groups = self.members(position)
        low = max(len(self.targets(position, g)) for g in groups)
        by_protect = min(
            len(self.targets(position, g)) + len(self.free(position, g)) for g in groups
        )
        by_keep = (self.num_experts[position] - self.min_keep[position]) // self.groups
        return low, min(by_protect, by_keep)

    def feasible(self, position: int, n: int) -> bool:
        low, high = self.step_range(position)
        return n % self.groups == 0 and low <= n // self.groups <= high


@st.composite
def cases(draw, feasible=True, distinct=False, roomy=False):
    """A random selector case. ``feasible``: at most as many targets per group as min_keep and
    protections allow, so some n works for every layer. ``distinct``: no two real experts of the
    array share a score. ``roomy``: at least two layers, small top-k and min_keep, few
    protections: layers that can trade removals (for the comparisons between layers)."""
    groups = draw(st.sampled_from([1, 1, 2, 3, 4]))
    layers = draw(st.integers(2 if roomy else 1, 4))
    if groups == 1:
        num_experts = draw(
            st.lists(st.integers(3 if roomy else 1, 9), min_size=layers, max_size=layers)
        )
    else:
        sizes = draw(st.lists(st.integers(3 if roomy else 2, 6), min_size=layers, max_size=layers))
        num_experts = [groups * size for size in sizes]
    width = max(num_experts)
    if distinct:
        ranks = draw(st.permutations(range(layers * width)))
        scores = np.array(ranks, dtype=np.float64).reshape(layers, width)
    else:
        values = draw(
            st.sampled_from(
                [
                    st.sampled_from([0.0, 0.5, 1.0, 2.0]),  # many ties
                    st.floats(-100, 100, allow_nan=False, allow_subnormal=False),
                ]
            )
        )
        scores = draw(hnp.arrays(np.float64, (layers, width), elements=values))
    topk_group = draw(st.integers(1, groups))
    top_k, min_keep = [], []
    for count in num_experts:
        # mostly small top-k and min_keep, so that most layers have a choice to make
        extra = st.just(0) if roomy else st.integers(0, count) | st.just(0)
        if groups == 1:
            small = st.integers(1, min(count, 2))
            k = draw(small if roomy else st.integers(1, count) | small)
            keep = min(count, k + draw(extra))
        else:  # as plan_prune: each group keeps 2, the best topk_group groups keep top-k
            k = draw(st.integers(1, topk_group * (count // groups)) | st.integers(1, 2))
            k = min(k, topk_group) if roomy else k
            asked = min(count, k + draw(extra))
            keep = max(asked, 2 * groups, groups * math.ceil(k / topk_group))
        top_k.append(k)
        min_keep.append(keep)
    protect, target = {}, {}
    for position, count in enumerate(num_experts):
        roles = draw(
            st.lists(
                st.sampled_from("ffffffffpt" if roomy else "fffffpt"),
                min_size=count,
                max_size=count,
            )
        )
        size = count // groups
        unprotected = [
            sum(1 for e in range(g * size, (g + 1) * size) if roles[e] != "p")
            for g in range(groups)
        ]
        cap = min((count - min_keep[position]) // groups, *unprotected) if feasible else count
        targeted = []
        for g in range(groups):  # beyond the cap of its group, a drawn target stays free
            targeted += [e for e in range(g * size, (g + 1) * size) if roles[e] == "t"][:cap]
        if targeted:
            target[position] = targeted
        protected = [e for e in range(count) if roles[e] == "p"]
        if protected:
            protect[position] = protected
    return Case(scores, num_experts, top_k, min_keep, protect, target, groups, topk_group)


def feasible_n(draw, case: Case) -> list[int]:
    """One n per layer within what the layer allows."""
    result = []
    for position in range(len(case.num_experts)):
        low, high = case.step_range(position)
        result.append(case.groups * draw(st.integers(low, high)))
    return result


# ---------------------------------------------------------------------------------------------
# What every selector's answer satisfies


def check_selection(selection, case: Case) -> None:
    """A partition of every layer's experts that honours min_keep, top-k, protections, targets
    and equal removals per router group (and prune's group minimums)."""
    layers = len(case.num_experts)
    assert selection.num_experts == case.num_experts
    assert set(selection.keep) == set(selection.removed) == set(range(layers))
    for position, count in enumerate(case.num_experts):
        keep, removed = selection.keep[position], selection.removed[position]
        assert keep == sorted(set(keep)) and removed == sorted(set(removed))
        assert sorted(keep + removed) == list(range(count))  # disjoint, cover, in range
        assert len(keep) >= case.min_keep[position] >= case.top_k[position]
        assert not set(removed) & set(case.protect.get(position, []))
        assert set(case.target.get(position, [])) <= set(removed)
        kept_per_group = [len(set(keep) & set(g)) for g in case.members(position)]
        assert len(set(kept_per_group)) == 1, kept_per_group
        if case.groups > 1:
            assert min(kept_per_group) >= 2
            best = sorted(kept_per_group)[-case.topk_group :]
            assert sum(best) >= case.top_k[position]


def check_lowest_removed(selection, case: Case, position: int) -> None:
    """Within each group, the removed unprotected, untargeted experts are the lowest by
    (score, id): every one below every kept one."""
    removed = set(selection.removed[position])
    for group in case.members(position):
        free = case.free(position, group)
        taken = [e for e in free if e in removed]
        assert free[: len(taken)] == taken, (position, free, taken)


def strided_reference(case: Case, position: int, n: int) -> list[int]:
    """docs/prune.md, ``strided``, per group: targets, then m = steps - targets split into U
    (the lowest m candidates) and I (the rest); ceil(m / 2) from U, the rest from I (all of I
    if I is smaller, the difference from U); from a group of s taking c: positions
    floor(j * s / c)."""
    steps = n // case.groups
    removed = []
    for group in case.members(position):
        targets, free = case.targets(position, group), case.free(position, group)
        removed += targets
        m = steps - len(targets)
        if m <= 0:
            continue
        low, high = free[:m], free[m:]
        from_high = min(m - math.ceil(m / 2), len(high))
        from_low = m - from_high
        removed += [low[j * len(low) // from_low] for j in range(from_low)]
        removed += [high[j * len(high) // from_high] for j in range(from_high)]
    return sorted(removed)


# ---------------------------------------------------------------------------------------------
# bottom and strided: n per layer


@pytest.mark.parametrize("name", PER_LAYER)
@PROPERTY
@given(case=cases(), data=st.data())
def test_per_layer_selectors_remove_exactly_n_within_the_constraints(name, case, data):
    n = feasible_n(data.draw, case)
    scores, options = case.scores.copy(), case.options
    selection = plugins.get_selector(name).select(scores, n=n, **options)
    check_selection(selection, case)
    assert [len(selection.removed[p]) for p in range(len(n))] == n
    # deterministic, and the inputs are left as they were
    assert plugins.get_selector(name).select(scores, n=n, **options) == selection
    np.testing.assert_array_equal(scores, case.scores)
    assert options == case.options


@PROPERTY
@given(case=cases(), data=st.data())
def test_bottom_removes_targets_then_the_lowest(case, data):
    n = feasible_n(data.draw, case)
    selection = plugins.get_selector("bottom").select(case.scores, n=n, **case.options)
    for position in range(len(n)):
        check_lowest_removed(selection, case, position)


@PROPERTY
@given(case=cases(), data=st.data())
def test_strided_follows_its_definition(case, data):
    n = feasible_n(data.draw, case)
    selection = plugins.get_selector("strided").select(case.scores, n=n, **case.options)
    for position, count in enumerate(n):
        assert selection.removed[position] == strided_reference(case, position, count)


@pytest.mark.parametrize("name", PER_LAYER)
@PROPERTY
@given(case=cases(feasible=False), n=st.integers(0, 13))
def test_per_layer_selectors_refuse_exactly_the_impossible(name, case, n):
    possible = all(case.feasible(p, n) for p in range(len(case.num_experts)))
    if possible:
        selection = plugins.get_selector(name).select(case.scores, n=n, **case.options)
        check_selection(selection, case)
    else:
        with pytest.raises(MlxfunError) as info:
            plugins.get_selector(name).select(case.scores, n=n, **case.options)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# model-wide: n in total


def comparable(case: Case, normalize: str) -> np.ndarray:
    """docs: scores divided by the layer's mean (or max) absolute score over its experts; a
    layer whose scale is 0 is left as it is."""
    result = case.scores.copy()
    if normalize == "none":
        return result
    for position, count in enumerate(case.num_experts):
        row = np.abs(case.scores[position, :count])
        scale = row.mean() if normalize == "mean" else row.max()
        if np.isfinite(scale) and scale > 0:
            result[position, :count] = case.scores[position, :count] / scale
    return result


def step_costs(case: Case, values: np.ndarray, position: int) -> list[float]:
    """Cost of each removal step of a layer: the mean of the comparable scores of the j-th of
    every group's removal order (one expert per group; the expert itself when groups == 1)."""
    orders = [case.targets(position, g) + case.free(position, g) for g in case.members(position)]
    length = min(len(order) for order in orders)
    return [float(np.mean([values[position, o[j]] for o in orders])) for j in range(length)]


@PROPERTY
@given(
    case=cases(roomy=True),
    normalize=st.sampled_from(["none", "mean", "max"]),
    data=st.data(),
)
def test_model_wide_removes_the_lowest_pairs_of_the_model(case, normalize, data):
    layers = range(len(case.num_experts))
    low = sum(case.step_range(p)[0] for p in layers)
    high = sum(case.step_range(p)[1] for p in layers)
    n = case.groups * data.draw(st.integers(low, high))
    scores, options = case.scores.copy(), case.options
    selector = plugins.get_selector("model-wide")
    selection = selector.select(scores, n=n, normalize=normalize, **options)
    check_selection(selection, case)
    assert selection.total_removed == n
    assert selector.select(scores, n=n, normalize=normalize, **options) == selection
    np.testing.assert_array_equal(scores, case.scores)
    assert options == case.options

    values = comparable(case, normalize)
    last_removed, next_available = {}, {}
    for position in layers:
        check_lowest_removed(selection, case, position)  # a prefix of the layer's order
        steps = len(selection.removed[position]) // case.groups
        first, most = case.step_range(position)
        costs = step_costs(case, values, position)
        if steps > first:  # removed something beyond its targets
            last_removed[position] = costs[steps - 1]
        if steps < most:  # could still lose one more step
            next_available[position] = costs[steps]
    # what went is never more important than what a layer could still have given up
    # (ties: the lower layer position goes first)
    for a, cost_a in last_removed.items():
        for b, cost_b in next_available.items():
            if a != b:
                assert (cost_a, a) < (cost_b, b), (a, cost_a, b, cost_b)


@PROPERTY
@given(case=cases(feasible=False), n=st.integers(0, 40))
def test_model_wide_refuses_exactly_the_impossible(case, n):
    layers = range(len(case.num_experts))
    ranges = [case.step_range(p) for p in layers]
    possible = (
        n % case.groups == 0
        and all(low <= high for low, high in ranges)
        and sum(low for low, _ in ranges) <= n // case.groups <= sum(high for _, high in ranges)
    )
    selector = plugins.get_selector("model-wide")
    if possible:
        selection = selector.select(case.scores, n=n, **case.options)
        check_selection(selection, case)
        assert selection.total_removed == n
    else:
        with pytest.raises(MlxfunError) as info:
            selector.select(case.scores, n=n, **case.options)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# What the selection depends on


def padding(shape):
    """Values for the padded columns, far from the real scores (no scale of theirs counts)."""
    return hnp.arrays(np.float64, shape, elements=st.floats(-1e6, 1e6, allow_subnormal=False))


def transformed(case: Case, data, per_layer: bool) -> np.ndarray:
    """The scores under a strictly increasing map (one per layer, or one for the whole array),
    with new values in the padded columns."""
    steps = st.lists(st.integers(1, 5), min_size=case.scores.size, max_size=case.scores.size)
    real = np.arange(case.scores.shape[1])[None, :] < np.array(case.num_experts)[:, None]
    result = data.draw(padding(case.scores.shape))
    if per_layer:
        for position, count in enumerate(case.num_experts):
            result[position, :count] = increasing_map(
                case.scores[position, :count], data.draw(steps)
            )
    else:
        result[real] = increasing_map(case.scores[real], data.draw(steps))
    return result


@pytest.mark.parametrize("name", PER_LAYER)
@PROPERTY
@given(case=cases(), data=st.data())
def test_per_layer_selectors_see_only_the_order_within_each_layer(name, case, data):
    """A strictly increasing map per layer keeps ties and order, so the selection stays; the
    padded columns are no experts and change nothing."""
    n = feasible_n(data.draw, case)
    selector = plugins.get_selector(name)
    selection = selector.select(case.scores, n=n, **case.options)
    other = transformed(case, data, per_layer=True)
    assert selector.select(other, n=n, **case.options) == selection


@PROPERTY
@given(case=cases(roomy=True), normalize=st.sampled_from(["none", "mean", "max"]), data=st.data())
def test_model_wide_sees_only_what_its_comparison_uses(case, normalize, data):
    """normalize none, one expert per unit: only the order over the whole model matters.
    normalize mean / max: a layer scaled by a power of two (exact) compares the same. The
    padded columns change nothing."""
    layers = range(len(case.num_experts))
    n = case.groups * sum(data.draw(st.integers(*case.step_range(p))) for p in layers)
    selector = plugins.get_selector("model-wide")
    selection = selector.select(case.scores, n=n, normalize=normalize, **case.options)
    real = np.arange(case.scores.shape[1])[None, :] < np.array(case.num_experts)[:, None]
    if normalize == "none" and case.groups == 1:
        other = transformed(case, data, per_layer=False)
    else:
        other = np.where(real, case.scores, data.draw(padding(case.scores.shape)))
        if normalize == "none":  # group units compare means: scale the whole model alike
            other *= 2.0 ** data.draw(st.integers(0, 8))
        else:
            for position in layers:
                other[position] *= 2.0 ** data.draw(st.integers(0, 8))
    assert selector.select(other, n=n, normalize=normalize, **case.options) == selection


def permuted(case: Case, data) -> tuple[Case, list[list[int]]]:
    """The case with each layer's experts renamed by a permutation within each group."""
    names = []
    for position in range(len(case.num_experts)):
        new = []
        for group in case.members(position):
            new += data.draw(st.permutations(list(group)))
        names.append(new)
    scores = case.scores.copy()
    for position, new in enumerate(names):
        scores[position, new] = case.scores[position, : len(new)]

    def rename(mapping):
        return {p: sorted(names[p][e] for e in ids) for p, ids in mapping.items()}

    other = attrs.evolve(
        case, scores=scores, protect=rename(case.protect), target=rename(case.target)
    )
    return other, names


@pytest.mark.parametrize("name", ALL)
@PROPERTY
@given(case=cases(distinct=True), normalize=st.sampled_from(["none", "mean"]), data=st.data())
def test_renaming_experts_renames_the_selection(name, case, normalize, data):
    """Without ties, the selection follows the experts, not their ids (ties alone are broken by
    id)."""
    if name == "model-wide":
        layers = range(len(case.num_experts))
        n = case.groups * sum(data.draw(st.integers(*case.step_range(p))) for p in layers)
        options = dict(n=n, normalize=normalize)
    else:
        options = dict(n=feasible_n(data.draw, case))
    selector = plugins.get_selector(name)
    selection = selector.select(case.scores, **options, **case.options)
    other, names = permuted(case, data)
    renamed = selector.select(other.scores, **options, **other.options)
    for position, new in enumerate(names):
        assert renamed.removed[position] == sorted(new[e] for e in selection.removed[position])


# ---------------------------------------------------------------------------------------------
# Counts from ratio


@pytest.mark.parametrize("name", ALL)
@PROPERTY
@given(case=cases(), percent=st.integers(0, 99))
def test_ratio_removes_the_floor_rounded_down_to_the_groups(name, case, percent):
    ratio = percent / 100
    options = dict(case.options, protect={}, target={}, min_keep=None, top_k=1)
    selector = plugins.get_selector(name)
    if name != "model-wide":
        selection = selector.select(case.scores, ratio=ratio, **options)
        for position, count in enumerate(case.num_experts):
            expected = percent * count // 100
            assert len(selection.removed[position]) == expected - expected % case.groups
        return
    total = sum(case.num_experts)
    expected = percent * total // 100
    expected -= expected % case.groups
    most = sum(count - case.groups for count in case.num_experts)  # min_keep 1, equal groups
    if expected > most:
        with pytest.raises(MlxfunError):
            selector.select(case.scores, ratio=ratio, **options)
    else:
        assert selector.select(case.scores, ratio=ratio, **options).total_removed == expected
