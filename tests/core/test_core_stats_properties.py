"""Stats merge properties on generated collections (hypothesis); needs only mlxfun-core.

``sum`` (mlxfun.core.stats.merge_stats): merging files equals one collect over all their
observations (sums and counts add, maxima take the maximum), in any order and grouping, and an
empty collection changes nothing. ``rank`` / ``global-rank``: each file's experts get the ranks
0 .. experts-1 of its layer (of the model), ordered by score, ties by expert id (by layer
position, then expert id); padded columns take no rank; the merge adds them up. So a merge only
sees the order of each file's scores, and renaming experts renames the result.

The helpers take the scorers as an argument: tests/test_stats_properties.py runs the same sum
merge properties with the built-in scorers."""

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from mlxfun.core.stats import Stats, StatsCollector, load_stats, merge_stats, save_stats
from mlxfun.core.testing import make_observation

from .properties import PROPERTY, increasing_map
from .test_core_stats import SCORERS

# ---------------------------------------------------------------------------------------------
# sum merges


@st.composite
def layouts(draw):
    """(MoE layers, experts, top-k) of a small model."""
    experts = draw(st.integers(2, 6))
    return draw(st.integers(1, 3)), experts, draw(st.integers(1, min(2, experts)))


def batches(layout):
    """What one dataset shows the model: observations as (layer, tokens, seed, whether the last
    expert is never routed to), possibly none at all."""
    layers, experts, top_k = layout
    silent = st.booleans() if top_k < experts else st.just(False)
    one = st.tuples(st.integers(0, layers - 1), st.integers(1, 5), st.integers(0, 999), silent)
    return st.lists(one, max_size=4)


def fingerprint(layers, experts, top_k) -> dict:
    return {
        "model_type": "test_moe",
        "config_hash": "abc",
        "moe_layers": list(range(layers)),
        "experts_per_layer": [experts] * layers,
        "top_k": [top_k] * layers,
    }


def collect(scorers, layout, *datasets) -> Stats:
    """One collect over the datasets, in order."""
    layers, experts, top_k = layout
    collector = StatsCollector(scorers, layers, experts)
    for dataset in datasets:
        collector.update(
            make_observation(
                layer,
                experts,
                tokens,
                top_k,
                seed=seed,
                never_routed=(experts - 1,) if silent else (),
            )
            for layer, tokens, seed, silent in dataset
        )
    metadata = {
        "fingerprint": fingerprint(*layout),
        "datasets": [f"d{len(dataset)}.jsonl" for dataset in datasets],
        "tokens_seen": int(collector.token_counts.sum()),
    }
    return Stats(collector.scores(), collector.accumulators, collector.token_counts, metadata)


def through_file(stats: Stats, folder: Path, name: str) -> Stats:
    path = folder / f"{name}.npz"
    save_stats(path, stats.scores, stats.accumulators, stats.token_counts, stats.metadata)
    return load_stats(path)


def assert_same(a: Stats, b: Stats, rtol: float = 0.0) -> None:
    """Equal scores, accumulators and token counts (to ``rtol``: float sums in another order)."""
    assert a.scores.keys() == b.scores.keys() and a.accumulators.keys() == b.accumulators.keys()
    for name in a.scores:
        np.testing.assert_allclose(a.scores[name], b.scores[name], rtol=rtol, atol=0)
        assert a.accumulators[name].keys() == b.accumulators[name].keys()
        for key in a.accumulators[name]:
            got, want = a.accumulators[name][key], b.accumulators[name][key]
            np.testing.assert_allclose(got, want, rtol=rtol, atol=0, err_msg=f"{name}.{key}")
    np.testing.assert_array_equal(a.token_counts, b.token_counts)


def check_files_merge_like_one_collect(scorers, layout, a, b) -> None:
    by_name = {s.name: s for s in scorers}
    with tempfile.TemporaryDirectory() as folder:
        files = [
            through_file(collect(scorers, layout, a), Path(folder), "a"),
            through_file(collect(scorers, layout, b), Path(folder), "b"),
        ]
    merged = merge_stats(files, by_name)
    assert_same(merged, collect(scorers, layout, a, b), rtol=1e-12)
    assert merged.metadata["tokens_seen"] == int(merged.token_counts.sum())
    assert merged.metadata["datasets"] == [f"d{len(a)}.jsonl", f"d{len(b)}.jsonl"]


def check_merge_order_does_not_matter(scorers, layout, a, b, c) -> None:
    by_name = {s.name: s for s in scorers}
    stats_a, stats_b, stats_c = (collect(scorers, layout, d) for d in (a, b, c))
    ab = merge_stats([stats_a, stats_b], by_name)
    assert_same(ab, merge_stats([stats_b, stats_a], by_name))  # exactly: x + y == y + x
    left = merge_stats([ab, stats_c], by_name)
    assert_same(merge_stats([stats_a, stats_b, stats_c], by_name), left)
    right = merge_stats([stats_a, merge_stats([stats_b, stats_c], by_name)], by_name)
    assert_same(left, right, rtol=1e-12)
    assert left.metadata["tokens_seen"] == right.metadata["tokens_seen"]


def check_empty_merge_is_identity(scorers, layout, a) -> None:
    by_name = {s.name: s for s in scorers}
    stats, empty = collect(scorers, layout, a), collect(scorers, layout)
    assert_same(merge_stats([stats, empty], by_name), stats)
    assert_same(merge_stats([empty, stats], by_name), stats)


@PROPERTY
@given(data=st.data())
def test_merged_files_equal_one_collect_over_both(data):
    layout = data.draw(layouts())
    check_files_merge_like_one_collect(
        SCORERS, layout, data.draw(batches(layout)), data.draw(batches(layout))
    )


@PROPERTY
@given(data=st.data())
def test_sum_merge_is_commutative_and_associative(data):
    layout = data.draw(layouts())
    a, b, c = (data.draw(batches(layout)) for _ in range(3))
    check_merge_order_does_not_matter(SCORERS, layout, a, b, c)


@PROPERTY
@given(data=st.data())
def test_merging_an_empty_collection_changes_nothing(data):
    layout = data.draw(layouts())
    check_empty_merge_is_identity(SCORERS, layout, data.draw(batches(layout)))


# ---------------------------------------------------------------------------------------------
# rank merges

SCORES = st.sampled_from(
    [
        st.sampled_from([0.0, 1.0, 2.0]),  # many ties
        st.floats(-1e3, 1e3, allow_nan=False),
    ]
)


@st.composite
def rank_files(draw, distinct=False):
    """1 to 3 score arrays of one model whose layers may have fewer experts than columns.
    ``distinct``: no two real experts of a file share a score."""
    layers, width = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    counts = draw(st.lists(st.integers(1, width), min_size=layers, max_size=layers))
    files = []
    for _ in range(draw(st.integers(1, 3))):
        if distinct:
            order = draw(st.permutations(range(layers * width)))
            files.append(np.array(order, dtype=np.float64).reshape(layers, width))
        else:
            elements = draw(SCORES)
            files.append(draw(hnp.arrays(np.float64, (layers, width), elements=elements)))
    return counts, files


def stats_of(scores, counts) -> Stats:
    metadata = {"fingerprint": fingerprint(len(counts), max(counts), 1), "tokens_seen": 5}
    metadata["fingerprint"]["experts_per_layer"] = list(counts)
    return Stats({"s": scores}, {}, np.full(len(counts), 5, dtype=np.int64), metadata)


def rank_merge(files, counts, mode) -> np.ndarray:
    return merge_stats([stats_of(f, counts) for f in files], {}, mode).scores["s"]


def real_experts(counts) -> list[tuple[int, int]]:
    return [(layer, e) for layer, count in enumerate(counts) for e in range(count)]


def padded(counts, width) -> np.ndarray:
    return np.arange(width)[None, :] >= np.array(counts)[:, None]


MODES = st.sampled_from(["rank", "global-rank"])


@PROPERTY
@given(case=rank_files(), mode=MODES)
def test_one_files_ranks_order_its_experts_ties_by_id(case, mode):
    """Ranks of one file: within each layer (``rank``) or the model (``global-rank``), the real
    experts sorted by (score, layer, id) get 0, 1, 2, ... ; padded columns are 0."""
    counts, (scores, *_) = case
    ranks = rank_merge([scores], counts, mode)
    assert (ranks[padded(counts, scores.shape[1])] == 0).all()
    groups = (
        [real_experts(counts)]
        if mode == "global-rank"
        else [[(layer, e) for e in range(count)] for layer, count in enumerate(counts)]
    )
    for group in groups:
        ordered = sorted(group, key=lambda pair: (scores[pair], pair))
        assert [ranks[pair] for pair in ordered] == list(range(len(ordered)))


@PROPERTY
@given(case=rank_files(), mode=MODES)
def test_rank_merge_adds_each_files_ranks_in_any_order(case, mode):
    counts, files = case
    merged = rank_merge(files, counts, mode)
    np.testing.assert_array_equal(merged, sum(rank_merge([f], counts, mode) for f in files))
    np.testing.assert_array_equal(merged, rank_merge(files[::-1], counts, mode))


@PROPERTY
@given(case=rank_files(), mode=MODES, data=st.data())
def test_rank_merge_sees_only_the_order_of_each_files_scores(case, mode, data):
    """A strictly increasing map of one file's scores (per layer for ``rank``, over the model
    for ``global-rank``), and any values in padded columns, change nothing."""
    counts, files = case
    merged = rank_merge(files, counts, mode)
    which = data.draw(st.integers(0, len(files) - 1))
    shape = files[0].shape
    steps = st.lists(st.integers(1, 5), min_size=files[0].size, max_size=files[0].size)
    mask = padded(counts, shape[1])
    changed = []
    for index, scores in enumerate(files):
        filler = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(-1e6, 1e6)))
        other = np.where(mask, filler, scores)
        if index == which:
            if mode == "rank":
                for layer, count in enumerate(counts):
                    other[layer, :count] = increasing_map(scores[layer, :count], data.draw(steps))
            else:
                other[~mask] = increasing_map(scores[~mask], data.draw(steps))
        changed.append(other)
    np.testing.assert_array_equal(rank_merge(changed, counts, mode), merged)


@PROPERTY
@given(case=rank_files(distinct=True), mode=MODES, data=st.data())
def test_renaming_experts_and_layers_renames_the_merged_ranks(case, mode, data):
    """Without ties, ranks follow the experts, not their ids or layer positions: the same
    renaming of every file renames the merge."""
    counts, files = case
    merged = rank_merge(files, counts, mode)
    layers, width = files[0].shape
    new_layer = data.draw(st.permutations(range(layers)))
    new_id = [data.draw(st.permutations(range(count))) for count in counts]
    new_counts = [0] * layers
    for layer, count in enumerate(counts):
        new_counts[new_layer[layer]] = count

    def rename(array):
        result = np.zeros_like(array)
        for layer, e in real_experts(counts):
            result[new_layer[layer], new_id[layer][e]] = array[layer, e]
        return result

    renamed = rank_merge([rename(f) for f in files], new_counts, mode)
    np.testing.assert_array_equal(renamed, rename(merged))
