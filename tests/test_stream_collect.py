"""``mlxfun collect --stream [--spill DIR]``: the layer-sequential runner reading each layer's
weights as it runs gives the statistics of the in-memory collect, and the in-memory collect on
the runner gives the statistics of whole forwards, on tiny models of every router family,
float32 and 4-bit."""

import json

import numpy as np
import pytest
from mlxfun.cli.app import main
from mlxfun.core import plugins
from mlxfun.core.collect import _forward_collect, collect_stats
from mlxfun.core.datasets import batches
from mlxfun.core.models import load_model
from mlxfun.core.stats import StatsCollector, load_stats

from .adapters.test_biased_family import DEEPSEEK_V3, GLM4_MOE
from .adapters.test_examples import MIXTRAL, QWEN3_MOE
from .adapters.test_softmax_family import HUNYUAN
from .model_dirs import write_model_dir

FAMILIES = {
    # softmax over every expert, then top-k; a dense layer after the last MoE layer
    "softmax-topk": ("qwen3_moe", dict(QWEN3_MOE, num_hidden_layers=3, mlp_only_layers=[2])),
    "topk-softmax": ("mixtral", MIXTRAL),  # top-k of the logits, softmax over the k
    # sigmoid with a correction bias, no groups; a dense first layer
    "sigmoid-bias": ("glm4_moe", dict(GLM4_MOE, n_group=1, topk_group=1)),
    "group-limited": ("deepseek_v3", DEEPSEEK_V3),  # 4 groups of 2, the best 2 compete
}
TEXTS = [
    f"def f{i}(x):\n    return x * {i} + {i * i}  # the {w} sang along the river\n" * (1 + i % 3)
    for i, w in enumerate("cat dog bird fox owl hen yak emu ant".split())
]
SCORERS = "frequency,weighted_frequency,ean_sum,ean_mean,reap,max_activation"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


@pytest.fixture(scope="module", params=[None, 4], ids=["float32", "4bit"])
def bits(request):
    return request.param


def collect(model_dir, dataset, output, *extra):
    args = ["collect", "--model", str(model_dir), "--dataset", str(dataset)]
    args += ["--output", str(output), "--scorers", SCORERS, "--batch-size", "3", *extra]
    assert main(args) == 0
    return load_stats(output)


def assert_same_stats(a, b):
    np.testing.assert_array_equal(a.token_counts, b.token_counts)
    assert a.metadata["fingerprint"] == b.metadata["fingerprint"]
    assert sorted(a.accumulators) == sorted(b.accumulators)
    for name, acc in a.accumulators.items():
        for key, value in acc.items():
            other = b.accumulators[name][key]
            if name == "frequency":
                np.testing.assert_array_equal(value, other, err_msg=f"{name}.{key}")
            np.testing.assert_allclose(value, other, rtol=1e-9, atol=0, err_msg=f"{name}.{key}")
    for name, value in a.scores.items():
        np.testing.assert_allclose(value, b.scores[name], rtol=1e-9, atol=0, err_msg=name)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streamed_collect_equals_in_memory(family, bits, dataset, tmp_path, capsys):
    model_type, args = FAMILIES[family]
    model_dir = write_model_dir(tmp_path / "model", model_type, args, bits=bits)
    memory = collect(model_dir, dataset, tmp_path / "memory.npz")
    streamed = collect(model_dir, dataset, tmp_path / "stream.npz", "--stream")
    spilled = tmp_path / "spill"
    spilled.mkdir()
    spill = collect(model_dir, dataset, tmp_path / "spill.npz", "--stream", "--spill", spilled)
    assert list(spilled.iterdir()) == []  # the memmap is gone
    assert memory.token_counts.sum() > 0 and memory.scores["frequency"].sum() > 0
    assert_same_stats(memory, streamed)
    assert_same_stats(memory, spill)


def test_streamed_bfloat16_checkpoint(dataset, tmp_path):
    """bfloat16 weights (cast to float32 on the CPU backend, lazily under --stream)."""
    import mlx.core as mx

    model_dir = write_model_dir(tmp_path / "model", *FAMILIES["group-limited"])
    shard = model_dir / "model.safetensors"
    weights = {n: v.astype(mx.bfloat16) for n, v in mx.load(str(shard)).items()}
    mx.save_safetensors(str(shard), weights, metadata={"format": "mlx"})
    memory = collect(model_dir, dataset, tmp_path / "memory.npz")
    streamed = collect(model_dir, dataset, tmp_path / "stream.npz", "--stream")
    assert memory.token_counts.sum() > 0
    assert_same_stats(memory, streamed)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_runner_collect_equals_whole_forwards(family, bits, dataset, tmp_path):
    """The runner (one layer over every batch) against one whole forward per batch."""
    model_type, args = FAMILIES[family]
    model_dir = write_model_dir(tmp_path / "model", model_type, args, bits=bits)
    model, tokenizer, config = load_model(model_dir)
    adapter = plugins.adapter_for_config(config)
    scorers = [plugins.get_scorer(n) for n in SCORERS.split(",")]
    sequences = [tokenizer.encode(t) for t in TEXTS]
    runner, layers = collect_stats(model, adapter, sequences, scorers, 3, progress=False)
    forward = StatsCollector(scorers, len(layers), max(la.num_experts for la in layers))
    ordered = sorted(sequences, key=len, reverse=True)
    _forward_collect(model, adapter, list(batches(ordered, 3)), forward, progress=False)
    np.testing.assert_array_equal(runner.token_counts, forward.token_counts)
    for name, acc in runner.accumulators.items():
        for key, value in acc.items():
            np.testing.assert_allclose(value, forward.accumulators[name][key], rtol=1e-9, atol=0)


def test_stream_drops_each_layer_after_it_ran(dataset, tmp_path):
    model_type, args = FAMILIES["softmax-topk"]
    model_dir = write_model_dir(tmp_path / "model", model_type, args)
    model, tokenizer, config = load_model(model_dir, lazy=True)
    adapter = plugins.adapter_for_config(config)
    sequences = [tokenizer.encode(t) for t in TEXTS]
    scorers = [plugins.get_scorer("frequency")]
    collect_stats(model, adapter, sequences, scorers, progress=False, stream=True)
    for index, layer in enumerate(model.model.layers):
        sizes = {v.size for _, v in _flat(layer)}
        assert sizes == ({0} if index < 2 else sizes - {0}), index  # the dense layer 2 never ran
    assert model.model.embed_tokens.weight.size == 0 and model.lm_head.weight.size == 0


def _flat(module):
    from mlx.utils import tree_flatten

    return tree_flatten(module.parameters())


def test_unwritable_spill_is_one_line_and_writes_nothing(dataset, tmp_path, capsys):
    model_dir = write_model_dir(tmp_path / "model", *FAMILIES["topk-softmax"])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    output = tmp_path / "s.npz"
    args = ["collect", "--model", str(model_dir), "--dataset", str(dataset), "-o", str(output)]
    assert main([*args, "--stream", "--spill", str(blocker / "sub")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --spill ") and "writable" in err[0]
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "a-file",
        "model",
    ]


def test_stream_refuses_what_it_cannot_step_through(dataset, tmp_path, capsys):
    """hunyuan hands the next layer (hidden state, shared KV): one line under --stream; the
    in-memory collect runs whole forwards instead."""
    model_dir = write_model_dir(tmp_path / "model", "hunyuan", HUNYUAN)
    output = tmp_path / "s.npz"
    args = ["collect", "--model", str(model_dir), "--dataset", str(dataset), "-o", str(output)]
    assert main([*args, "--stream"]) == 1
    # (transformers logs its own complaints about hunyuan's tokenizer config on stderr)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [
        "error: hunyuan: cannot run it one decoder layer at a time (its forward does not hand "
        "each decoder layer's output to the next); collect without --stream"
    ]
    assert not output.exists()
    assert main(args) == 0 and load_stats(output).token_counts.sum() > 0


def test_pipeline_with_stream_or_spill_is_refused(dataset, tmp_path, capsys):
    model_dir = write_model_dir(tmp_path / "model", *FAMILIES["topk-softmax"])
    output = tmp_path / "s.npz"
    args = ["collect", "--model", str(model_dir), "--dataset", str(dataset), "-o", str(output)]
    for extra in (["--stream"], ["--spill", str(tmp_path / "spill")]):
        assert main([*args, "--pipeline", *extra]) == 1
        err = [line for line in capsys.readouterr().err.splitlines() if "warning" not in line]
        assert len(err) == 1 and err[0].startswith("error: --pipeline ") and "--stream" in err[0]
        assert not output.exists() and not (tmp_path / "spill").exists()
