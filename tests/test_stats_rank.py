"""Rank merges against a brute-force numpy ranking: ``--mode rank`` (within-layer ranks) and
``--mode global-rank`` (model-wide ranks, comparable across layers), with padded columns
(experts a non-uniform layer does not have) outside every ranking."""

import numpy as np
import pytest
from mlxfun.cli.app import main
from mlxfun.core.errors import MlxfunError
from mlxfun.core.stats import (
    Stats,
    load_stats,
    merge_stats,
    model_wide_ranks,
    save_stats,
    within_layer_ranks,
)
from mlxfun.methods.selectors import ModelWideSelector

COUNTS = [6, 8, 5, 8]  # experts per layer; the arrays have 8 columns
WIDTH = max(COUNTS)


def brute_within(scores, counts):
    ranks = np.zeros(scores.shape)
    for layer, count in enumerate(counts):
        pairs = sorted((scores[layer, e], e) for e in range(count))
        for rank, (_, e) in enumerate(pairs):
            ranks[layer, e] = rank
    return ranks


def brute_global(scores, counts):
    ranks = np.zeros(scores.shape)
    pairs = sorted((scores[p, e], p, e) for p, c in enumerate(counts) for e in range(c))
    for rank, (_, p, e) in enumerate(pairs):
        ranks[p, e] = rank
    return ranks


def random_scores(seed, ties=False):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, (len(COUNTS), WIDTH)) if ties else rng.random((len(COUNTS), WIDTH))
    scores = scores.astype(np.float64)
    for layer, count in enumerate(COUNTS):
        scores[layer, count:] = -1.0 if seed % 2 else 99.0  # padding below or above every expert
    return scores


def stats_of(scores):
    fingerprint = {
        "model_type": "qwen3_moe",
        "config_hash": "abc",
        "moe_layers": [0, 1, 2, 3],
        "experts_per_layer": COUNTS,
        "top_k": [2] * len(COUNTS),
    }
    metadata = {"fingerprint": fingerprint, "moe_layers": [0, 1, 2, 3], "tokens_seen": 10}
    return Stats({"reap": scores}, {}, np.full(len(COUNTS), 10, dtype=np.int64), metadata)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("ties", [False, True])
def test_ranks_skip_padded_columns_and_match_brute_force(seed, ties):
    scores = random_scores(seed, ties)
    np.testing.assert_array_equal(within_layer_ranks(scores, COUNTS), brute_within(scores, COUNTS))
    np.testing.assert_array_equal(model_wide_ranks(scores, COUNTS), brute_global(scores, COUNTS))
    glob = model_wide_ranks(scores, COUNTS)
    real = glob[np.arange(WIDTH)[None, :] < np.array(COUNTS)[:, None]]
    assert sorted(real.tolist()) == list(range(sum(COUNTS)))  # every real expert, once


@pytest.mark.parametrize("mode", ["rank", "global-rank"])
def test_cli_rank_merges_match_brute_force(mode, tmp_path):
    files = []
    for seed in range(3):
        path = tmp_path / f"{seed}.npz"
        data = stats_of(random_scores(seed, ties=seed == 2))
        save_stats(path, data.scores, {}, data.token_counts, data.metadata)
        files.append(path)
    out = tmp_path / "merged.npz"
    assert main(["stats", "merge", *map(str, files), "-o", str(out), "--mode", mode]) == 0
    merged = load_stats(out)
    brute = brute_within if mode == "rank" else brute_global
    expected = sum(brute(random_scores(s, ties=s == 2), COUNTS) for s in range(3))
    np.testing.assert_array_equal(merged.scores["reap"], expected)
    assert merged.metadata["merge_mode"] == mode


def test_global_rank_feeds_model_wide_selection():
    files = [stats_of(random_scores(s)) for s in range(3)]
    merged = merge_stats(files, {}, mode="global-rank").scores["reap"]
    n = 7
    selection = ModelWideSelector().select(merged, n=n, top_k=2, num_experts=COUNTS)
    # brute force: the n lowest summed model-wide ranks over real experts, ties by (layer, id)
    pairs = sorted((merged[p, e], p, e) for p, c in enumerate(COUNTS) for e in range(c))
    expected = {}
    for _, p, e in pairs[:n]:
        expected.setdefault(p, []).append(e)
    assert {p: sorted(r) for p, r in selection.removed.items() if r} == {
        p: sorted(r) for p, r in expected.items()
    }


def test_unknown_mode_is_one_line(tmp_path, capsys):
    data = stats_of(random_scores(0))
    save_stats(tmp_path / "a.npz", data.scores, {}, data.token_counts, data.metadata)
    a = str(tmp_path / "a.npz")
    assert main(["stats", "merge", a, a, "-o", str(tmp_path / "m.npz"), "--mode", "x"]) == 1
    assert "use sum, rank, global-rank" in capsys.readouterr().err
    with pytest.raises(MlxfunError, match="use sum, rank, global-rank"):
        merge_stats([data, data], {}, mode="x")
