"""Expert analysis against independent numpy computations on a tiny model: identical experts
are similar 1 and group together, a neuron-permuted copy of an expert is found by its output
(not by its weights), every similarity equals its definition, and the clustering, entropies and
candidates follow their documented rules."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load as mlx_lm_load
from mlx_lm.utils import save_model
from mlxfun.cli.app import main
from mlxfun.methods import analysis
from mlxfun.methods.analysis import AnalyzeRequest, Thresholds, analyse

from .test_merge import QWEN, np_output, np_softmax, random_scores, recorded_statistics, stats_file
from .test_prune import CASES, grouped_args, write_dir

PERM = np.random.default_rng(3).permutation(QWEN["moe_intermediate_size"])


def np_cosine01(rows):
    rows = rows.reshape(rows.shape[0], -1)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    result = (unit @ unit.T + 1) / 2
    np.fill_diagonal(result, 1.0)
    return result


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    code, prose = root / "code.jsonl", root / "prose.jsonl"
    code.write_text(
        "".join(json.dumps({"text": f"def f{i}(x): return x * {i}"}) + "\n" for i in range(8))
    )
    prose.write_text(
        "".join(json.dumps({"text": f"the quick brown fox {i} jumps"}) + "\n" for i in range(8))
    )
    return [code, prose]


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Expert 3 is a copy of expert 1, expert 6 a copy of expert 2 with its intermediate
    neurons permuted; both copies have their original's router row."""
    root = tmp_path_factory.mktemp("twins")
    source, _ = write_dir(root / "model", "qwen3_moe", QWEN)
    model, _ = mlx_lm_load(str(source))
    perm = mx.array(PERM)
    for layer in model.model.layers:
        experts = layer.mlp.switch_mlp
        for proj in ("gate_proj", "up_proj", "down_proj"):
            module = getattr(experts, proj)
            w = np.array(module.weight)
            w[3] = w[1]
            w[6] = np.array(
                mx.array(w[2])[perm] if proj != "down_proj" else mx.array(w[2])[:, perm]
            )
            module.weight = mx.array(w)
        gate = np.array(layer.mlp.gate.weight)
        gate[3], gate[6] = gate[1], gate[2]
        layer.mlp.gate.weight = mx.array(gate)
    mx.eval(model.parameters())
    save_model(source, model)
    stats = stats_file(source, root / "stats.npz", random_scores(source))
    return source, stats


def run(source, stats, dataset, **options):
    return analyse(
        AnalyzeRequest(model=source, stats=stats, dataset=dataset, progress=False, **options)
    )


def test_copies_are_similar_one_and_group_and_permuted_copies_are_found_by_output(
    twins, calib, monkeypatch
):
    source, stats = twins
    calls = recorded_statistics(monkeypatch)
    result = run(source, stats, calib, thresholds=Thresholds(threshold=0.999))
    model, _ = mlx_lm_load(str(source))
    assert len(calls) == len(result.layers) == 3
    for layer, call in zip(result.layers, calls):
        sims = {k: np.array(v) for k, v in layer.similarity.items()}
        for name in ("weights", "router_weights", "output", "router_logits", "ream"):
            assert sims[name][1, 3] == pytest.approx(1.0, abs=1e-5), name
        for name in ("router_weights", "output", "router_logits", "ream"):
            assert sims[name][2, 6] == pytest.approx(1.0, abs=1e-5), name
        assert sims["weights"][2, 6] < 0.9  # the weights do not show the permuted copy
        assert [1, 3] in layer.findings["mergeable_groups"]
        assert [2, 6] in layer.findings["mergeable_groups"]
        pairs = {(a, b) for a, b, _ in layer.findings["merge_candidates"][:2]}
        assert pairs == {(1, 3), (2, 6)}

        # numpy: every similarity from its definition
        block = model.model.layers[layer.layer].mlp
        experts = {
            f"{p}.weight": np.array(getattr(block.switch_mlp, p).weight, dtype=np.float64)
            for p in ("down_proj", "gate_proj", "up_proj")
        }
        flat = np.concatenate([experts[n].reshape(8, -1) for n in sorted(experts)], axis=1)
        np.testing.assert_allclose(sims["weights"], np_cosine01(flat), atol=2e-6)
        gate = np.array(block.gate.weight, dtype=np.float64)
        np.testing.assert_allclose(sims["router_weights"], np_cosine01(gate), atol=2e-6)
        x = call["x"]
        logits = x @ gate.T
        probs = np_softmax(logits)
        means = np.stack(
            [
                np.mean(
                    probs[:, e : e + 1] * np_output({k: v[e] for k, v in experts.items()}, x), 0
                )
                for e in range(8)
            ]
        )
        output = np_cosine01(means)
        np.testing.assert_allclose(sims["output"], output, atol=1e-4)
        cols = logits.T / np.linalg.norm(logits.T, axis=1, keepdims=True)
        distance = np.linalg.norm(cols[:, None, :] - cols[None, :, :], axis=-1)
        np.testing.assert_allclose(sims["router_logits"], 1 - distance / 2, atol=1e-4)
        np.testing.assert_allclose(sims["ream"], (output + 1 - distance / 2) / 2, atol=1e-4)


def test_threshold_groups_are_complete_linkage():
    sim = np.array(
        [
            [1.0, 0.9, 0.7, 0.1, 0.1],
            [0.9, 1.0, 0.5, 0.1, 0.1],
            [0.7, 0.5, 1.0, 0.1, 0.1],
            [0.1, 0.1, 0.1, 1.0, 0.65],
            [0.1, 0.1, 0.1, 0.65, 1.0],
        ]
    )
    # 0-1 join first; 2 cannot join them (0.5 < 0.6 with expert 1); 3-4 join at 0.65
    assert analysis.threshold_groups(sim, 0.6) == [[0, 1], [3, 4]]
    assert analysis.threshold_groups(sim, 0.5) == [[0, 1, 2], [3, 4]]
    assert analysis.threshold_groups(sim, 0.95) == []
    rng = np.random.default_rng(0)
    a = rng.random((12, 12))
    sim = (a + a.T) / 2
    for threshold in (0.3, 0.5, 0.7):
        groups = analysis.threshold_groups(sim, threshold)
        seen = [e for g in groups for e in g]
        assert len(seen) == len(set(seen))
        for g in groups:  # complete linkage: every pair inside a group clears the threshold
            assert all(sim[a, b] >= threshold for a in g for b in g if a != b)


def test_entropy_candidates_and_target():
    classes = np.array([0, 0, 1, 1, 0, 1])
    selected = np.array([[0, 1], [0, 2], [1, 2], [1, 2], [0, 1], [1, 3]])
    counts = analysis.class_counts(selected, classes, 4, 2)
    np.testing.assert_array_equal(counts, [[3, 0], [2, 3], [1, 2], [0, 1]])
    rel = analysis.relative_entropy(counts, classes, 2)
    p = np.array([2 / 5, 3 / 5])
    np.testing.assert_allclose(
        rel, [0.0, -(p * np.log(p)).sum() / np.log(2), 0.9183, 0.0], atol=1e-4
    )

    sim = np.eye(4) + 0.3
    sim[0, 1] = sim[1, 0] = 0.8
    utilisation = np.array([1.0, 2.0, 0.2, 0.8])
    found = analysis.layer_findings(sim, utilisation, rel, 2, Thresholds(threshold=0.6))
    assert found["specialists"] == [0, 3]
    assert found["generalists"] == [1]
    assert found["prune_candidates"] == [2]  # below half the mean (1.0); not a specialist
    assert found["mergeable_groups"] == [[0, 1]]
    # removable: 2 (pruned) and 0 would merge into 1, but 0 is a specialist
    assert found["potential_reduction"] == 1
    assert found["recommended_target"] == max(2, 4 - 1, 2)


def test_token_classes():
    assert [analysis.token_class(t) for t in ("the", " 42", "  ", "):", "x1")] == [0, 1, 2, 3, 4]
    from mlxfun.core.datasets import Sample

    mixed = analysis.interleave(
        [
            Sample(text="a", source="x:1"),
            Sample(text="b", source="x:2"),
            Sample(text="c", source="y:1"),
        ]
    )
    assert [s.text for s in mixed] == ["a", "c", "b"]


def test_analyze_command_prints_tables_and_json(twins, calib, capsys):
    source, stats = twins
    data_args = [a for p in calib for a in ("--dataset", str(p))]
    code = main(["analyze", "--model", str(source), "--stats", str(stats), *data_args, "--json"])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)
    assert data["summary"]["experts"] == 3 * 8
    parts = {row["part"] for row in data["sizes"]}
    assert {"experts", "attention/mixer", "embeddings", "total"} <= parts
    assert main(["analyze", "--model", str(source), "--stats", str(stats), *data_args]) == 0
    text = capsys.readouterr().out
    assert "mergeable groups" in text and "recommended" in text


def test_analyze_without_dataset_uses_weights(twins, capsys):
    source, stats = twins
    result = run(source, stats, [], thresholds=Thresholds(similarity="router_weights"))
    assert [1, 3] in result.layers[0].findings["mergeable_groups"]
    assert result.layers[0].relative_entropy is None
    code = main(["analyze", "--model", str(source), "--stats", str(stats)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--dataset" in err


def test_a_domain_report_names_the_specialists(twins, tmp_path, capsys):
    from mlxfun.methods.scan_report import model_dir_fingerprint

    source, stats = twins
    report = {
        "format": 1,
        "scan": "domain-scan",
        "fingerprint": model_dir_fingerprint(source),
        "groups": {"domain_prompt": {"part": "prompt", "experts": {"0": [4, 5], "2": [7]}}},
    }
    path = tmp_path / "code.json"
    path.write_text(json.dumps(report))
    result = run(
        source, stats, [], thresholds=Thresholds(similarity="weights"), domain_reports=[str(path)]
    )
    assert [x.findings["specialists"] for x in result.layers] == [[4, 5], [], [7]]
    assert result.settings["specialists_from"] == "domain report"
    report["fingerprint"] = dict(report["fingerprint"], config_hash="0")
    path.write_text(json.dumps(report))
    code = main(
        ["analyze", "--model", str(source), "--stats", str(stats), "--similarity", "weights",
         "--domain-report", str(path)]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "another model" in err


@pytest.mark.parametrize("case, model_type, args", CASES, ids=[c[0] for c in CASES])
def test_every_architecture_is_analysed_with_its_size_breakdown(tmp_path, case, model_type, args):
    """Without calibration text (weights and router similarities, utilisation, sizes)."""
    from mlxfun.core import slicing

    args, _ = grouped_args(model_type, args)
    source, _ = write_dir(tmp_path / case, model_type, args)
    stats = stats_file(source, tmp_path / "stats.npz", random_scores(source))
    result = run(source, stats, [], thresholds=Thresholds(similarity="weights"))
    headers = slicing.read_headers(source)
    stored = sum(slicing.tensor_bytes(i) for infos in headers.values() for i in infos.values())
    assert result.bytes_total == stored
    total = result.sizes[-1]
    assert total["part"] == "total" and total["bytes"] == stored
    assert total["parameters"] == sum(r["parameters"] for r in result.sizes[:-1])
    assert 0 < result.bytes_experts < stored
    for layer in result.layers:
        sim = np.array(layer.similarity["weights"])
        np.testing.assert_allclose(np.diag(sim), 1.0)
        assert layer.findings["recommended_target"] >= layer.min_keep >= layer.top_k
