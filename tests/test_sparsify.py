"""mlxfun sparsify and prune-neurons on tiny dense (llama) and MoE (qwen3_moe) checkpoints:
the zeroed weights are exactly Wanda's per-row choice from independently captured inputs, N:M
holds in every group, the sparsity is exact per row, removing neurons equals zeroing them and
the result loads in stock mlx-lm; bad input is one error line."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load as mlx_lm_load
from mlxfun.cli.app import main
from mlxfun.core.datasets import batches, load_samples, tokenize_samples
from mlxfun.core.hooks import call_hooks
from mlxfun.core.testing import TINY_ARGS, save_tiny_checkpoint
from mlxfun.methods.prune_neurons import PruneNeuronsRequest, prune_neurons
from mlxfun.methods.sparsify import SparsifyRequest, parse_pattern, prune_mask, sparsify
from safetensors.numpy import load_file

from .test_safety import one_error_line


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.jsonl"
    lines = [f"sample {i}: def f(x): return x * {i} # the quick brown fox" for i in range(10)]
    path.write_text("\n".join(json.dumps({"text": t}) for t in lines) + "\n")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": save_tiny_checkpoint(root / "llama", "llama", dict(TINY_ARGS), seed=4),
        "qwen3_moe": save_tiny_checkpoint(root / "qwen", "qwen3_moe", dict(TINY_ARGS), seed=5),
    }


def weights(directory):
    return load_file(str(directory / "model.safetensors"))


def test_masks_are_exact_per_row_and_n_of_every_m():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 5, 16))
    for sparsity in (0.0, 0.3, 0.5, 0.9):
        mask = prune_mask(scores, sparsity, None)
        assert np.all(mask.sum(-1) == int(16 * sparsity))
        # the zeroed ones are the lowest of their row
        kept_min = np.where(mask, np.inf, scores).min(-1)
        dropped_max = np.where(mask, scores, -np.inf).max(-1)
        assert np.all(dropped_max < kept_min)
    for pattern in ("2:4", "4:8"):
        n, m = parse_pattern(pattern)
        mask = prune_mask(scores, 0.5, (n, m)).reshape(3, 5, 16 // m, m)
        assert np.all(mask.sum(-1) == n)
        groups = scores.reshape(3, 5, 16 // m, m)
        assert np.all(
            np.where(mask, groups, -np.inf).max(-1) < np.where(mask, np.inf, groups).min(-1)
        )


def calibration_inputs(model_dir, data, module_path):
    """The inputs of one module in plain whole forwards over the calibration batches."""
    from mlxfun.core.adapter import get_path
    from mlxfun.core.models import load_model

    model, tokenizer, _ = load_model(model_dir)
    sequences = tokenize_samples(load_samples([data], 64), tokenizer, 256)
    seen = []

    def record(module, call, x, *args, **kwargs):
        seen.append(x)
        return call(x, *args, **kwargs)

    rows = []
    with call_hooks([(get_path(model, module_path), record)]):
        for tokens, mask in batches(sequences, 4):
            model(mx.array(tokens))
            x = np.array(seen.pop().astype(mx.float32))
            rows.append(x.reshape(-1, x.shape[-1])[mask.reshape(-1)])
    return np.concatenate(rows).astype(np.float64)


@pytest.mark.parametrize("sequential", [False, True])
def test_wanda_zeroes_the_lowest_weight_times_input_norm_of_every_row(
    models, data, tmp_path, sequential
):
    source = models["llama"]
    out = tmp_path / "out"
    summary = sparsify(
        SparsifyRequest(
            model=source,
            dataset=[data],
            output=out,
            method="wanda",
            sparsity=0.5,
            attention=True,
            sequential=sequential,
        )
    )
    before, after = weights(source), weights(out)
    assert set(before) == set(after)
    pruned = [k for k in before if ".mlp." in k or ".self_attn." in k]
    assert len(pruned) == 2 * 7
    for name in pruned:
        w = after[name]
        assert np.all((w == 0).sum(-1) == w.shape[-1] // 2), name
        assert np.array_equal(w[w != 0], before[name][w != 0])
    for name in set(before) - set(pruned):  # norms, embeddings, LM head untouched
        assert np.array_equal(before[name], after[name]), name
    # layer 0 sees the same inputs either way: Wanda's choice from independent inputs
    x = calibration_inputs(source, data, "model.layers.0.self_attn.q_proj")
    w = before["model.layers.0.self_attn.q_proj.weight"].astype(np.float64)
    score = np.abs(w) * np.sqrt((x * x).sum(0))[None, :]
    lowest = np.argsort(score, axis=1)[:, : w.shape[1] // 2]
    want = np.zeros(w.shape, bool)
    np.put_along_axis(want, lowest, True, axis=1)
    assert np.array_equal(after["model.layers.0.self_attn.q_proj.weight"] == 0, want)
    assert summary["zeroed"] == sum(int((after[k] == 0).sum()) for k in pruned)
    provenance = json.loads((out / "mlxfun.json").read_text())
    assert provenance["method"] == "sparsify" and provenance["options"]["method"] == "wanda"


def test_sequential_changes_later_layers_only(models, data, tmp_path):
    outs = {}
    for sequential in (False, True):
        out = tmp_path / str(sequential)
        request = SparsifyRequest(
            model=models["llama"], dataset=[data], output=out, method="wanda", sequential=sequential
        )
        sparsify(request)
        outs[sequential] = weights(out)
    first = "model.layers.0.mlp.down_proj.weight"
    later = "model.layers.1.mlp.down_proj.weight"
    assert np.array_equal(outs[False][first], outs[True][first])
    assert not np.array_equal(outs[False][later] == 0, outs[True][later] == 0)


@pytest.mark.parametrize(
    "method", ["magnitude", "wanda_select", "neuronrank_tfidf", "neuronrank_fisher"]
)
def test_n_of_m_on_experts_and_attention_with_the_lm_head(models, data, tmp_path, method):
    source, out = models["qwen3_moe"], tmp_path / "out"
    sparsify(
        SparsifyRequest(
            model=source,
            dataset=[data],
            output=out,
            method=method,
            pattern="2:4",
            attention=True,
            lm_head=True,
        )
    )
    before, after = weights(source), weights(out)
    touched = [k for k in before if ".switch_mlp." in k or ".self_attn." in k and "norm" not in k]
    touched.append("lm_head.weight")
    for name in touched:
        w = after[name]
        groups = (w.reshape(*w.shape[:-1], -1, 4) == 0).sum(-1)
        assert np.all(groups == 2), name
    assert np.array_equal(
        before["model.layers.0.mlp.gate.weight"], after["model.layers.0.mlp.gate.weight"]
    )


def test_last_n_and_no_experts(models, data, tmp_path):
    source, out = models["qwen3_moe"], tmp_path / "out"
    sparsify(
        SparsifyRequest(
            model=source,
            dataset=[data],
            output=out,
            method="magnitude",
            attention=True,
            last=1,
            experts=False,
        )
    )
    before, after = weights(source), weights(out)
    for name in before:
        changed = not np.array_equal(before[name], after[name])
        assert changed == (name.startswith("model.layers.1.self_attn.") and "norm" not in name), (
            name
        )


def logits(model, tokens):
    return np.array(model(mx.array(tokens)).astype(mx.float32))


def check_removal(source, out, tmp_path, ratio=0.25, first=0):
    """``out`` gives the logits of ``source`` with the removed neurons zeroed (their
    down-projection columns), layers before ``first`` are byte for byte the source's, and stock
    mlx-lm loads it in a subprocess (with trust_remote_code where it has a model file)."""
    from mlxfun.core.adapter import get_path

    provenance = json.loads((out / "mlxfun.json").read_text())
    config = json.loads((out / "config.json").read_text())
    trust = "model_file" in config
    original, _ = mlx_lm_load(str(source))
    for unit, removed in provenance["removed_neurons"].items():
        assert int(unit.split(".")[2]) >= first
        down = get_path(original, unit).down_proj
        w = np.array(down.weight)
        removed = np.array(removed)
        assert removed.shape[-1] == round(ratio * w.shape[-1])
        if w.ndim == 3:
            assert removed.shape[0] == w.shape[0]
            for e in range(w.shape[0]):
                w[e][:, removed[e]] = 0
        else:
            w[:, removed] = 0
        down.weight = mx.array(w)
    tokens = np.random.default_rng(0).integers(0, 256, size=(2, 12))
    cut, _ = mlx_lm_load(str(out), trust_remote_code=trust)
    np.testing.assert_allclose(logits(cut, tokens), logits(original, tokens), rtol=1e-4, atol=1e-4)
    before, after = weights(source), weights(out)
    assert set(before) == set(after)
    for name, value in before.items():
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < first:
            assert value.dtype == after[name].dtype and np.array_equal(value, after[name]), name
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXFUN")}
    done = subprocess.run(
        [sys.executable, "-c", STOCK_LOAD, str(out), "1" if trust else "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "generated" in done.stdout
    return config, provenance


@pytest.mark.parametrize("last", [None, 1])
@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_removing_neurons_equals_zeroing_them_and_loads_in_stock_mlx_lm(
    models, data, tmp_path, model_type, last
):
    source, out = models[model_type], tmp_path / "out"
    summary = prune_neurons(
        PruneNeuronsRequest(
            model=source, dataset=[data], output=out, method="wanda", ratio=0.25, last=last
        )
    )
    config, provenance = check_removal(source, out, tmp_path, first=1 if last else 0)
    key = "moe_intermediate_size" if model_type == "qwen3_moe" else "intermediate_size"
    size = TINY_ARGS[key]
    assert summary["bytes_after"] < summary["bytes_before"]
    if last is None:  # one size for every layer: the config says it, no model file
        assert config[key] == size - size // 4 and "model_file" not in config
        return
    # the last layer's own size through the model file; the config keeps the others' size
    assert config[key] == size and config["model_file"] == "mlxfun_nonuniform.py"
    assert (out / "mlxfun_nonuniform.py").is_file()
    module = "model.layers.1.mlp" + (".switch_mlp" if model_type == "qwen3_moe" else "")
    assert config["mlxfun"]["nonuniform"]["layers"] == [
        {"layer": 1, "module": module, "config": {key: size - size // 4}}
    ]
    assert list(provenance["removed_neurons"]) == [module]


def shared_expert_models():
    from .adapters.test_biased_family import DEEPSEEK_V3
    from .test_abliterate import ARCHS

    return [
        # (model type, args, options, the model file's modules with their sizes or None)
        ("deepseek_v3", DEEPSEEK_V3, {}, None),
        (
            "deepseek_v3",
            dict(DEEPSEEK_V3, n_shared_experts=2),
            {"last": 1},
            {
                "model.layers.2.mlp.switch_mlp": {"moe_intermediate_size": 24},
                "model.layers.2.mlp.shared_experts": {"moe_intermediate_size": 24},
            },
        ),
        # without the experts, DeepSeek's shared experts cannot shrink through the config
        # (it sizes them from the experts' key): the model file gives them their own size
        (
            "deepseek_v3",
            dict(DEEPSEEK_V3, n_shared_experts=2),
            {"experts": False},
            {
                "model.layers.0.mlp": {"intermediate_size": 72},
                "model.layers.1.mlp.shared_experts": {"moe_intermediate_size": 24},
                "model.layers.2.mlp.shared_experts": {"moe_intermediate_size": 24},
            },
        ),
        ("qwen2_moe", ARCHS["qwen2_moe"], {}, None),
        # 30%: experts keep 22 neurons, the two shared ones 45 (no multiple of 2)
        (
            "deepseek_v3",
            dict(DEEPSEEK_V3, n_shared_experts=2),
            {"ratio": 0.3, "last": 1},
            {
                "model.layers.2.mlp.switch_mlp": {"moe_intermediate_size": 22},
                "model.layers.2.mlp.shared_experts": {
                    "moe_intermediate_size": 45,
                    "n_shared_experts": 1,
                },
            },
        ),
    ]


@pytest.mark.parametrize("case", range(5))
def test_shared_experts_are_pruned_like_dense_mlps(data, tmp_path, case):
    model_type, args, options, modules = shared_expert_models()[case]
    source = save_tiny_checkpoint(tmp_path / "src", model_type, dict(args), seed=case)
    out = tmp_path / "out"
    prune_neurons(
        PruneNeuronsRequest(model=source, dataset=[data], output=out, method="wanda", **options)
    )
    first = 2 if options.get("last") else 0
    config, provenance = check_removal(
        source, out, tmp_path, ratio=options.get("ratio", 0.25), first=first
    )
    shared = [u for u in provenance["removed_neurons"] if "shared_expert" in u]
    assert len(shared) == (1 if first else 2)
    if modules is None:
        assert "model_file" not in config
        if model_type == "qwen2_moe":
            assert config["shared_expert_intermediate_size"] == 48
            assert config["moe_intermediate_size"] == 24 and config["intermediate_size"] == 128
        else:
            assert config["moe_intermediate_size"] == 24 and config["intermediate_size"] == 72
        return
    spec = config["mlxfun"]["nonuniform"]["layers"]
    assert {s["module"]: s["config"] for s in spec} == modules
    assert config["moe_intermediate_size"] == 32


STOCK_LOAD = """
import sys
import mlx_lm
model, tokenizer = mlx_lm.load(sys.argv[1], trust_remote_code=sys.argv[2] == "1")
text = mlx_lm.generate(model, tokenizer, "hello", max_tokens=8)
assert not [k for k in sys.modules if k.startswith("mlxfun")]
print("generated", len(text))
"""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pattern", "3:2"], "--pattern '3:2' is not a pattern"),
        (["--sparsity", "1.5"], "--sparsity must be in [0, 1)"),
        (["--method", "nope"], "unknown neuron_scorer 'nope'"),
        (["--lm-head", "--tfidf-mode", "doc"], None),
        (["--tfidf-mode", "words"], "--tfidf-mode must be doc or topic"),
        (["--last", "0"], "--last must be at least 1"),
    ],
)
def test_bad_sparsify_input_is_one_error_line(models, data, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code = main(
        ["sparsify", "--model", str(models["llama"]), "--dataset", str(data), "-o", str(out)] + args
    )
    if message is None:  # a valid request (untied LM head)
        assert code == 0
        return
    assert code == 1
    assert message in one_error_line(capsys, progress="layers")
    assert not out.exists()


def test_quantized_and_tied_models_are_refused(tmp_path, data, capsys):
    quantized = save_tiny_checkpoint(tmp_path / "q", "llama", dict(TINY_ARGS), bits=4)
    for command in ("sparsify", "prune-neurons"):
        code = main(
            [command, "--model", str(quantized), "--dataset", str(data), "-o", str(tmp_path / "o")]
        )
        assert code == 1
        assert "is quantized" in one_error_line(capsys)
    tied = save_tiny_checkpoint(tmp_path / "t", "llama", dict(TINY_ARGS, tie_word_embeddings=True))
    code = main(
        [
            "sparsify",
            "--model",
            str(tied),
            "--dataset",
            str(data),
            "--lm-head",
            "-o",
            str(tmp_path / "o"),
        ]
    )
    assert code == 1
    assert "ties its LM head" in one_error_line(capsys)
    code = main(
        [
            "prune-neurons",
            "--model",
            str(tied),
            "--dataset",
            str(data),
            "--ratio",
            "1",
            "-o",
            str(tmp_path / "o"),
        ]
    )
    assert code == 1
    assert "--ratio must be in (0, 1)" in one_error_line(capsys)


def test_prune_neurons_cli_json_and_refusals(models, data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prune-neurons", "--model", str(models["qwen3_moe"]), "--dataset", str(data)]
    assert (
        main([*args, "--method", "neuronrank_fisher", "--ratio", "0.5", "-o", str(out), "--json"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["config_changes"] == {
        "moe_intermediate_size": TINY_ARGS["moe_intermediate_size"] // 2
    }
    assert [row["kept"] for row in summary["layers"]] == [8, 8]
    assert main([*args, "--last", "1", "-o", str(tmp_path / "last"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [row["layer"] for row in summary["layers"]] == [1]
    assert summary["config_changes"]["model_file"] == "mlxfun_nonuniform.py"
    # a model with per-module sizes already cannot get other ones on top
    again = ["prune-neurons", "--model", str(tmp_path / "last"), "--dataset", str(data)]
    assert main([*again, "--method", "magnitude", "-o", str(tmp_path / "again")]) == 1
    assert "already has per-module sizes" in one_error_line(capsys)
    assert not (tmp_path / "again").exists()
    assert main([*args, "--last", "0", "-o", str(tmp_path / "zero")]) == 1
    assert "--last must be at least 1" in one_error_line(capsys)
    assert not (tmp_path / "zero").exists()


def test_sparsify_on_deepseek(tmp_path, data, capsys):
    from .adapters.test_biased_family import DEEPSEEK_V3

    source = save_tiny_checkpoint(tmp_path / "ds", "deepseek_v3", dict(DEEPSEEK_V3))
    args = ["--model", str(source), "--dataset", str(data), "-o", str(tmp_path / "out")]
    # dense first layer, MLA attention, experts
    assert main(["sparsify", "--method", "wanda", "--include-attention", "--json", *args]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["groups"]) == {"mlp", "experts", "attention"}
    for group in summary["groups"].values():
        assert group["zeroed"] * 2 == group["weights"]


def test_the_demo_model_keeps_its_bf16_dtype(tmp_path):
    from pathlib import Path

    from mlxfun.core.slicing import read_headers

    demo = Path(__file__).resolve().parent.parent / "demo" / "model"
    out = tmp_path / "out"
    sparsify(SparsifyRequest(model=demo, dataset=[], output=out, method="magnitude"))
    before, after = read_headers(demo), read_headers(out)
    infos = {k: v for shard in after.values() for k, v in shard.items()}
    for shard in before.values():
        for name, info in shard.items():
            assert infos[name]["dtype"] == info["dtype"] and infos[name]["shape"] == info["shape"]
    w = mx.load(str(out / "model.safetensors"))["model.layers.3.mlp.switch_mlp.up_proj.weight"]
    assert w.dtype == mx.bfloat16
    assert np.all(np.array((w == 0).sum(-1)) == w.shape[-1] // 2)


def test_an_architecture_the_runner_refuses_is_one_line(tmp_path, data, capsys):
    from .adapters.test_softmax_family import HUNYUAN

    source = save_tiny_checkpoint(tmp_path / "hy", "hunyuan", dict(HUNYUAN))
    out = tmp_path / "out"
    assert main(["sparsify", "--model", str(source), "--dataset", str(data), "-o", str(out)]) == 1
    line = one_error_line(capsys, progress="layers")
    assert "cannot run it one decoder layer at a time" in line and "--method magnitude" in line
    assert not out.exists()
