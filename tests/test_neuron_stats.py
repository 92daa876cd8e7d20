"""Neuron statistics and scores against numpy, from inputs captured independently: a plain
whole forward with hooks on the linear layers (dense) and, for experts, the MoE block's input
with the routing and the expert MLP recomputed in numpy (per-expert routed tokens)."""

from collections import Counter

import attrs
import mlx.core as mx
import numpy as np
import pytest
from mlxfun.core import plugins
from mlxfun.core.datasets import batches
from mlxfun.core.hooks import call_hooks
from mlxfun.core.testing import (
    TINY_ARGS,
    PluginConformance,
    build_tiny_model,
    check_neuron_scorer,
)
from mlxfun.methods.linear_inputs import Calibration, layer_targets, run_layers
from mlxfun.methods.neuron_scorers import NEURON_SCORERS
from mlxfun.methods.neuron_stats import StatOptions, kmeans

_RNG = np.random.default_rng(3)
# a small alphabet, so that token classes repeat (Fisher needs two tokens of a class)
SEQUENCES = [_RNG.integers(0, 24, size=n).tolist() for n in (20, 13, 7, 16, 9)]


def collected(model, batch_size, options=StatOptions(), attention=True):
    calibration = Calibration.build(batches(SEQUENCES, batch_size), classes=8)
    got = {}
    run_layers(
        model,
        calibration,
        lambda i, layer, prefix: layer_targets(layer, prefix, attention=attention),
        lambda i, targets, stats: got.update(stats),
        options=options,
        sequential=False,
    )
    return got


def token_meta(batch_size):
    """Per real token, in batch order: its sample and its class (8 most frequent ids)."""
    counts = Counter(t for s in SEQUENCES for t in s)
    ranked = sorted(counts, key=lambda t: (-counts[t], t))[:8]
    docs, classes = [], []
    for start in range(0, len(SEQUENCES), batch_size):
        chunk = SEQUENCES[start : start + batch_size]
        width = max(len(s) for s in chunk)
        for row, seq in enumerate(chunk):
            for pos in range(width):
                if pos < len(seq):
                    docs.append(start + row)
                    classes.append(ranked.index(seq[pos]) if seq[pos] in ranked else -1)
    return np.array(docs), np.array(classes)


def plain_inputs(model, modules, batch_size):
    """The inputs each module receives in ordinary forwards, real tokens only, batch order."""
    seen = {name: [] for name in modules}

    def recorder(name):
        def wrapper(module, call, x, *args, **kwargs):
            seen[name].append(x)
            return call(x, *args, **kwargs)

        return wrapper

    masks = []
    with call_hooks([(m, recorder(n)) for n, m in modules.items()]):
        for tokens, mask in batches(SEQUENCES, batch_size):
            model(mx.array(tokens))
            masks.append(mask.reshape(-1))
    return {
        name: np.concatenate(
            [np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1])[m] for x, m in zip(xs, masks)]
        ).astype(np.float64)
        for name, xs in seen.items()
    }


def numpy_stats(x, docs, classes):
    """seed 002's and NeuronRank's statistics, channel by channel."""
    n, d = x.shape
    a = np.abs(x)
    tau = np.percentile(a, 60)
    top = max(1, int(np.ceil(0.1 * n)))
    out = {k: np.zeros(d) for k in ("sq_norm", "mean", "mean_abs", "active", "top_mean")}
    out.update(tf=np.zeros(d), df=np.zeros(d), fisher=np.zeros(d))
    doc_ids = sorted(set(docs.tolist()))
    per_doc = np.array([a[docs == doc].mean(0) for doc in doc_ids])
    doc_tau = np.percentile(per_doc, 60)
    for j in range(d):
        col = x[:, j]
        out["sq_norm"][j] = sum(v * v for v in col)
        out["mean"][j] = col.mean()
        out["mean_abs"][j] = np.abs(col).mean()
        out["active"][j] = np.count_nonzero(np.abs(col) > tau) / n
        out["top_mean"][j] = np.sort(np.abs(col))[::-1][:top].mean()
        out["tf"][j] = per_doc[:, j].mean()
        out["df"][j] = np.count_nonzero(per_doc[:, j] > doc_tau)
        sizes = Counter(classes.tolist())
        labelled = np.array([c >= 0 and sizes[c] >= 2 for c in classes], dtype=bool)
        c_col, c_lab = col[labelled], classes[labelled]
        if not labelled.any():
            continue
        mu = c_col.mean()
        between = within = 0.0
        for c in set(c_lab.tolist()):
            members = c_col[c_lab == c]
            between += len(members) * (members.mean() - mu) ** 2
            within += ((members - members.mean()) ** 2).sum()
        out["fisher"][j] = between / (within + 1e-10)
    out["count"], out["docs"] = n, len(doc_ids)
    return out


def assert_stats(got, want):
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=2e-4, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_dense_statistics_equal_numpy(batch_size):
    model = build_tiny_model("llama", dict(TINY_ARGS), seed=1)
    got = collected(model, batch_size)
    modules = {
        f"model.layers.{i}.{part}": getattr(getattr(layer, part.split(".")[0]), part.split(".")[1])
        for i, layer in enumerate(model.model.layers)
        for part in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj")
        + ("self_attn.o_proj",)
    }
    inputs = plain_inputs(model, modules, batch_size)
    docs, classes = token_meta(batch_size)
    assert set(modules) <= set(got)
    assert not any(".mlp.gate" == k[-9:] for k in got)  # no router in a dense model anyway
    for name, x in inputs.items():
        assert_stats(got[name], numpy_stats(x, docs, classes))


def _silu(v):
    return v / (1 + np.exp(-v))


@pytest.mark.parametrize("batch_size", [1, 3])  # 1: unsorted expert calls; 3: sorted ones
def test_expert_statistics_come_from_routed_tokens_only(batch_size):
    model = build_tiny_model("qwen3_moe", dict(TINY_ARGS), seed=2)
    got = collected(model, batch_size)
    blocks = {f"model.layers.{i}.mlp": layer.mlp for i, layer in enumerate(model.model.layers)}
    inputs = plain_inputs(model, blocks, batch_size)
    docs, classes = token_meta(batch_size)
    assert not any(k.endswith("mlp.gate") for k in got)  # the router is not pruned
    for name, x in inputs.items():
        block = blocks[name]
        logits = x @ np.array(block.gate.weight, dtype=np.float64).T
        top = np.argsort(-logits, axis=1)[:, :2]
        sw = block.switch_mlp
        gate_w, up_w = np.array(sw.gate_proj.weight), np.array(sw.up_proj.weight)
        per_expert = got[f"{name}.switch_mlp.down_proj"]
        assert len(per_expert) == 8
        for e in range(8):
            routed = np.any(top == e, axis=1)
            xe = x[routed]
            hidden = _silu(xe @ gate_w[e].T.astype(np.float64)) * (xe @ up_w[e].T)
            for proj, want_x in (("gate_proj", xe), ("up_proj", xe), ("down_proj", hidden)):
                stats = got[f"{name}.switch_mlp.{proj}"][e]
                assert stats["count"] == routed.sum()
                if routed.sum():
                    assert_stats(stats, numpy_stats(want_x, docs[routed], classes[routed]))


def test_topic_mode_clusters_token_inputs():
    model = build_tiny_model("llama", dict(TINY_ARGS), seed=1)
    options = StatOptions(tfidf_mode="topic", topics=4)
    got = collected(model, 2, options, attention=False)
    layer = model.model.layers[1]
    x = plain_inputs(model, {"d": layer.mlp.down_proj}, 2)["d"]
    labels = kmeans(x, 4, seed=0)
    # a fixed point of Lloyd's algorithm: every row is nearest to its own cluster's mean
    centres = np.array([x[labels == c].mean(0) for c in range(labels.max() + 1)])
    nearest = np.argmin(((x[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    assert np.mean(nearest == labels) > 0.95
    want = numpy_stats(x, labels, -np.ones(len(x), int))
    stats = got["model.layers.1.mlp.down_proj"]
    for key in ("tf", "df", "docs"):
        np.testing.assert_allclose(stats[key], want[key], rtol=2e-4, err_msg=key)


def numpy_score(name, w, s):
    a = np.abs(w.astype(np.float64))
    norm = np.sqrt(s["sq_norm"])
    idf = np.clip(np.log(1 / np.maximum(s["active"], 1e-10)), 0, 10)
    spiky = np.clip(s["top_mean"] / np.maximum(s["mean_abs"], 1e-10), 1, 10)
    tfidf = s["tf"] ** 1.0 * (np.log((1 + s["docs"]) / (1 + s["df"])) + 1) ** 1.5
    return {
        "magnitude": a,
        "wanda": a * norm,
        "wanda_idf": a * norm * idf,
        "wanda_spiky": a * norm * spiky,
        "wanda_select": a * norm * idf * spiky,
        "neuronrank_tfidf": a * tfidf,
        "neuronrank_fisher": a * norm * s["fisher"],
    }[name]


@pytest.mark.parametrize(
    "name",
    [
        "magnitude",
        "wanda",
        "wanda_idf",
        "wanda_spiky",
        "wanda_select",
        "neuronrank_tfidf",
        "neuronrank_fisher",
    ],
)
def test_every_scorer_equals_numpy_on_collected_statistics(name):
    scorer = plugins.get_neuron_scorer(name)
    check_neuron_scorer(scorer)
    model = build_tiny_model("qwen3_moe", dict(TINY_ARGS), seed=2)
    got = collected(model, 3)
    for key in ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.switch_mlp.down_proj"):
        stats = got[key] if isinstance(got[key], dict) else got[key][3]
        module = model.model.layers[int(key.split(".")[2])]
        w = (
            module.self_attn.o_proj.weight
            if "o_proj" in key
            else module.mlp.switch_mlp.down_proj.weight[3]
        )
        w = np.array(w)
        np.testing.assert_allclose(scorer.score(w, stats), numpy_score(name, w, stats), rtol=1e-9)


class TestWandaIsAConformingNeuronScorer(PluginConformance):
    plugin_kind = "neuron_scorer"
    plugin_object = NEURON_SCORERS[1]


def test_the_built_in_neuron_scorers_register_through_the_entry_point():
    names = [s.name for s in NEURON_SCORERS]
    assert plugins.plugin_names("neuron_scorer") == sorted(names)
    assert {plugins.registry()["neuron_scorer"][n].distribution for n in names} == {
        "mlxfun-methods"
    }


def test_a_scorer_with_an_unknown_statistic_fails_the_kit():
    bad = attrs.evolve(NEURON_SCORERS[1], name="bad", stats=frozenset({"sq_norm", "kurtosis"}))
    with pytest.raises(AssertionError, match="kurtosis"):
        check_neuron_scorer(bad)
