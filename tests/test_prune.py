"""Pruning is exact: for every supported architecture (the tiny configs of the adapter tests),
float32 and 4-bit, the pruned model's logits equal the original model's with the removed experts
excluded from routing (their router logits at -inf, their correction bias at -inf), for uniform
keep maps (stock ``mlx_lm.load``) and non-uniform ones (``trust_remote_code=True``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map_with_path
from mlx_lm.utils import load as mlx_lm_load
from mlx_lm.utils import save_config, save_model
from mlxfun.cli.app import main
from mlxfun.core import nonuniform, plugins, slicing
from mlxfun.core.adapter import get_path
from mlxfun.core.config import read_config
from mlxfun.core.errors import MlxfunError
from mlxfun.core.hooks import call_hooks
from mlxfun.core.models import load_model
from mlxfun.core.stats import model_fingerprint, save_stats
from mlxfun.methods.prune import PruneRequest, parse_expert_lists, prune, router_groups

from .adapters import test_biased_family as biased
from .adapters import test_examples as examples
from .adapters import test_softmax_family as softmax
from .adapters import test_special_family as special
from .adapters.harness import build_tiny
from .model_dirs import write_byte_tokenizer

# (case id, model type, tiny args)
CASES = [
    ("qwen3_moe", "qwen3_moe", examples.QWEN3_MOE),
    ("mixtral", "mixtral", examples.MIXTRAL),
    *[(a[0], a[0], a[2]) for a in softmax.ARCHITECTURES],
    *[(c[0], c[0], c[1]) for c in biased.BF16_CASES],
    ("kimi_k25", "kimi_k25", biased.KIMI_K25),
    ("mistral3", "mistral3", biased.MISTRAL3),
    ("llama4", "llama4", special.LLAMA4),
    ("gemma4", "gemma4", special.GEMMA4),
    ("gemma4_text", "gemma4_text", special.GEMMA4_TEXT),
    ("deepseek_v41", "deepseek_v41", special.DEEPSEEK_V41),
    ("dbrx", "dbrx", special.DBRX),
    *[(c[0], c[0], c[1]) for c in special.LONGCAT_CASES],
]
_seen = set()
CASES = [c for c in CASES if not (c[0] in _seen or _seen.add(c[0]))]
TOKENS = mx.array(np.random.default_rng(5).integers(0, 256, (2, 12)))


def _config(model_type, args):
    return {"model_type": model_type, **args}


def grouped_args(model_type, args):
    """Group-limited routers get 16 experts in their groups, so each group can lose one and
    keep the two that mlx-lm's group score needs."""
    config = _config(model_type, args)
    adapter = plugins.adapter_for_config(config)
    skeleton = slicing.model_skeleton(None, config)[0]
    layer = adapter.moe_layers(skeleton)[0]
    groups, _ = router_groups(adapter, layer.block)
    if groups == 1:
        return args, 1
    config = json.loads(json.dumps(config))
    for key in nonuniform.present_keys(config, adapter.num_experts_keys):
        nonuniform.set_key(config, key, 16)
    config.pop("model_type")
    return config, groups


def write_dir(path, model_type, args, bits=None, seed=0):
    """A tiny seeded model directory; correction biases are made non-negative (see
    ``exclude``) and gemma4's per-expert scales positive, as in real checkpoints."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_tiny(model_type, args, seed=seed)
    adapter = plugins.adapter_for_config(_config(model_type, args))

    def adjust(name, value):
        last = name.rsplit(".", 1)[-1]
        if last in ("e_score_correction_bias", "expert_bias", "router_bias"):
            return mx.abs(value) * 0.1
        if last == "per_expert_scale":
            return mx.abs(value) + 0.5
        return value

    model.update(tree_map_with_path(adjust, model.parameters()))
    if bits is not None:
        nn.quantize(
            model,
            group_size=32,
            bits=bits,
            class_predicate=lambda _, m: (
                hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0
            ),
        )
    mx.eval(model.parameters())
    save_model(path, model)
    config = _config(model_type, args)
    if bits is not None:
        config["quantization"] = {"group_size": 32, "bits": bits}
    save_config(config, path / "config.json")
    write_byte_tokenizer(path)
    return path, adapter


def write_stats(model_dir, path, seed=0):
    config = read_config(model_dir)
    adapter = plugins.adapter_for_config(config)
    skeleton, _ = slicing.model_skeleton(model_dir)
    plans = slicing.layer_plans(skeleton, adapter)
    scores = np.random.default_rng(seed).random((len(plans), max(p.num_experts for p in plans)))
    metadata = {
        "fingerprint": model_fingerprint(config, plans),
        "moe_layers": [p.index for p in plans],
    }
    save_stats(path, {"reap": scores}, {}, np.zeros(len(plans), dtype=np.int64), metadata)
    return path


def exclude(model, adapter, removed):
    """Hooks (to use with ``call_hooks``) and in-place edits that keep ``removed[position]``
    experts out of routing: -inf on their router logits (router modules) and on their
    correction bias; a raw router array without a bias gets its gate module replaced by the
    adapter's routing of the masked logits (the adapter repeats the block's routing exactly)."""
    hooks = []
    for layer in adapter.moe_layers(model):
        gone = removed.get(layer.position, [])
        if not gone:
            continue
        mask = np.zeros(layer.num_experts, dtype=np.float32)
        mask[gone] = -np.inf
        mask = mx.array(mask)
        has_bias = False
        if adapter.correction_bias_attr:
            try:
                owner_path, _, attr = adapter.correction_bias_attr.rpartition(".")
                owner = get_path(layer.block, owner_path) if owner_path else layer.block
                bias = getattr(owner, attr)
            except AttributeError:
                bias = None
            if isinstance(bias, mx.array):
                setattr(owner, attr, bias + mask.astype(bias.dtype))
                has_bias = True
        router = get_path(layer.block, adapter.router_attr)
        if isinstance(router, nn.Module):

            def add_mask(module, call, x, *args, _mask=mask, **kwargs):
                out = call(x, *args, **kwargs)
                return out + _mask.astype(out.dtype)

            hooks.append((router, add_mask))
        elif not has_bias:
            gate_path = adapter.router_attr.rpartition(".")[0]
            gate = get_path(layer.block, gate_path)

            def reroute(module, call, x, *args, _mask=mask, _block=layer.block, **kwargs):
                logits = adapter.router_logits(_block, x)
                return adapter.route(_block, logits + _mask.astype(logits.dtype))

            hooks.append((gate, reroute))
    return hooks


def pruned_matches_masked(source, output, adapter, trust=False, atol=1e-4, load=None):
    """``load(path) -> (model, tokenizer)`` loads both models (default: stock mlx-lm)."""
    if load is None:

        def load(path):
            return mlx_lm_load(str(path), trust_remote_code=trust)

    original, _ = load(source)
    pruned, _ = load(output)
    provenance = json.loads((Path(output) / "mlxfun.json").read_text())
    positions = {int(i): p for p, i in enumerate(provenance["moe_layers"])}
    removed = {positions[int(k)]: v for k, v in provenance["removed"].items()}
    counts = [layer.num_experts for layer in adapter.moe_layers(pruned)]
    assert counts == provenance["experts_after"]
    unmasked = original(TOKENS)
    with call_hooks(exclude(original, adapter, removed)):
        expected = original(TOKENS)
    got = pruned(TOKENS)
    mx.eval(unmasked, expected, got)
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=atol, rtol=1e-4)
    # the removed experts mattered: without excluding them the logits differ
    assert not np.allclose(np.array(got), np.array(unmasked), atol=atol, rtol=1e-4)
    return provenance


@pytest.mark.parametrize("bits", [None, 4], ids=["f32", "4bit"])
@pytest.mark.parametrize("case,model_type,args", CASES, ids=[c[0] for c in CASES])
def test_pruned_logits_equal_masked_original(tmp_path, case, model_type, args, bits):
    args, groups = grouped_args(model_type, args)
    source, adapter = write_dir(tmp_path / "model", model_type, args, bits)
    stats = write_stats(source, tmp_path / "stats.npz")
    out = tmp_path / "uniform"
    summary = prune(
        PruneRequest(model=source, stats=stats, output=out, n=2 if groups == 1 else groups)
    )
    assert summary["uniform"] and summary["bytes_saved"] > 0
    pruned_matches_masked(source, out, adapter)

    wide = tmp_path / "wide"
    summary = prune(
        PruneRequest(
            model=source,
            stats=stats,
            output=wide,
            selector="model-wide",
            n=5 if groups == 1 else 3 * groups,
        )
    )
    assert not summary["uniform"], summary["keep"]
    config = json.loads((wide / "config.json").read_text())
    assert config["model_file"] == nonuniform.MODEL_FILE
    provenance = pruned_matches_masked(source, wide, adapter, trust=True)
    if groups > 1:
        size = provenance["experts_before"][0] // groups
        for gone in provenance["removed"].values():
            assert len({sum(1 for e in gone if e // size == g) for g in range(groups)}) == 1


# ---------------------------------------------------------------------------------------------
# The command, the files it writes, and what it refuses


def reshard(model_dir, shards):
    """Split a model's weights over several shards with an index, as big checkpoints are."""
    model_dir = Path(model_dir)
    weights = mx.load(str(model_dir / "model.safetensors"))
    names = sorted(weights)
    index = json.loads((model_dir / slicing.INDEX_FILE).read_text())
    index["weight_map"] = {}
    for i in range(shards):
        part = names[i::shards]
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        mx.save_safetensors(
            str(model_dir / shard), {k: weights[k] for k in part}, {"format": "mlx"}
        )
        index["weight_map"].update({k: shard for k in part})
    (model_dir / "model.safetensors").unlink()
    (model_dir / slicing.INDEX_FILE).write_text(json.dumps(index, indent=4))


def digest(directory):
    import hashlib

    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(directory).iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    source, adapter = write_dir(
        root / "model", "qwen3_moe", dict(examples.QWEN3_MOE, num_hidden_layers=3), bits=4
    )
    reshard(source, 3)
    return source, write_stats(source, root / "stats.npz"), adapter


def run_cli(*args):
    return main(["prune", *[str(a) for a in args]])


def test_multi_shard_output_keeps_the_index_consistent(qwen, tmp_path):
    source, stats, adapter = qwen
    before = digest(source)
    out = tmp_path / "out"
    assert run_cli("--model", source, "--stats", stats, "--ratio", 0.25, "-o", out) == 0
    assert digest(source) == before, "the input was modified"
    index = json.loads((out / slicing.INDEX_FILE).read_text())
    headers = slicing.read_headers(out)
    assert set(index["weight_map"].values()) == set(headers) and len(headers) == 3
    for name, shard in index["weight_map"].items():
        assert name in headers[shard]
    assert index["metadata"]["total_size"] == sum(
        slicing.tensor_bytes(i) for infos in headers.values() for i in infos.values()
    )
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == 6 and config["num_experts_per_tok"] == 2
    assert config["quantization"] == {"group_size": 32, "bits": 4}
    for infos in headers.values():
        for name, info in infos.items():
            if ".switch_mlp." in name:
                assert info["dtype"] == ("U32" if name.endswith("weight") else "F32")
    pruned_matches_masked(source, out, adapter)
    provenance = json.loads((out / "mlxfun.json").read_text())
    assert provenance["scorer"] == "reap" and provenance["selector"] == "bottom"
    assert provenance["source_model"] == str(source.resolve())
    assert provenance["stats"]["fingerprint"]["model_type"] == "qwen3_moe"
    assert {"mlx", "mlx-lm", "mlxfun-core"} <= set(provenance["versions"])
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()


STOCK_LOAD = """
import sys
import mlx_lm
model, tokenizer = mlx_lm.load(sys.argv[1], trust_remote_code=sys.argv[2] == "1")
text = mlx_lm.generate(model, tokenizer, "hello", max_tokens=8)
leaked = sorted(k for k in sys.modules if k.startswith("mlxfun"))
assert not leaked, leaked
print("generated", len(text))
"""


def test_outputs_load_and_generate_with_stock_mlx_lm_in_a_subprocess(qwen, tmp_path):
    source, stats, _ = qwen
    uniform, wide = tmp_path / "uniform", tmp_path / "wide"
    assert run_cli("--model", source, "--stats", stats, "--n", 2, "-o", uniform) == 0
    assert (
        run_cli(
            "--model", source, "--stats", stats, "--selector", "model-wide", "--n", 5, "-o", wide
        )
        == 0
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXFUN")}
    for out, trust in ((uniform, "0"), (wide, "1")):
        done = subprocess.run(
            [sys.executable, "-c", STOCK_LOAD, str(out), trust],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "generated" in done.stdout
    # without trust_remote_code stock mlx-lm refuses the model_file, saying why
    done = subprocess.run(
        [sys.executable, "-c", STOCK_LOAD, str(wide), "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert done.returncode != 0 and "trust_remote_code" in done.stderr
    # the mlx_lm.generate command line, as a user runs it
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm.generate",
            "--model",
            str(wide),
            "--trust-remote-code",
            "--prompt",
            "hi",
            "--max-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # mlxfun's own loader needs no flag
    model, _, config = load_model(wide)
    assert [
        layer.num_experts for layer in plugins.adapter_for_config(config).moe_layers(model)
    ] == json.loads((wide / "mlxfun.json").read_text())["experts_after"]


def test_dry_run_writes_nothing_and_reports(qwen, tmp_path, capsys):
    source, stats, _ = qwen
    out = tmp_path / "never"
    assert run_cli("--model", source, "--stats", stats, "--n", 2, "-o", out, "--dry-run") == 0
    text = capsys.readouterr().out
    assert "dry run: nothing written" in text and "saves" in text and "removed_ids" in text
    assert not out.exists()
    assert (
        run_cli(
            "--model",
            source,
            "--stats",
            stats,
            "--selector",
            "model-wide",
            "--n",
            4,
            "--dry-run",
            "--json",
            "--normalize",
            "mean",
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["removed"] == 4 and summary["bytes_saved"] > 0 and summary["dry_run"]
    assert sum(row["removed"] for row in summary["layers"]) == 4
    assert list(summary["keep"]) == ["0", "1", "2"]
    assert not list(tmp_path.iterdir())


def test_protect_and_target(qwen, tmp_path, capsys):
    source, stats, _ = qwen
    spec = tmp_path / "protect.json"
    spec.write_text(json.dumps({"1": [0, 1], "*": "7"}))
    assert (
        run_cli(
            "--model",
            source,
            "--stats",
            stats,
            "--n",
            3,
            "--dry-run",
            "--json",
            "--protect",
            spec,
            "--target",
            "0:2;2:3,4",
            "--target",
            "1:5",
        )
        == 0
    )
    keep = json.loads(capsys.readouterr().out)["keep"]
    assert 2 not in keep["0"] and 3 not in keep["2"] and 4 not in keep["2"] and 5 not in keep["1"]
    assert {0, 1, 7} <= set(keep["1"]) and 7 in keep["0"] and 7 in keep["2"]


def test_parse_expert_lists():
    assert parse_expert_lists(["3:1,2;5:0", "3:4..6", "*:7"]) == {
        3: [1, 2, 4, 5, 6],
        5: [0],
        "*": [7],
    }
    for bad, message in [
        ("3", "layer:expert"),
        ("x:1", "not a layer index"),
        ("1:a", "not an expert id"),
        ("1:5..2", "not an expert id"),
    ]:
        with pytest.raises(MlxfunError, match=message):
            parse_expert_lists([bad])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n", 7], "min_keep"),
        (["--n", 2, "--protect", "9:0"], "not an MoE layer; the MoE layers are 0, 1, 2"),
        (["--n", 1, "--target", "0:1,2"], "use n >= 2"),
        (["--n", 2, "--min-keep", 1], "below top-k 2"),
        (["--n", 2, "--scorer", "nope"], "no 'nope' scores"),
        (["--n", 2, "--selector", "nope"], "unknown selector 'nope'"),
        (["--n", -1], "0 or more"),
        (["--ratio", 0.2, "--n", 1], "exactly one"),
    ],
)
def test_impossible_requests_fail_with_one_line(qwen, tmp_path, capsys, args, message):
    source, stats, _ = qwen
    assert run_cli("--model", source, "--stats", stats, "-o", tmp_path / "o", *args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "o").exists()


def test_stats_of_another_model_are_refused(qwen, tmp_path, capsys):
    source, _, _ = qwen
    other, _ = write_dir(tmp_path / "other", "qwen3_moe", examples.QWEN3_MOE)
    stats = write_stats(other, tmp_path / "other.npz")
    assert run_cli("--model", source, "--stats", stats, "--n", 2, "-o", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "collected on another model" in err and "mlxfun collect" in err


def test_existing_output_needs_force_and_input_is_never_the_output(qwen, tmp_path, capsys):
    source, stats, _ = qwen
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    (out / "mlxfun.json").write_text("{}")  # --force replaces only a previous model output
    assert run_cli("--model", source, "--stats", stats, "--n", 2, "-o", out) == 1
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert run_cli("--model", source, "--stats", stats, "--n", 2, "-o", out, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "mlxfun.json").exists()
    assert run_cli("--model", source, "--stats", stats, "--n", 2, "-o", source, "--force") == 1
    assert "never modifies its input" in capsys.readouterr().err


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_interrupted_run_leaves_no_model(qwen, tmp_path, monkeypatch, error):
    source, stats, _ = qwen
    calls = []
    real = slicing.slice_shard

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(slicing, "slice_shard", failing)
    with pytest.raises(error):
        prune(PruneRequest(model=source, stats=stats, output=tmp_path / "out", n=2))
    assert calls and not list(tmp_path.iterdir())


def test_collect_then_prune_then_prune_again(tmp_path):
    """End to end from text: collect, model-wide prune, collect on the non-uniform result
    (loaded without flags) and prune it again, per layer."""
    source, adapter = write_dir(tmp_path / "model", "mixtral", examples.MIXTRAL)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i} " * 8}) + "\n" for i in range(6)))
    common = ["--dataset", data, "--max-tokens", 32, "--scorers", "reap,frequency"]
    assert (
        main(["collect", "--model", str(source), "-o", str(tmp_path / "s.npz"), *map(str, common)])
        == 0
    )
    wide = tmp_path / "wide"
    assert (
        run_cli(
            "--model",
            source,
            "--stats",
            tmp_path / "s.npz",
            "--selector",
            "model-wide",
            "--n",
            3,
            "-o",
            wide,
        )
        == 0
    )
    assert (
        main(["collect", "--model", str(wide), "-o", str(tmp_path / "w.npz"), *map(str, common)])
        == 0
    )
    again = tmp_path / "again"
    assert (
        run_cli(
            "--model",
            wide,
            "--stats",
            tmp_path / "w.npz",
            "--scorer",
            "frequency",
            "--n",
            1,
            "-o",
            again,
        )
        == 0
    )
    provenance = json.loads((again / "mlxfun.json").read_text())
    assert provenance["source_provenance"]["selector"] == "model-wide"
    before = json.loads((wide / "mlxfun.json").read_text())["experts_after"]
    assert provenance["experts_after"] == [count - 1 for count in before]
    assert provenance["uniform"] == (len(set(before)) == 1)
    pruned_matches_masked(wide, again, adapter, trust=True)


def test_hf_layout_and_stray_per_expert_tensors_are_refused(tmp_path, capsys):
    source, _ = write_dir(tmp_path / "model", "qwen3_moe", examples.QWEN3_MOE)
    stats = write_stats(source, tmp_path / "s.npz")
    weights = dict(mx.load(str(source / "model.safetensors")))
    weights["model.layers.0.mlp.extra_scale"] = mx.ones((8,))
    mx.save_safetensors(str(source / "model.safetensors"), weights, {"format": "mlx"})
    assert run_cli("--model", source, "--stats", stats, "--n", 2, "-o", tmp_path / "o") == 1
    assert "extra_scale look per-expert" in capsys.readouterr().err
    weights.pop("model.layers.0.mlp.extra_scale")
    for name in [k for k in weights if ".switch_mlp." in k and k.startswith("model.layers.1.")]:
        stacked = weights.pop(name)
        for e in range(stacked.shape[0]):
            weights[name.replace("switch_mlp", f"experts.{e}")] = stacked[e]
    mx.save_safetensors(str(source / "model.safetensors"), weights, {"format": "mlx"})
    assert run_cli("--model", source, "--stats", stats, "--n", 2, "-o", tmp_path / "o") == 1
    assert "mlx-lm format" in capsys.readouterr().err


def test_keep_at_least_what_mlx_lm_needs_for_an_moe_layer(tmp_path, capsys):
    """jamba builds no MoE layer with one expert: even with top-1 routing two experts stay."""
    source, _ = write_dir(tmp_path / "model", "jamba", dict(softmax.JAMBA, num_experts_per_tok=1))
    stats = write_stats(source, tmp_path / "s.npz")
    assert run_cli("--model", source, "--stats", stats, "--n", 7, "-o", tmp_path / "o") == 1
    assert "min_keep 2" in capsys.readouterr().err
    assert run_cli("--model", source, "--stats", stats, "--n", 6, "-o", tmp_path / "o") == 0


def test_groups_need_equal_removals(tmp_path, capsys):
    args, groups = grouped_args("deepseek_v3", biased.DEEPSEEK_V3)
    source, _ = write_dir(tmp_path / "model", "deepseek_v3", args)
    stats = write_stats(source, tmp_path / "s.npz")
    assert run_cli("--model", source, "--stats", stats, "--n", 2, "-o", tmp_path / "o") == 1
    assert "4 expert groups" in capsys.readouterr().err
    assert run_cli("--model", source, "--stats", stats, "--n", 12, "-o", tmp_path / "o") == 1
    assert "fewer than min_keep 8" in capsys.readouterr().err


def test_compressor_is_registered():
    assert plugins.get_compressor("prune").name == "prune"


def test_model_file_is_the_template():
    config = _config("qwen3_moe", examples.QWEN3_MOE)
    new, source = nonuniform.nonuniform_config(
        config,
        ["num_experts"],
        [
            {"layer": 0, "module": "model.layers.0", "num_experts": 6},
            {"layer": 1, "module": "model.layers.1", "num_experts": 8},
        ],
    )
    assert new["num_experts"] == 8 and new["mlxfun"]["nonuniform"]["base_num_experts"] == 8
    assert "import mlxfun" not in source and "from mlxfun" not in source
    model = nonuniform.build_model(new)
    assert [m.mlp.switch_mlp.gate_proj.weight.shape[0] for m in model.model.layers] == [6, 8]


# ---------------------------------------------------------------------------------------------
# Experts as a list of modules (dbrx) and zero experts (longcat_flash)


def test_dbrx_list_experts_are_dropped_and_renumbered(tmp_path):
    """dbrx stores one tensor per expert and projection (transformer.blocks.i.ffn.experts.e.
    w1.weight, ...): pruning drops the removed experts' tensors and renumbers the kept ones in
    order, byte for byte, across shards, with the index's weight map renamed to match."""
    source, adapter = write_dir(tmp_path / "model", "dbrx", special.DBRX, bits=4)
    reshard(source, 3)
    stats = write_stats(source, tmp_path / "s.npz")
    out = tmp_path / "out"
    assert run_cli("--model", source, "--stats", stats, "--n", 3, "-o", out) == 0
    keep = json.loads((out / "mlxfun.json").read_text())["keep"]
    before, after = {}, {}
    for directory, tensors in ((source, before), (out, after)):
        for shard in slicing.checkpoint_shards(directory):
            tensors.update(mx.load(str(directory / shard)))
    for layer, kept in keep.items():
        assert len(kept) == 5
        prefix = f"transformer.blocks.{layer}.ffn"
        for new, old in enumerate(kept):
            for proj in ("w1", "v1", "w2"):
                for part in ("weight", "scales", "biases"):
                    name = f"{prefix}.experts.{{}}.{proj}.{part}"
                    assert mx.array_equal(after[name.format(new)], before[name.format(old)])
        assert not [n for n in after if n.startswith(f"{prefix}.experts.5.")]
        for part in ("weight", "scales", "biases"):
            name = f"{prefix}.router.layer.{part}"
            assert mx.array_equal(after[name], before[name][mx.array(kept)])
    removed = 2 * 3 * 3 * 3  # layers x experts x projections x (weight, scales, biases)
    assert set(after) <= set(before) and len(after) == len(before) - removed
    index = json.loads((out / slicing.INDEX_FILE).read_text())
    headers = slicing.read_headers(out)
    assert sorted(index["weight_map"]) == sorted(after)
    for name, shard in index["weight_map"].items():
        assert name in headers[shard]
    config = json.loads((out / "config.json").read_text())
    assert config["ffn_config"] == dict(special.DBRX["ffn_config"], moe_num_experts=5)
    pruned_matches_masked(source, out, adapter)


def write_longcat_stats(model_dir, path):
    """REAP scores in which the zero experts (ids 8..11) are the least important."""
    config = read_config(model_dir)
    skeleton, _ = slicing.model_skeleton(model_dir)
    plans = slicing.layer_plans(skeleton, plugins.adapter_for_config(config))
    scores = 1.0 + np.random.default_rng(0).random((len(plans), plans[0].num_experts))
    scores[:, special.LONGCAT["n_routed_experts"] :] = 0.0
    metadata = {
        "fingerprint": model_fingerprint(config, plans),
        "moe_layers": [p.index for p in plans],
    }
    save_stats(path, {"reap": scores}, {}, np.zeros(len(plans), dtype=np.int64), metadata)
    return path


def test_longcat_zero_experts_are_kept(tmp_path, capsys):
    """The zero experts score lowest here, and still every one stays: the selector chooses
    among the stored experts (n and ratio count those), zero_expert_num stays, n_routed_experts
    and the router rows follow the kept stored experts."""
    stored, zero = special.LONGCAT["n_routed_experts"], special.LONGCAT["zero_expert_num"]
    source, adapter = write_dir(tmp_path / "model", "longcat_flash", special.LONGCAT, bits=4)
    stats = write_longcat_stats(source, tmp_path / "s.npz")
    out = tmp_path / "out"
    assert run_cli("--model", source, "--stats", stats, "--ratio", 0.5, "-o", out) == 0
    provenance = json.loads((out / "mlxfun.json").read_text())
    for kept in provenance["keep"].values():
        assert len(kept) == stored // 2 + zero
        assert kept[-zero:] == list(range(stored, stored + zero))
    assert all(max(gone) < stored for gone in provenance["removed"].values())
    assert provenance["experts_after"] == [stored // 2 + zero] * 2
    config = json.loads((out / "config.json").read_text())
    assert (config["n_routed_experts"], config["zero_expert_num"]) == (stored // 2, zero)
    headers = slicing.read_headers(out)["model.safetensors"]
    mlp = "model.layers.0.mlp"
    assert headers[f"{mlp}.switch_mlp.up_proj.weight"]["shape"][0] == stored // 2
    assert headers[f"{mlp}.router.classifier.weight"]["shape"][0] == stored // 2 + zero
    assert headers[f"{mlp}.router.e_score_correction_bias"]["shape"] == [stored // 2 + zero]
    pruned_matches_masked(source, out, adapter)

    target = ["--model", source, "--stats", stats, "--n", 1, "-o", tmp_path / "o"]
    assert run_cli(*target, "--target", f"0:{stored + 1}") == 1
    assert "zero (parameter-free) experts" in capsys.readouterr().err
    assert run_cli(*target, "--protect", f"*:0,{stored + 1}") == 0
    kept = json.loads((tmp_path / "o" / "mlxfun.json").read_text())["keep"]
    assert all(0 in k and stored + 1 in k for k in kept.values())


@pytest.mark.parametrize(
    "model_type,args", [("dbrx", special.DBRX), ("longcat_flash", special.LONGCAT)]
)
def test_dbrx_and_longcat_collect_prune_and_load_in_stock_mlx_lm(
    tmp_path, capsys, model_type, args
):
    """From text: mlxfun collect (the observer on the model as mlxfun loads it), prune per
    layer and model-wide, and both outputs load and generate in stock mlx-lm. inspect counts
    the layers (neither config has num_hidden_layers) and the experts: 8, plus longcat's 4
    zero experts."""
    source, _ = write_dir(tmp_path / "model", model_type, args)
    assert main(["inspect", str(source), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_layers"] == 2
    assert [layer["experts"] for layer in report["layers"]] == [
        12 if "longcat" in model_type else 8
    ] * 2
    sizes = {row["part"]: row for row in report["sizes"]}
    assert sizes["experts"]["parameters"] == 2 * 8 * 3 * 64 * 32
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i} " * 8}) + "\n" for i in range(6)))
    stats = tmp_path / "s.npz"
    collect = ["collect", "--model", source, "-o", stats, "--dataset", data, "--max-tokens", 32]
    assert main([str(a) for a in collect]) == 0
    uniform, wide = tmp_path / "uniform", tmp_path / "wide"
    assert run_cli("--model", source, "--stats", stats, "--n", 2, "-o", uniform) == 0
    assert (
        run_cli(
            "--model", source, "--stats", stats, "--selector", "model-wide", "--n", 5, "-o", wide
        )
        == 0
    )
    assert not json.loads((wide / "mlxfun.json").read_text())["uniform"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXFUN")}
    for out, trust in ((uniform, "0"), (wide, "1")):
        done = subprocess.run(
            [sys.executable, "-c", STOCK_LOAD, str(out), trust],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "generated" in done.stdout
