"""REAM merging: the alignment, grouping and averaging against independent numpy computations,
and end to end: a group of only its centroid is the prune result byte for byte, experts merged
with copies of themselves come back unchanged, later layers see the merged earlier ones, and
the outputs load and generate with stock mlx-lm (softmax, sigmoid + correction bias + shared
experts, 4-bit, non-uniform)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load as mlx_lm_load
from mlx_lm.utils import save_model
from mlxfun.cli.app import main
from mlxfun.core import plugins, slicing
from mlxfun.core.config import read_config
from mlxfun.core.stats import model_fingerprint, save_stats
from mlxfun.methods import ream
from mlxfun.methods.prune import PruneRequest, prune
from mlxfun.methods.ream import MergeRequest, merge

from .adapters import test_biased_family as biased
from .adapters import test_examples as examples
from .adapters import test_softmax_family as softmax_family
from .adapters import test_special_family as special
from .adapters.harness import build_tiny, capture_block_inputs
from .test_prune import grouped_args, write_dir

QWEN = dict(examples.QWEN3_MOE, num_hidden_layers=3)


def silu(z):
    return z / (1 + np.exp(-z))


def glu_expert(rng, hidden=6, neurons=8, bias=False):
    expert = {
        "gate_proj.weight": rng.normal(size=(neurons, hidden)),
        "up_proj.weight": rng.normal(size=(neurons, hidden)),
        "down_proj.weight": rng.normal(size=(hidden, neurons)),
    }
    if bias:
        expert.update(
            {
                "gate_proj.bias": rng.normal(size=neurons),
                "up_proj.bias": rng.normal(size=neurons),
                "down_proj.bias": rng.normal(size=hidden),
            }
        )
    return expert


def np_hidden(expert, x):
    gate = x @ expert["gate_proj.weight"].T + expert.get("gate_proj.bias", 0)
    up = x @ expert["up_proj.weight"].T + expert.get("up_proj.bias", 0)
    return silu(gate) * up


def np_output(expert, x):
    return np_hidden(expert, x) @ expert["down_proj.weight"].T + expert.get("down_proj.bias", 0)


def np_permuted(expert, perm):
    """Neuron i of the result is neuron perm[i] of ``expert`` (written without ream's table)."""
    out = dict(expert)
    for name in ("gate_proj.weight", "up_proj.weight"):
        out[name] = expert[name][perm, :]
    for name in ("gate_proj.bias", "up_proj.bias"):
        if name in expert:
            out[name] = expert[name][perm]
    out["down_proj.weight"] = expert["down_proj.weight"][:, perm]
    return out


# ---------------------------------------------------------------------------------------------
# The pieces


@pytest.mark.parametrize("bias", [False, True])
def test_alignment_recovers_a_permutation_and_permuting_keeps_the_function(bias):
    rng = np.random.default_rng(0)
    a = glu_expert(rng, bias=bias)
    perm = rng.permutation(8)
    b = ream.permute_expert(a, perm)
    for name in a:
        np.testing.assert_array_equal(b[name], np_permuted(a, perm)[name])
    x = rng.normal(size=(32, 6))
    np.testing.assert_allclose(np_output(b, x), np_output(a, x), rtol=1e-12, atol=1e-12)
    assert not np.allclose(np_hidden(b, x), np_hidden(a, x))
    cost = ream.alignment_cost(
        np_hidden(a, x).T, np_hidden(b, x).T, ream.neuron_features(a), ream.neuron_features(b)
    )
    found = ream.align(cost)
    np.testing.assert_array_equal(found, np.argsort(perm))
    back = ream.permute_expert(b, found)
    for name in a:
        np.testing.assert_array_equal(back[name], a[name])


def test_merging_identical_experts_gives_the_expert_back():
    rng = np.random.default_rng(1)
    a = glu_expert(rng, bias=True)
    x = rng.normal(size=(16, 6))
    profile = np_hidden(a, x).T
    for saliency in ([0.7, 0.2, 0.1], [3.0, 0.0, 5.0], [0.0, 0.0, 0.0]):
        merged, perms = ream.merge_group(a, [a, a], saliency, [profile] * 3)
        for perm in perms:
            np.testing.assert_array_equal(perm, np.arange(8))
        for name in a:
            np.testing.assert_allclose(merged[name], a[name], rtol=1e-13, atol=1e-13)


def test_merged_weights_are_the_saliency_weighted_average_of_aligned_weights():
    rng = np.random.default_rng(2)
    a = glu_expert(rng)
    perms = [rng.permutation(8) for _ in range(2)]
    noisy = [{k: v + rng.normal(0, 0.05, v.shape) for k, v in a.items()} for _ in range(2)]
    members = [np_permuted(n, p) for n, p in zip(noisy, perms)]
    x = rng.normal(size=(64, 6))
    profiles = [np_hidden(e, x).T for e in (a, *members)]
    saliency = [0.5, 0.3, 0.2]
    merged, found = ream.merge_group(a, members, saliency, profiles)
    for f, p in zip(found, perms):
        np.testing.assert_array_equal(f, np.argsort(p))
    for name in a:
        expected = (0.5 * a[name] + 0.3 * noisy[0][name] + 0.2 * noisy[1][name]) / 1.0
        np.testing.assert_allclose(merged[name], expected, rtol=1e-12, atol=1e-12)


def test_similarity_matches_its_definition():
    rng = np.random.default_rng(3)
    means, logits = rng.normal(size=(4, 5)), rng.normal(size=(10, 4))
    got = ream.expert_similarity(means, logits)
    for i in range(4):
        for j in range(4):
            cos = means[i] @ means[j] / np.linalg.norm(means[i]) / np.linalg.norm(means[j])
            u = logits[:, i] / np.linalg.norm(logits[:, i])
            v = logits[:, j] / np.linalg.norm(logits[:, j])
            expected = ((cos + 1) / 2 + 1 - np.linalg.norm(u - v) / 2) / 2
            assert got[i, j] == pytest.approx(expected, abs=1e-12)


def test_grouping_follows_the_documented_rule():
    # 7 experts, centroids 1 (saliency 0.9) and 4 (saliency 0.5); 1 picks first
    similarity = np.array(
        [
            [1.0, 0.2, 0.1, 0.3, 0.8, 0.0, 0.0],
            [0.9, 1.0, 0.7, 0.6, 0.1, 0.5, 0.2],
            [0.1, 0.7, 1.0, 0.0, 0.95, 0.0, 0.0],
            [0.3, 0.6, 0.0, 1.0, 0.4, 0.0, 0.0],
            [0.8, 0.1, 0.95, 0.4, 1.0, 0.3, 0.6],
            [0.0, 0.5, 0.0, 0.0, 0.3, 1.0, 0.0],
            [0.0, 0.2, 0.0, 0.0, 0.6, 0.0, 1.0],
        ]
    )
    saliency = np.array([0.1, 0.9, 0.2, 0.3, 0.5, 0.05, 0.01])
    group = ream.group_experts
    # C=16: the most salient centroid takes every other expert
    assert group(similarity, saliency, [1, 4], 16) == {1: [0, 2, 3, 5, 6], 4: []}
    # C=3: 1 takes its two nearest (0: 0.9, 2: 0.7), then 4 takes 6 (0.6) and 3 (0.4); 5 dropped
    assert group(similarity, saliency, [1, 4], 3) == {1: [0, 2], 4: [3, 6]}
    # C=1: only the centroids, everything else dropped (= prune)
    assert group(similarity, saliency, [1, 4], 1) == {1: [], 4: []}
    # C=0: each non-centroid joins its most similar centroid
    assert group(similarity, saliency, [1, 4], 0) == {1: [0, 3, 5], 4: [2, 6]}
    # ties between centroids go to the more salient one
    tied = similarity.copy()
    tied[[1, 4], 3] = 0.6
    assert group(tied, saliency, [1, 4], 0)[1] == [0, 3, 5]
    assert group(tied, saliency[[0, 4, 2, 3, 1, 5, 6]], [1, 4], 0)[4] == [2, 3, 6]


def test_merge_layer_leaves_groups_of_one_alone():
    rng = np.random.default_rng(4)
    weights = {
        k: mx.array(np.stack([glu_expert(rng)[k] for _ in range(3)]).astype(np.float32))
        for k in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
    }
    from mlx_lm.models.switch_layers import SwiGLU

    x = mx.array(rng.normal(size=(8, 6)).astype(np.float32))
    merged, perms = ream.merge_layer("glu", SwiGLU(), weights, {0: [], 2: []}, [1, 1, 1], x)
    assert merged == {} and perms == {}
    merged, _ = ream.merge_layer("glu", SwiGLU(), weights, {0: [], 2: [1]}, [1, 1, 3], x)
    assert list(merged) == [2]


def test_scipy_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(ream.MlxfunError, match=r"pip install 'mlxfun-methods\[merge\]'"):
        ream.align(np.eye(3))


# ---------------------------------------------------------------------------------------------
# End to end


def digest(directory, skip=("mlxfun.json",)):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(directory).iterdir())
        if p.is_file() and p.name not in skip
    }


def stats_file(model_dir, path, scores):
    config = read_config(model_dir)
    adapter = plugins.adapter_for_config(config)
    skeleton, _ = slicing.model_skeleton(model_dir)
    plans = slicing.layer_plans(skeleton, adapter)
    metadata = {
        "fingerprint": model_fingerprint(config, plans),
        "moe_layers": [p.index for p in plans],
    }
    save_stats(path, {"reap": scores}, {}, np.zeros(len(plans), dtype=np.int64), metadata)
    return path


def random_scores(model_dir, seed=0):
    skeleton, _ = slicing.model_skeleton(model_dir)
    adapter = plugins.adapter_for_config(read_config(model_dir))
    plans = slicing.layer_plans(skeleton, adapter)
    return np.random.default_rng(seed).random((len(plans), plans[0].num_experts)) + 0.1


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.jsonl"
    lines = [f"sample {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(16)]
    path.write_text("\n".join(json.dumps({"text": t}) for t in lines) + "\n")
    return path


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    out = {}
    for bits in (None, 4):
        source, _ = write_dir(root / f"model{bits}", "qwen3_moe", QWEN, bits=bits)
        scores = random_scores(source)
        out[bits] = (source, stats_file(source, root / f"stats{bits}.npz", scores), scores)
    return out


def run_merge(source, stats, calib, output, **options):
    request = MergeRequest(
        model=source, stats=stats, dataset=[calib], output=output, progress=False, **options
    )
    return merge(request)


@pytest.mark.parametrize("bits", [None, 4], ids=["f32", "4bit"])
def test_group_size_one_is_the_prune_result_byte_for_byte(qwen, calib, tmp_path, bits):
    source, stats, _ = qwen[bits]
    summary = run_merge(source, stats, calib, tmp_path / "merged", n=2, group_size=1)
    prune(PruneRequest(model=source, stats=stats, output=tmp_path / "pruned", n=2))
    assert digest(tmp_path / "merged") == digest(tmp_path / "pruned")
    assert all(not m for groups in summary["groups"].values() for m in groups.values())
    provenance = json.loads((tmp_path / "merged" / "mlxfun.json").read_text())
    assert provenance["method"] == "ream" and provenance["ream"]["group_size"] == 1


def test_members_with_zero_saliency_leave_the_prune_bytes(qwen, calib, tmp_path):
    """Members do join (C=16) and their rows are rewritten, with weight 0: same bytes as prune."""
    source, _, scores = qwen[None]
    scores = scores.copy()
    scores[:, [2, 5]] = 0.0
    stats = stats_file(source, tmp_path / "stats.npz", scores)
    summary = run_merge(source, stats, calib, tmp_path / "merged", n=2)
    assert all(
        sorted(m for members in groups.values() for m in members) == [2, 5]
        for groups in summary["groups"].values()
    )
    prune(PruneRequest(model=source, stats=stats, output=tmp_path / "pruned", n=2))
    assert digest(tmp_path / "merged") == digest(tmp_path / "pruned")


def test_copies_merge_back_into_their_expert_and_merging_changes_weights(tmp_path, calib):
    """Experts 2 and 6 are copies of expert 5, the most salient: merged away, the model equals
    the pruned one; a merge of distinct experts changes the centroid."""
    source, _ = write_dir(tmp_path / "model", "qwen3_moe", QWEN)
    model, _ = mlx_lm_load(str(source))
    for layer in model.model.layers:
        experts = layer.mlp.switch_mlp
        for proj in ("gate_proj", "up_proj", "down_proj"):
            module = getattr(experts, proj)
            w = module.weight
            module.weight = mx.concatenate([w[:2], w[5:6], w[3:5], w[5:6], w[5:6], w[7:]])
    mx.eval(model.parameters())
    save_model(source, model)
    scores = np.tile([0.5, 0.4, 0.01, 0.3, 0.35, 0.9, 0.02, 0.45], (3, 1))
    stats = stats_file(source, tmp_path / "stats.npz", scores)
    summary = run_merge(source, stats, calib, tmp_path / "merged", n=2)
    assert all(groups["5"] == [2, 6] for groups in summary["groups"].values())
    prune(PruneRequest(model=source, stats=stats, output=tmp_path / "pruned", n=2))
    merged, _ = mlx_lm_load(str(tmp_path / "merged"))
    pruned, _ = mlx_lm_load(str(tmp_path / "pruned"))
    for (name, a), (_, b) in zip(
        tree_flatten(merged.parameters()), tree_flatten(pruned.parameters())
    ):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6, atol=1e-7, err_msg=name)
    # with distinct experts the centroid that absorbs others changes
    scores2 = np.tile([0.5, 0.4, 0.01, 0.03, 0.35, 0.9, 0.2, 0.45], (3, 1))
    stats2 = stats_file(source, tmp_path / "stats2.npz", scores2)
    summary2 = run_merge(source, stats2, calib, tmp_path / "merged2", n=2)
    assert summary2["groups"]["0"]["5"] == [2, 3]
    merged2, _ = mlx_lm_load(str(tmp_path / "merged2"))
    a = np.array(merged2.model.layers[0].mlp.switch_mlp.gate_proj.weight[3])  # expert 5
    b = np.array(model.model.layers[0].mlp.switch_mlp.gate_proj.weight[5])
    assert not np.allclose(a, b, atol=1e-3)


def test_later_layers_see_the_merged_earlier_ones(qwen, calib, tmp_path, monkeypatch):
    source, stats, _ = qwen[None]
    seen = []
    real = ream.BlockInputs.__call__

    def recording(self, layer):
        x = real(self, layer)
        seen.append((np.array(x), self.sequences))
        return x

    monkeypatch.setattr(ream.BlockInputs, "__call__", recording)
    run_merge(source, stats, calib, tmp_path / "merged", n=2, group_size=0)
    prune(PruneRequest(model=source, stats=stats, output=tmp_path / "pruned", n=2))
    monkeypatch.setattr(ream.BlockInputs, "__call__", real)
    real = ream.layer_inputs  # the whole model up to the block
    sequences = seen[2][1]
    merged, _ = mlx_lm_load(str(tmp_path / "merged"))
    pruned, _ = mlx_lm_load(str(tmp_path / "pruned"))
    block = merged.model.layers[2].mlp
    from_output = np.array(real(merged, block, sequences, 4))
    from_pruned = np.array(real(pruned, pruned.model.layers[2].mlp, sequences, 4))
    np.testing.assert_allclose(seen[2][0], from_output, rtol=1e-5, atol=1e-5)
    assert not np.allclose(seen[2][0], from_pruned, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("bits", [None, 4], ids=["f32", "4bit"])
def test_one_pass_through_the_layers_gives_the_quadratic_merge_byte_for_byte(
    qwen, calib, tmp_path, monkeypatch, bits
):
    """The runner (each decoder layer once, after the merges before it) against the model run
    up to each block again for every layer, as merge did before the runner: same bytes."""
    from mlxfun.core import runner

    source, stats, _ = qwen[bits]
    stepped = run_merge(source, stats, calib, tmp_path / "stepped", n=2, group_size=0)
    calls = []
    real = ream.layer_inputs

    def whole_forward(*args):
        calls.append(1)
        return real(*args)

    def refuse(*args, **kwargs):
        raise runner.refusal("qwen3_moe", "refused for the test")

    monkeypatch.setattr(runner, "LayerRunner", refuse)
    monkeypatch.setattr(ream, "layer_inputs", whole_forward)
    quadratic = run_merge(source, stats, calib, tmp_path / "quadratic", n=2, group_size=0)
    assert len(calls) == 3  # the fallback really ran, once per MoE layer
    assert stepped["groups"] == quadratic["groups"]
    assert any(m for groups in stepped["groups"].values() for m in groups.values())
    assert digest(tmp_path / "stepped") == digest(tmp_path / "quadratic")


def test_same_inputs_same_bytes(qwen, calib, tmp_path):
    source, stats, _ = qwen[4]
    run_merge(source, stats, calib, tmp_path / "a", ratio=0.25, seed=3)
    run_merge(source, stats, calib, tmp_path / "b", ratio=0.25, seed=3)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


STOCK_LOAD = """
import sys
import mlx_lm
for path, trust in zip(sys.argv[1::2], sys.argv[2::2]):
    model, tokenizer = mlx_lm.load(path, trust_remote_code=trust == "1")
    text = mlx_lm.generate(model, tokenizer, "hello", max_tokens=6)
    print("generated", path, len(text))
leaked = sorted(k for k in sys.modules if k.startswith("mlxfun"))
assert not leaked, leaked
"""


def test_merged_models_load_and_generate_with_stock_mlx_lm(qwen, calib, tmp_path, capsys):
    outputs = []
    # softmax router, 4-bit, through the command line
    source, stats, _ = qwen[4]
    out = tmp_path / "qwen4"
    rc = main(
        ["merge", "--model", str(source), "--stats", str(stats), "--dataset", str(calib)]
        + ["--ratio", "0.25", "-o", str(out), "--group-size", "0"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "merged_groups" in text and "requantized: 4 bits, group size 32, affine" in text
    provenance = json.loads((out / "mlxfun.json").read_text())
    assert provenance["requantized"] == {"bits": 4, "group_size": 32, "mode": "affine"}
    assert set(provenance["ream"]["groups"]) == {"0", "1", "2"}
    outputs.append((out, "0"))
    # softmax router, float32, model-wide (non-uniform: a model_file)
    source, stats, _ = qwen[None]
    wide = tmp_path / "wide"
    summary = run_merge(source, stats, calib, wide, selector="model-wide", n=5)
    assert not summary["uniform"] and (wide / "mlxfun_nonuniform.py").is_file()
    outputs.append((wide, "1"))
    # sigmoid router with correction bias, group limit and shared experts
    args, groups = grouped_args("glm4_moe", biased.GLM4_MOE)
    glm, _ = write_dir(tmp_path / "glm", "glm4_moe", args)
    glm_stats = stats_file(glm, tmp_path / "glm.npz", random_scores(glm))
    summary = run_merge(glm, glm_stats, calib, tmp_path / "glm_out", n=groups)
    assert any(m for g in summary["groups"].values() for m in g.values())
    outputs.append((tmp_path / "glm_out", "0"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXFUN")}
    done = subprocess.run(
        [sys.executable, "-c", STOCK_LOAD, *[str(a) for pair in outputs for a in pair]],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("generated") == 3


# ---------------------------------------------------------------------------------------------
# The gate of the output similarity: the architecture's own router probabilities


def np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def source_tensors(directory):
    tensors = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(mx.load(str(shard)))
    return {n: np.array(v.astype(mx.float32), dtype=np.float64) for n, v in tensors.items()}


def recorded_statistics(monkeypatch):
    """Patch ``ream.layer_statistics`` to record its inputs and results, one entry per layer."""
    calls = []
    real = ream.layer_statistics

    def recording(kind, activation, weights, x, logits, probs, num_experts):
        means, logits_np = real(kind, activation, weights, x, logits, probs, num_experts)
        calls.append(
            {
                "x": np.array(x, dtype=np.float64),
                "logits": np.array(logits, dtype=np.float64),
                "probs": np.array(probs, dtype=np.float64),
                "means": means,
            }
        )
        return means, logits_np

    monkeypatch.setattr(ream, "layer_statistics", recording)
    return calls


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
def test_gated_outputs_use_the_routers_own_probabilities(
    qwen, calib, tmp_path, monkeypatch, router
):
    """glm4_moe scores experts with a sigmoid (plus a correction bias that only selects),
    qwen3_moe with a softmax: the probabilities that gate the outputs, and the mean gated
    outputs, equal numpy recomputations from the source checkpoint's router and expert
    weights on the block inputs ream captured."""
    if router == "sigmoid":
        args, groups = grouped_args("glm4_moe", biased.GLM4_MOE)
        source, _ = write_dir(tmp_path / "glm", "glm4_moe", args)
        stats = stats_file(source, tmp_path / "glm.npz", random_scores(source))
        n, probability = groups, np_sigmoid
    else:
        source, stats, _ = qwen[None]
        n, probability = 2, np_softmax
    calls = recorded_statistics(monkeypatch)
    summary = run_merge(source, stats, calib, tmp_path / "out", n=n)
    layers = sorted(int(i) for i in summary["groups"])
    assert len(calls) == len(layers) > 0
    tensors = source_tensors(source)
    for index, call in zip(layers, calls):
        prefix = f"model.layers.{index}.mlp"
        x = call["x"]
        logits = x @ tensors[f"{prefix}.gate.weight"].T
        np.testing.assert_allclose(call["logits"], logits, rtol=1e-4, atol=1e-5)
        probs = probability(logits)
        np.testing.assert_allclose(call["probs"], probs, rtol=1e-4, atol=1e-6)
        if router == "sigmoid":
            # not the softmax stand-in, and the (non-zero) correction bias is left out
            assert np.abs(tensors[f"{prefix}.gate.e_score_correction_bias"]).max() > 0
            assert not np.allclose(call["probs"], np_softmax(logits), atol=1e-2)
        else:
            np.testing.assert_allclose(call["probs"].sum(axis=-1), 1.0, rtol=1e-5)
        experts = {
            f"{proj}.weight": tensors[f"{prefix}.switch_mlp.{proj}.weight"]
            for proj in ("gate_proj", "up_proj", "down_proj")
        }
        expected = np.stack(
            [
                np.mean(
                    probs[:, e : e + 1]
                    * np_output({name: value[e] for name, value in experts.items()}, x),
                    axis=0,
                )
                for e in range(logits.shape[1])
            ]
        )
        scale = np.abs(expected).max()
        np.testing.assert_allclose(call["means"], expected, rtol=1e-3, atol=1e-5 * scale)


ROUTER_CASES = [
    ("qwen3_moe", examples.QWEN3_MOE, np_softmax),
    ("mixtral", examples.MIXTRAL, np_softmax),
    ("glm4_moe", biased.GLM4_MOE, np_sigmoid),
    ("deepseek_v3", biased.DEEPSEEK_V3, np_sigmoid),
    ("minimax", softmax_family.MINIMAX, np_sigmoid),
]


@pytest.mark.parametrize(
    "model_type,args,probability", ROUTER_CASES, ids=[c[0] for c in ROUTER_CASES]
)
def test_router_scores_are_the_routes_probabilities(model_type, args, probability):
    """``router_scores`` is the softmax / sigmoid of the logits (numpy, from the router weight),
    and the route's gate weights are those scores at the selected experts up to a per-token
    factor (renormalisation, routed_scaling_factor): the scores are what the route starts
    from."""
    model = build_tiny(model_type, args)
    adapter = plugins.adapter_for_config({"model_type": model_type, **args})
    tokens = mx.array(np.random.default_rng(1).integers(0, 256, (2, 12)))
    layers, inputs = capture_block_inputs(model, adapter, tokens)
    for layer in layers:
        x = mx.array(inputs[layer.position].astype(np.float32))
        indices, weights, logits = adapter.routing(layer.block, x)
        scores = np.array(adapter.router_scores(layer.block, logits), dtype=np.float64)
        router = layer.block.gate
        weight = np.array(getattr(router, "weight", router).astype(mx.float32), np.float64)
        np_logits = inputs[layer.position] @ weight.T
        np.testing.assert_allclose(scores, probability(np_logits), rtol=1e-4, atol=1e-6)
        chosen = np.take_along_axis(scores, np.array(indices), axis=-1)
        ratio = np.array(weights.astype(mx.float32), dtype=np.float64) / chosen
        np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio), rtol=1e-4)


def test_router_scores_default_to_the_softmax_and_follow_a_declaration():
    """An adapter whose route declares nothing gets the softmax of the logits; ``scores`` on
    the adapter, then the route's own ``scores`` attribute, take precedence."""
    from mlxfun.core.adapter import MoEAdapter, sigmoid_scores, with_scores

    logits = np.random.default_rng(2).normal(size=(5, 4))
    z = mx.array(logits.astype(np.float32))

    def route(block, logits):
        raise AssertionError("not called")

    plain = MoEAdapter(name="plain", model_types=("plain",), route=route)
    np.testing.assert_allclose(np.array(plain.router_scores(None, z)), np_softmax(logits), 1e-5)
    declared = MoEAdapter(
        name="declared", model_types=("declared",), route=route, scores=sigmoid_scores
    )
    np.testing.assert_allclose(np.array(declared.router_scores(None, z)), np_sigmoid(logits), 1e-5)

    def route2(block, logits):
        raise AssertionError("not called")

    on_route = MoEAdapter(
        name="on_route", model_types=("on_route",), route=with_scores(route2, sigmoid_scores)
    )
    np.testing.assert_allclose(np.array(on_route.router_scores(None, z)), np_sigmoid(logits), 1e-5)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--n", "7"], "error: "),
        (["--group-size", "-1"], "--group-size must be 0 or positive"),
        (["--max-tokens", "0"], "must be positive"),
        (["--selector", "nope"], "error: "),
    ],
)
def test_bad_requests_fail_with_one_line(qwen, calib, tmp_path, capsys, args, message):
    source, stats, _ = qwen[4]
    base = ["merge", "--model", str(source), "--stats", str(stats), "--dataset", str(calib)]
    rc = main(
        base + ["-o", str(tmp_path / "out"), *(args if "--n" in args else ["--n", "2"] + args)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("error:") and message in err[-1]
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "out").exists()


def test_missing_dataset_foreign_stats_and_missing_scipy(
    qwen, calib, tmp_path, capsys, monkeypatch
):
    source, stats, _ = qwen[4]
    base = ["merge", "--model", str(source), "-o", str(tmp_path / "out"), "--n", "2"]
    assert main(base + ["--stats", str(stats)]) == 1
    assert "pass --dataset" in capsys.readouterr().err
    glm_args, _ = grouped_args("glm4_moe", biased.GLM4_MOE)
    other, _ = write_dir(tmp_path / "other", "glm4_moe", glm_args)
    foreign = stats_file(other, tmp_path / "foreign.npz", random_scores(other))
    assert main(base + ["--stats", str(foreign), "--dataset", str(calib)]) == 1
    assert capsys.readouterr().err.strip().startswith("error:")
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    assert main(base + ["--stats", str(stats), "--dataset", str(calib)]) == 1
    assert "pip install 'mlxfun-methods[merge]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_compressor_is_registered_and_the_plugin_module_stays_light():
    from mlxfun.core.testing import check_plugin

    compressor = plugins.get_compressor("ream")
    assert compressor.name == "ream"
    check_plugin("compressor", compressor)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, mlxfun.methods.plugin; "
            "assert not {'scipy', 'mlx.core', 'mlx_lm'} & set(sys.modules), 'heavy import'",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "model_type,args",
    [
        ("gemma4_text", special.GEMMA4_TEXT),
        ("kimi_k3", biased.KIMI_K3_LATENT),
        ("dbrx", special.DBRX),
        ("longcat_flash", special.LONGCAT),
    ],
    ids=["gemma4_text", "kimi_k3_latent", "dbrx", "longcat_flash"],
)
def test_experts_that_compute_something_else_are_refused(tmp_path, calib, model_type, args):
    """gemma4 scales each expert's output, kimi_k3's experts run on a projection of the block
    input, dbrx's experts are separate modules and longcat's zero experts have no weights:
    merging them from stacked weights alone would be wrong, so ream says so."""
    args, groups = grouped_args(model_type, args)
    source, _ = write_dir(tmp_path / "model", model_type, args)
    stats = stats_file(source, tmp_path / "stats.npz", random_scores(source))
    with pytest.raises(ream.MlxfunError, match="ream supports mlx-lm SwitchGLU"):
        run_merge(source, stats, calib, tmp_path / "out", n=2 if groups == 1 else groups)
    assert not (tmp_path / "out").exists()


def test_architectures_the_runner_refuses_merge_with_whole_forwards(tmp_path, calib, monkeypatch):
    """hunyuan hands its layers a shared KV: the runner refuses it, and merge captures each
    block's input with the model run up to it, once per MoE layer."""
    calls = []
    real = ream.layer_inputs

    def whole_forward(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(ream, "layer_inputs", whole_forward)
    source, _ = write_dir(tmp_path / "model", "hunyuan", softmax_family.HUNYUAN)
    stats = stats_file(source, tmp_path / "stats.npz", random_scores(source))
    summary = run_merge(source, stats, calib, tmp_path / "merged", n=2, group_size=0)
    assert len(calls) == 2 and len(summary["groups"]) == 2
    assert any(m for groups in summary["groups"].values() for m in groups.values())
