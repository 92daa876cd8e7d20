"""Compression plans: the greedy choice and size targets against their documented rules; a
plan applied equals ``prune`` or ``merge`` run with the same keep map and groups, byte for
byte (a plan that mixes merges and prunes included); the mapping; bad plans and targets fail
with one line."""

import json

import numpy as np
import pytest
from mlxfun.cli.app import main
from mlxfun.methods import plans
from mlxfun.methods.analysis import AnalyzeRequest, Thresholds, analyse
from mlxfun.methods.plan_apply import ApplyRequest, apply_plan
from mlxfun.methods.prune import PruneRequest, prune
from mlxfun.methods.ream import MergeRequest, merge

from .adapters import test_biased_family as biased
from .test_merge import QWEN, digest, random_scores, stats_file
from .test_prune import grouped_args, write_dir


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.jsonl"
    lines = [f"sample {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(16)]
    path.write_text("\n".join(json.dumps({"text": t}) for t in lines) + "\n")
    return path


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, calib):
    root = tmp_path_factory.mktemp("qwen")
    source, _ = write_dir(root / "model", "qwen3_moe", QWEN)
    stats = stats_file(source, root / "stats.npz", random_scores(source))
    result = analyse(AnalyzeRequest(model=source, stats=stats, dataset=[calib], progress=False))
    path = root / "analysis.json"
    path.write_text(json.dumps(result.as_dict()))
    return source, stats, result, path


def with_layers(plan, keep: dict, groups: dict):
    """``plan`` with each layer's kept experts and merges replaced (the rest pruned)."""
    for layer in plan.layers:
        kept = keep[str(layer.layer)]
        merges = groups.get(str(layer.layer), {})
        layer.kept_experts = kept
        layer.target_num_experts = len(kept)
        layer.merges = [
            plans.ExpertMerge(source_experts=m, target_expert=int(c), similarity=0.0)
            for c, m in merges.items()
            if m
        ]
        merged = {e for m in layer.merges for e in m.source_experts}
        layer.pruned_experts = [
            e for e in range(layer.original_num_experts) if e not in kept and e not in merged
        ]
    return plan


def test_choose_removals_follows_the_documented_rule():
    sim = np.full((5, 5), 0.2)
    np.fill_diagonal(sim, 1.0)
    sim[0, 1] = sim[1, 0] = 0.9
    util = np.array([1.0, 3.0, 0.5, 1.0, 2.0])  # mean 1.5
    # costs: 0 -> 1/1.5 * 2 * (1 - 0.9) (merges into 1), 2 -> 0.5/1.5, 3 -> 1/1.5, 4 -> 2/1.5
    assert plans.choose_removals(sim, util, 1, 0.6) == [0]
    # once 0 is gone, 1 has no partner: 2 is next, then 3
    assert plans.choose_removals(sim, util, 3, 0.6) == [0, 2, 3]
    # protected experts go last (and still absorb others: 1 -> 3/1.5 * 0.2 merging into 0)
    assert plans.choose_removals(sim, util, 2, 0.6, protected=[0]) == [2, 1]
    assert plans.choose_removals(sim, util, 5, 0.6, protected=[0])[-1] == 0
    merges, pruned = plans.assign(sim, [0, 2, 3], [1, 4], 0.6)
    assert merges == {1: [0]} and pruned == [2, 3]
    expected = (0.5 + 1.0 + 1.0 * 2 * (1 - 0.9)) / 7.5
    assert plans.impact(sim, util, merges, pruned) == pytest.approx(expected)
    # router groups: equal removals per group, similarity only within a group
    sim4 = np.full((4, 4), 0.1)
    np.fill_diagonal(sim4, 1.0)
    sim4[0, 2] = sim4[2, 0] = 0.99
    got = plans.choose_removals(sim4, np.array([1.0, 0.5, 1.0, 2.0]), 2, 0.6, groups=2)
    assert sorted(got) == [1, 2] and plans.assign(sim4, [1, 2], [0, 3], 0.6, 2) == ({}, [1, 2])


def test_parse_size():
    assert plans.parse_size("12GB") == 12 * 10**9
    assert plans.parse_size("1.5GiB") == int(1.5 * 2**30)
    assert plans.parse_size("750 mb") == 750 * 10**6
    assert plans.parse_size("1000") == 1000


def test_strategies_and_size_target(qwen):
    _, _, result, _ = qwen
    sizes = {}
    for strategy in plans.STRATEGIES:
        plan = plans.make_plan(result, plans.PlanRequest(strategy=strategy))
        sizes[strategy] = plan.bytes_after
        for layer in plan.layers:
            assert layer.target_num_experts >= 2  # top-k
            assert sorted(layer.kept_experts + layer.removed) == list(range(8))
    assert sizes["conservative"] >= sizes["balanced"] >= sizes["aggressive"]
    experts = plans.make_plan(result, plans.PlanRequest(target_experts=5))
    assert all(len(x.kept_experts) == 5 for x in experts.layers)
    target = (result.bytes_total + sizes["aggressive"]) // 2
    plan = plans.make_plan(result, plans.PlanRequest(target_size=target))
    assert plan.bytes_after <= target
    assert target - plan.bytes_after <= 0.01 * target or plan.notes
    unreachable = plans.make_plan(result, plans.PlanRequest(target_size=sizes["aggressive"] - 1))
    assert "not reached" in unreachable.notes[0]


def test_a_pruning_plan_is_prune_byte_for_byte(qwen, tmp_path):
    source, stats, result, _ = qwen
    plan = plans.make_plan(result, plans.PlanRequest(target_experts=6))
    for layer in plan.layers:  # prune only
        layer.pruned_experts, layer.merges = layer.removed, []
    summary = apply_plan(
        ApplyRequest(model=source, plan=plan, output=tmp_path / "applied", progress=False)
    )
    target = {x.layer: x.removed for x in plan.layers}
    prune(PruneRequest(model=source, stats=stats, output=tmp_path / "pruned", n=2, target=target))
    assert digest(tmp_path / "applied") == digest(tmp_path / "pruned")
    assert summary["bytes_after"] == plan.bytes_after  # the estimate is the written size
    size = plan.size_estimate()
    per_expert = plan.layers[0].expert_params
    assert size["params_removed"] == 2 * len(plan.layers) * per_expert
    assert size["compressed_params"] == size["original_params"] - size["params_removed"]
    provenance = json.loads((tmp_path / "applied" / "mlxfun.json").read_text())
    assert provenance["plan"]["strategy"] == "target-experts 6"


@pytest.mark.parametrize("n, group_size", [(2, 0), (5, 2)], ids=["merge", "merge+prune"])
def test_a_merging_plan_is_merge_byte_for_byte(qwen, calib, tmp_path, n, group_size):
    """REAM's own groups, written into a plan: applying it gives merge's bytes. With n=5 and
    groups of 2 the three centroids absorb one expert each and two are dropped: merges and
    prunes in one pass."""
    source, stats, result, _ = qwen
    summary = merge(
        MergeRequest(
            model=source,
            stats=stats,
            dataset=[calib],
            output=tmp_path / "merged",
            n=n,
            group_size=group_size,
            progress=False,
        )
    )
    plan = plans.make_plan(result, plans.PlanRequest(target_experts=8 - n))
    keep = {k: sorted(int(c) for c in g) for k, g in summary["groups"].items()}
    plan = with_layers(plan, keep, summary["groups"])
    if group_size == 2:
        assert all(len(x.pruned_experts) == 2 and x.merges for x in plan.layers)
    apply_plan(ApplyRequest(model=source, plan=plan, output=tmp_path / "applied", progress=False))
    assert digest(tmp_path / "applied") == digest(tmp_path / "merged")
    provenance = json.loads((tmp_path / "applied" / "mlxfun.json").read_text())
    assert provenance["ream"]["explicit_groups"] is True


def test_cli_plan_apply_and_mapping(qwen, calib, tmp_path, capsys):
    source, _, result, analysis = qwen
    plan_path = tmp_path / "plan.json"
    code = main(
        ["plan", "--analysis", str(analysis), "--strategy", "balanced", "-o", str(plan_path)]
    )
    assert code == 0 and "balanced" in capsys.readouterr().out
    plan = plans.load_plan(plan_path)
    mapping_path = tmp_path / "map.json"
    code = main(
        ["apply", "--model", str(source), "--plan", str(plan_path), "-o", str(mapping_path),
         "--mapping-only"]
    )  # fmt: skip
    assert code == 0
    written = json.loads(mapping_path.read_text())["layers"]
    for layer in plan.layers:
        got = written[str(layer.layer)]
        mapping = {int(k): v for k, v in got["expert_mapping"].items()}
        for e in layer.pruned_experts:
            assert mapping[e] == -1
        for i, e in enumerate(layer.kept_experts):
            assert mapping[e] == i and got["merged_from"][str(i)][0] == e
        for m in layer.merges:
            assert all(mapping[s] == mapping[m.target_expert] for s in m.source_experts)
    out = tmp_path / "model"
    code = main(["apply", "--model", str(source), "--plan", str(plan_path), "-o", str(out)])
    assert code == 0 and (out / "mlxfun.json").is_file()
    capsys.readouterr()
    code = main(
        ["plan", "--model", str(source), "--stats", str(result.stats), "--similarity", "weights",
         "--target-experts", "6", "--json"]
    )  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["experts_after"] == 6 * 3 and data["similarity"] == "weights"
    assert data["size_estimate"]["bytes_after"] == data["bytes_after"]


def test_bad_plans_and_targets_are_one_line(qwen, tmp_path, capsys):
    source, stats, result, analysis = qwen

    def fails(args, message):
        assert main(args) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err

    plan = plans.make_plan(result, plans.PlanRequest(target_experts=6))
    path = tmp_path / "plan.json"
    plan.save(path)
    other, _ = write_dir(tmp_path / "other", "qwen3_moe", dict(QWEN, num_hidden_layers=2))
    out = str(tmp_path / "out")
    fails(["apply", "--model", str(other), "--plan", str(path), "-o", out], "another model")
    broken = plan.as_dict()
    layer = broken["layers"][0]
    layer["pruned_experts"] += layer["kept_experts"][1:]
    layer["kept_experts"] = layer["kept_experts"][:1]
    path.write_text(json.dumps(broken))
    fails(["apply", "--model", str(source), "--plan", str(path), "-o", out], "top-k 2")
    fails(
        ["plan", "--analysis", str(analysis), "--target-size", "1KB"],
        "below the model's non-expert",
    )
    fails(["plan", "--analysis", str(analysis), "--target-experts", "1"], "top-k 2")
    fails(["plan", "--analysis", str(analysis)], "pass one of")
    path.write_text("[]")
    fails(["apply", "--model", str(source), "--plan", str(path), "-o", out], "not an mlxfun plan")


def test_plans_that_break_router_groups_are_refused(tmp_path, capsys):
    args, groups = grouped_args("glm4_moe", biased.GLM4_MOE)
    assert groups > 1
    source, _ = write_dir(tmp_path / "glm", "glm4_moe", args)
    stats = stats_file(source, tmp_path / "glm.npz", random_scores(source))
    result = analyse(
        AnalyzeRequest(
            model=source,
            stats=stats,
            thresholds=Thresholds(similarity="router_weights"),
            progress=False,
        )
    )
    plan = plans.make_plan(result, plans.PlanRequest(target_experts=16 - groups))
    for layer in plan.layers:  # one removal from every group
        size = 16 // groups
        assert sorted(e // size for e in layer.removed) == list(range(groups))
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "map.json"
    assert main(["apply", "--model", str(source), "--plan", str(tmp_path / "plan.json"),
                 "-o", str(out), "--mapping-only"]) == 0  # fmt: skip
    data = plan.as_dict()
    layer = data["layers"][0]
    moved = layer["kept_experts"].pop(0)  # now group 0 loses two experts
    layer["pruned_experts"].append(moved)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["apply", "--model", str(source), "--plan", str(tmp_path / "bad.json"),
                 "-o", str(out), "--mapping-only", "--force"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "router groups" in err
