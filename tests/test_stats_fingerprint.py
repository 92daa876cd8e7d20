"""The stats fingerprint records the expert tensor shapes (logical, so a float model's stats
apply to its quantized conversion), refuses a model whose experts have other shapes with
"the stats file has X, the model has Y", and still accepts files written before the shapes
were recorded (the other keys are compared as before)."""

import json

import numpy as np
import pytest
from mlxfun.cli.app import main
from mlxfun.core.errors import MlxfunError
from mlxfun.core.stats import check_fingerprint, fingerprint_difference, load_stats, merge_stats
from mlxfun.methods.prune import PruneRequest, prune

from .adapters.test_examples import QWEN3_MOE
from .model_dirs import write_model_dir

CODE = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(4)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp")
    data = root / "code.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CODE))
    float_dir = write_model_dir(root / "f32", "qwen3_moe", QWEN3_MOE)
    quant_dir = write_model_dir(root / "q4", "qwen3_moe", QWEN3_MOE, bits=4)
    stats = root / "s.npz"
    args = ["collect", "--model", str(float_dir), "--dataset", str(data), "-o", str(stats)]
    assert main([*args, "--scorers", "reap,frequency"]) == 0
    return float_dir, quant_dir, stats, data


def expected_shapes(args):
    e, h, i = args["num_experts"], args["hidden_size"], args["moe_intermediate_size"]
    return {
        "gate_proj.weight": [e, i, h],
        "up_proj.weight": [e, i, h],
        "down_proj.weight": [e, h, i],
    }


def test_collect_records_logical_expert_shapes(dirs):
    _, _, stats, _ = dirs
    fingerprint = load_stats(stats).fingerprint
    layers = len(fingerprint["moe_layers"])
    assert fingerprint["expert_shapes"] == [expected_shapes(QWEN3_MOE)] * layers


def test_float_stats_apply_to_the_quantized_model(dirs, tmp_path):
    _, quant_dir, stats, _ = dirs
    request = PruneRequest(
        model=quant_dir,
        stats=stats,
        scorer="reap",
        selector="bottom",
        n=2,
        output=None,
        dry_run=True,
    )
    summary = prune(request)
    assert summary["removed"] == 2 * len(load_stats(stats).fingerprint["moe_layers"])


def test_other_expert_shapes_are_refused_naming_both(dirs):
    _, _, stats, _ = dirs
    loaded = load_stats(stats)
    mine = json.loads(json.dumps(loaded.fingerprint))
    mine["expert_shapes"][1]["down_proj.weight"] = [8, 16, 64]
    theirs = loaded.fingerprint["expert_shapes"][1]["down_proj.weight"]
    layer = mine["moe_layers"][1]
    with pytest.raises(MlxfunError) as info:
        check_fingerprint(loaded, mine, "s.npz")
    message = str(info.value)
    assert f"expert shapes of layer {layer}: the stats file has" in message
    assert message.index(str(theirs)) < message.index("[8, 16, 64]")
    assert "\n" not in message


def test_other_model_message_says_which_side_is_which(dirs):
    _, _, stats, _ = dirs
    loaded = load_stats(stats)
    mine = dict(loaded.fingerprint, experts_per_layer=[4] * len(loaded.fingerprint["moe_layers"]))
    with pytest.raises(
        MlxfunError, match=r"experts_per_layer: the stats file has \[8, 8\], the model has \[4, 4\]"
    ):
        check_fingerprint(loaded, mine, "s.npz")


def test_files_without_expert_shapes_still_compare_the_other_keys(dirs, tmp_path):
    _, quant_dir, stats, _ = dirs
    old = load_stats(stats)
    del old.metadata["fingerprint"]["expert_shapes"]
    new = load_stats(stats)
    assert fingerprint_difference(old.fingerprint, new.fingerprint) is None
    check_fingerprint(old, new.fingerprint, "old.npz")
    # an old file of another config is still refused
    other = dict(new.fingerprint, config_hash="0" * 16)
    with pytest.raises(MlxfunError, match="config_hash: the stats file has"):
        check_fingerprint(old, other, "old.npz")
    # old and new files of the same model merge, keeping the shapes
    merged = merge_stats([old, new], {}, mode="rank")
    assert merged.metadata["fingerprint"]["expert_shapes"] == new.fingerprint["expert_shapes"]
    np.testing.assert_array_equal(merged.token_counts, 2 * new.token_counts)
