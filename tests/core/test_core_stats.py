"""The stats file: save/load round trip, exact merges, refusals; needs only mlxfun-core."""

import json

import numpy as np
import pytest
from mlxfun.core import testing
from mlxfun.core.errors import MlxfunError
from mlxfun.core.stats import (
    FORMAT_VERSION,
    StatsCollector,
    check_fingerprint,
    load_stats,
    merge_stats,
    save_stats,
)

from .test_core_plugins import CountScorer


class MeanWeightScorer:
    name = "mean_weight"
    description = "mean gate weight over the expert's routed tokens"
    needs = frozenset({"selected", "weights"})

    def init(self, num_layers, num_experts):
        shape = (num_layers, num_experts)
        return {"sum": np.zeros(shape), "count": np.zeros(shape)}

    def update(self, acc, obs):
        np.add.at(acc["sum"][obs.layer], obs.selected.reshape(-1), obs.weights.reshape(-1))
        np.add.at(acc["count"][obs.layer], obs.selected.reshape(-1), 1.0)

    def finalize(self, acc):
        return np.divide(
            acc["sum"], acc["count"], out=np.zeros_like(acc["sum"]), where=acc["count"] > 0
        )


class MaxNormScorer:
    name = "max_norm"
    description = "largest output norm of the expert"
    needs = frozenset({"selected", "norms"})

    def init(self, num_layers, num_experts):
        return {"max": np.zeros((num_layers, num_experts))}

    def update(self, acc, obs):
        np.maximum.at(
            acc["max"][obs.layer],
            obs.selected.reshape(-1),
            obs.norms.reshape(-1).astype(np.float64),
        )

    def combine(self, a, b):
        return {"max": np.maximum(a["max"], b["max"])}

    def finalize(self, acc):
        return acc["max"].copy()


SCORERS = [CountScorer(), MeanWeightScorer(), MaxNormScorer()]
LAYERS, EXPERTS = 3, 6
FINGERPRINT = {
    "model_type": "test_moe",
    "config_hash": "abc",
    "moe_layers": [0, 1, 2],
    "experts_per_layer": [EXPERTS] * LAYERS,
    "top_k": [2] * LAYERS,
}


def observations(seed, tokens=10):
    return [
        testing.make_observation(layer, EXPERTS, tokens, 2, seed=seed * 10 + layer)
        for layer in range(LAYERS)
    ]


def collect(path, *batches, dataset="d.jsonl"):
    collector = StatsCollector(SCORERS, LAYERS, EXPERTS)
    for batch in batches:
        collector.update(batch)
    metadata = {
        "fingerprint": FINGERPRINT,
        "datasets": [dataset],
        "tokens_seen": int(collector.token_counts[0]),
    }
    save_stats(path, collector.scores(), collector.accumulators, collector.token_counts, metadata)
    return collector


@pytest.mark.parametrize("scorer", SCORERS, ids=lambda s: s.name)
def test_test_scorers_conform(scorer):
    testing.check_scorer(scorer, commands=False)


def test_save_and_load_round_trip(tmp_path):
    collector = collect(tmp_path / "s.npz", observations(1))
    stats = load_stats(tmp_path / "s.npz")
    assert set(stats.scores) == {"count", "mean_weight", "max_norm"}
    for name, scores in collector.scores().items():
        np.testing.assert_array_equal(stats.scores[name], scores)
        assert stats.scores[name].dtype == np.float64
        for key, value in collector.accumulators[name].items():
            np.testing.assert_array_equal(stats.accumulators[name][key], value)
    np.testing.assert_array_equal(stats.token_counts, [10, 10, 10])
    assert stats.metadata["format_version"] == FORMAT_VERSION
    assert stats.metadata["scorers"] == ["count", "max_norm", "mean_weight"]
    assert stats.fingerprint == FINGERPRINT
    with np.load(tmp_path / "s.npz", allow_pickle=False) as data:  # no pickles inside
        assert "metadata" in data.files


def test_sum_merge_equals_one_collect_over_both_datasets(tmp_path):
    a, b = observations(1), observations(2, tokens=7)
    collect(tmp_path / "a.npz", a, dataset="a.jsonl")
    collect(tmp_path / "b.npz", b, dataset="b.jsonl")
    both = collect(tmp_path / "both.npz", a, b)
    merged = merge_stats(
        [load_stats(tmp_path / "a.npz"), load_stats(tmp_path / "b.npz")],
        {s.name: s for s in SCORERS},
    )
    for name, scores in both.scores().items():
        np.testing.assert_allclose(merged.scores[name], scores, rtol=1e-12)
    np.testing.assert_array_equal(merged.token_counts, [17, 17, 17])
    assert merged.metadata["datasets"] == ["a.jsonl", "b.jsonl"]
    assert merged.metadata["tokens_seen"] == 17
    save_stats(
        tmp_path / "m.npz", merged.scores, merged.accumulators, merged.token_counts, merged.metadata
    )
    again = load_stats(tmp_path / "m.npz")
    np.testing.assert_array_equal(again.scores["mean_weight"], merged.scores["mean_weight"])


def test_rank_merge_sums_within_layer_ranks(tmp_path):
    collect(tmp_path / "a.npz", observations(1))
    collect(tmp_path / "b.npz", observations(2))
    files = [load_stats(tmp_path / "a.npz"), load_stats(tmp_path / "b.npz")]
    merged = merge_stats(files, {s.name: s for s in SCORERS}, mode="rank")
    ranks = merged.scores["count"]
    assert ranks.shape == (LAYERS, EXPERTS)
    # each file contributes a permutation of 0..E-1 per layer
    np.testing.assert_array_equal(ranks.sum(axis=1), [2 * EXPERTS * (EXPERTS - 1) / 2] * LAYERS)
    assert merged.accumulators == {}
    with pytest.raises(MlxfunError, match="use --mode rank"):
        merge_stats([merged, merged], {s.name: s for s in SCORERS})


def test_stats_of_another_model_are_refused(tmp_path):
    collect(tmp_path / "a.npz", observations(1))
    stats = load_stats(tmp_path / "a.npz")
    other = dict(FINGERPRINT, experts_per_layer=[4] * LAYERS)
    with pytest.raises(MlxfunError, match="collected on another model \\(experts_per_layer"):
        check_fingerprint(stats, other, tmp_path / "a.npz")
    stats_b = load_stats(tmp_path / "a.npz")
    stats_b.metadata["fingerprint"] = other
    with pytest.raises(MlxfunError, match="cannot merge stats of different models"):
        merge_stats([stats, stats_b], {s.name: s for s in SCORERS})


def test_bad_files_get_one_line_errors(tmp_path):
    with pytest.raises(MlxfunError, match="does not exist; create it with `mlxfun collect`"):
        load_stats(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(MlxfunError, match="is not an mlxfun stats file"):
        load_stats(tmp_path / "junk.npz")
    np.savez(
        tmp_path / "old.npz",
        metadata=np.array(json.dumps({"format_version": 0})),
        token_counts=np.zeros(1),
    )
    with pytest.raises(MlxfunError, match="has stats format 0"):
        load_stats(tmp_path / "old.npz")
    collect(tmp_path / "a.npz", observations(1))
    with pytest.raises(MlxfunError, match="has no 'reap' scores; it has: count, max_norm"):
        load_stats(tmp_path / "a.npz").score("reap")
