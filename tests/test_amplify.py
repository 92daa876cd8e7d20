"""Amplification: a spec written into the checkpoint gives, in stock mlx-lm in a subprocess (no
mlxfun imported), the logits of run-time steering with the same spec, on router families that
take the bias in each place: the correction bias (DeepSeek-V3 grouped sigmoid, MiniMax sigmoid,
LongCat softmax + zero experts), an existing router Linear bias (gpt_oss; LongCat's classifier
for a masked expert's softmax share) and a model file for
routers without one (Qwen3-MoE, float32 and 4-bit, and Mixtral) and for raw-array gates without
a correction bias (DeepSeek-V1 softmax, DeepSeek-V2 group-limited, float32 and 4-bit)."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load as mlx_lm_load
from mlxfun.cli.app import main
from mlxfun.core import plugins
from mlxfun.core.errors import MlxfunError
from mlxfun.core.models import load_model
from mlxfun.core.observe import Observer
from mlxfun.core.testing import check_intervention
from mlxfun.methods.amplify import amplify
from mlxfun.methods.interventions import AmplifyIntervention
from mlxfun.methods.steer import steering

from .adapters import test_biased_family as biased
from .adapters import test_examples as examples
from .adapters import test_softmax_family as softmax
from .adapters import test_special_family as special
from .test_prune import TOKENS, digest, grouped_args, write_dir

SOFTMAX = {a[0]: a[2] for a in softmax.ARCHITECTURES}
BIASED = {c[0]: c[1] for c in biased.BF16_CASES}
LONGCAT = {c[0]: c[1] for c in special.LONGCAT_CASES}

# (case, model type, args, bits, model file expected)
CASES = [
    ("qwen3_moe", "qwen3_moe", examples.QWEN3_MOE, None, True),
    ("qwen3_moe-4bit", "qwen3_moe", examples.QWEN3_MOE, 4, True),
    ("mixtral", "mixtral", examples.MIXTRAL, None, True),
    ("gpt_oss", "gpt_oss", SOFTMAX["gpt_oss"], None, False),
    ("deepseek_v3", "deepseek_v3", BIASED["deepseek_v3"], None, False),
    ("deepseek_v3-4bit", "deepseek_v3", BIASED["deepseek_v3"], 4, False),
    ("minimax", "minimax", softmax.MINIMAX, None, False),
    ("longcat_flash", "longcat_flash", LONGCAT["longcat_flash"], None, False),
    ("deepseek", "deepseek", softmax.DEEPSEEK, None, True),
    ("deepseek-4bit", "deepseek", softmax.DEEPSEEK, 4, True),
    ("deepseek_v2", "deepseek_v2", BIASED["deepseek_v2"], None, True),
    ("deepseek_v2-4bit", "deepseek_v2", BIASED["deepseek_v2"], 4, True),
]

SPEC = {
    "rules": [
        {"layer": "all", "experts": [1], "mode": "mask"},
        {"layer": "all", "experts": [2], "mode": "force"},
        {"layer": "all", "experts": [3, 0], "mode": "bias", "bias": 0.75},
    ]
}

STOCK = """
import sys, numpy as np, mlx.core as mx
from mlx_lm import load
model, _ = load(sys.argv[1], trust_remote_code=True)
tokens = mx.array(np.load(sys.argv[2]))
np.save(sys.argv[3], np.array(model(tokens).astype(mx.float32)))
assert not any(m.startswith("mlxfun") for m in sys.modules), "mlxfun was imported"
"""


def stock_logits(path, tmp_path):
    np.save(tmp_path / "tokens.npy", np.array(TOKENS))
    out = tmp_path / "logits.npy"
    subprocess.run(
        [sys.executable, "-c", STOCK, str(path), str(tmp_path / "tokens.npy"), str(out)],
        check=True,
        capture_output=True,
    )
    return np.load(out)


@pytest.mark.parametrize("case,model_type,args,bits,needs_file", CASES, ids=[c[0] for c in CASES])
def test_amplified_checkpoint_in_stock_mlx_lm_equals_run_time_steering(
    tmp_path, case, model_type, args, bits, needs_file
):
    args, _ = grouped_args(model_type, args)
    source, adapter = write_dir(tmp_path / "model", model_type, args, bits)
    before = digest(source)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    out = tmp_path / "amplified"
    summary = amplify(source, spec, out)
    assert digest(source) == before
    config = json.loads((out / "config.json").read_text())
    assert (config.get("model_file") is not None) == needs_file, summary
    provenance = json.loads((out / "mlxfun.json").read_text())
    assert provenance["method"] == "amplify" and provenance["spec"]["rules"] == SPEC["rules"]

    model, _ = mlx_lm_load(str(source))
    plain = model(TOKENS)
    with steering(model, SPEC, adapter=adapter):
        steered = model(TOKENS)
    mx.eval(plain, steered)
    got = stock_logits(out, tmp_path)
    np.testing.assert_allclose(got, np.array(steered), atol=1e-4, rtol=1e-4)
    assert not np.allclose(got, np.array(plain), atol=1e-4, rtol=1e-4)
    # mlxfun loads it too (the model file from its own template)
    loaded, _, _ = load_model(out)
    np.testing.assert_allclose(np.array(loaded(TOKENS)), got, atol=1e-4, rtol=1e-4)


def test_the_amplify_intervention_equals_steering(tmp_path):
    source, adapter = write_dir(tmp_path / "model", "qwen3_moe", examples.QWEN3_MOE)
    model, _ = mlx_lm_load(str(source))
    with steering(model, SPEC, adapter=adapter):
        steered = model(TOKENS)
    assert AmplifyIntervention().apply(model, adapter, spec=SPEC) is None
    np.testing.assert_allclose(np.array(model(TOKENS)), np.array(steered), atol=1e-5, rtol=1e-5)
    check_intervention(AmplifyIntervention(), {"spec": SPEC})
    assert plugins.get_intervention("amplify").name == "amplify"


def test_amplified_gates_route_where_steering_does(tmp_path):
    """DeepSeek-V2 group-limited: the in-memory amplify intervention (the model file's biased
    gate) equals steering, the gate's bias sits in the checkpoint's config as a gate, and the
    adapter's routing of the amplified model is the block's (the observer checks it)."""
    args, _ = grouped_args("deepseek_v2", BIASED["deepseek_v2"])
    source, adapter = write_dir(tmp_path / "model", "deepseek_v2", args)
    model, _ = mlx_lm_load(str(source))
    with steering(model, SPEC, adapter=adapter):
        steered = model(TOKENS)
    assert AmplifyIntervention().apply(model, adapter, spec=SPEC) is None
    np.testing.assert_array_equal(np.array(model(TOKENS)), np.array(steered))
    with Observer(model, adapter, {"selected"}) as observer:
        mx.eval(model(TOKENS))
        selected = [obs.selected for obs in observer.observations()]
    assert all(not (s == 1).any() for s in selected)
    assert all((s == 2).any(axis=-1).all() for s in selected)

    out = tmp_path / "amplified"
    amplify(source, dict(SPEC), out)
    recorded = json.loads((out / "config.json").read_text())["mlxfun"]["router_bias"]
    assert recorded["routers"] == [] and recorded["gates"] == [
        f"model.layers.{layer.index}.mlp.gate" for layer in adapter.moe_layers(model)
    ]


def test_amplify_refusals_are_one_line(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    qwen, _ = write_dir(tmp_path / "qwen", "qwen3_moe", examples.QWEN3_MOE)
    spec.write_text(json.dumps({"rules": [{"layer": 0, "experts": [99], "mode": "mask"}]}))
    code = main(["amplify", "--model", str(qwen), "--spec", str(spec), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code not in (0, None) and "no expert 99" in err and len(err.splitlines()) == 1
    code = main(["amplify", "--model", str(qwen), "--spec", str(spec), "-o", str(qwen)])
    assert code not in (0, None)
    with pytest.raises(MlxfunError, match="written for another model"):
        amplify(
            qwen,
            dict(SPEC, fingerprint={"model_type": "qwen3_moe", "experts_per_layer": [3, 3]}),
            tmp_path / "o",
        )


def test_amplify_and_pruning_compose_only_prune_first(tmp_path, capsys):
    """Pruning would drop an amplified model's router biases (and its model file): refused in
    one line; a uniformly pruned model amplifies (no model file) and a model-wide one, with its
    model file, is refused by amplify."""
    from .test_prune import write_stats

    args, _ = grouped_args("deepseek_v2", BIASED["deepseek_v2"])
    source, _ = write_dir(tmp_path / "model", "deepseek_v2", args)
    stats = tmp_path / "stats.npz"
    write_stats(source, stats)
    amplified = tmp_path / "amplified"
    amplify(source, dict(SPEC), amplified)
    prune = ["prune", "--stats", str(stats), "--n", "4"]  # 4 groups: one expert from each
    code = main([*prune, "--model", str(amplified), "-o", str(tmp_path / "p")])
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" not in line]
    assert code not in (0, None) and len(err) == 1 and "was amplified" in err[0]
    assert not (tmp_path / "p").exists()

    pruned = tmp_path / "pruned"
    assert main([*prune, "--model", str(source), "-o", str(pruned)]) in (0, None)
    spec = {"rules": [{"layer": "all", "experts": [0], "mode": "mask"}]}
    summary = amplify(pruned, spec, tmp_path / "pruned-amplified")
    assert summary["model_file"] is not None and summary["edits"]

    qwen, _ = write_dir(tmp_path / "qwen", "qwen3_moe", examples.QWEN3_MOE)
    write_stats(qwen, stats, seed=1)
    model_wide = tmp_path / "model-wide"
    options = ["--selector", "model-wide", "--n", "2", "--target", "0:0,1"]
    command = ["prune", "--stats", str(stats), "--model", str(qwen), "-o", str(model_wide)]
    assert main([*command, *options]) in (0, None)
    assert json.loads((model_wide / "config.json").read_text())["model_file"]
    with pytest.raises(MlxfunError, match="has a model_file"):
        amplify(model_wide, spec, tmp_path / "o")


def test_amplify_command_prints_the_edits(tmp_path, capsys):
    source, _ = write_dir(tmp_path / "model", "qwen3_moe", examples.QWEN3_MOE)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    out = tmp_path / "out"
    assert main(["amplify", "--model", str(source), "--spec", str(spec), "-o", str(out)]) in (
        0,
        None,
    )
    text = capsys.readouterr().out
    assert "model.layers.0.mlp.gate.bias" in text and "trust_remote_code=True" in text
