"""Prune output proofs: two runs give identical bytes (except ``created`` in mlxfun.json);
bf16 / fp16 checkpoints stay bf16 / fp16 with the kept rows unchanged; ``mlxfun collect`` shows
a progress bar on stderr and the per-layer table."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm.utils import save_config, save_model
from mlxfun.cli.app import main
from mlxfun.methods.prune import PruneRequest, prune

from .adapters import test_examples as examples
from .adapters.harness import build_tiny
from .model_dirs import write_byte_tokenizer, write_model_dir
from .test_prune import write_dir, write_stats

QWEN = dict(examples.QWEN3_MOE, num_hidden_layers=2)


def run_prune(model, stats, output):
    request = PruneRequest(
        model=model, stats=stats, scorer="reap", selector="bottom", n=3, output=output
    )
    return prune(request)


def test_two_runs_write_identical_bytes(tmp_path):
    model, _ = write_dir(tmp_path / "m", "qwen3_moe", QWEN)
    stats = write_stats(model, tmp_path / "s.npz")
    run_prune(model, stats, tmp_path / "a")
    run_prune(model, stats, tmp_path / "b")
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    assert files_a == files_b
    for rel in files_a:
        a, b = tmp_path / "a" / rel, tmp_path / "b" / rel
        if a.is_dir():
            continue
        if rel.name == "mlxfun.json":
            pa, pb = json.loads(a.read_text()), json.loads(b.read_text())
            assert pa.pop("created") and pb.pop("created")
            assert pa == pb
        else:
            assert a.read_bytes() == b.read_bytes(), rel


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
def test_half_precision_stays_and_rows_are_the_originals(tmp_path, dtype):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    model = build_tiny("qwen3_moe", QWEN, seed=0)
    model.update(tree_map(lambda a: a.astype(dtype), model.parameters()))
    mx.eval(model.parameters())
    save_model(model_dir, model)
    save_config({"model_type": "qwen3_moe", **QWEN}, model_dir / "config.json")
    write_byte_tokenizer(model_dir)
    stats = write_stats(model_dir, tmp_path / "s.npz")
    out = tmp_path / "out"
    run_prune(model_dir, stats, out)
    keep = json.loads((out / "mlxfun.json").read_text())["keep"]
    before = {}
    for f in model_dir.glob("*.safetensors"):
        before.update(mx.load(str(f)))
    after = {}
    for f in out.glob("*.safetensors"):
        after.update(mx.load(str(f)))
    assert set(before) == set(after)
    experts = QWEN["num_experts"]
    sliced = 0
    for name, value in after.items():
        assert value.dtype == dtype, name
        original = before[name]
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if layer in keep and original.shape[:1] == (experts,) and ".mlp." in name:
            expected = original[mx.array(keep[layer])]
            sliced += 1
        else:
            expected = original
        assert value.shape == expected.shape, name
        np.testing.assert_array_equal(
            np.array(value.astype(mx.float32)), np.array(expected.astype(mx.float32)), err_msg=name
        )
    assert sliced >= 2 * 4  # 3 expert projections + router per MoE layer


def test_collect_shows_a_progress_bar_and_the_layer_table(tmp_path, capsys):
    model = write_model_dir(tmp_path / "m", "qwen3_moe", examples.QWEN3_MOE)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i} " * 5}) + "\n" for i in range(6)))
    args = ["collect", "--model", str(model), "--dataset", str(data), "-o", str(tmp_path / "s.npz")]
    assert main([*args, "--scorers", "reap,frequency"]) == 0
    captured = capsys.readouterr()
    assert "100%" in captured.err and "|" in captured.err  # tqdm's bar, on stderr
    assert "tok" in captured.err
    lines = captured.out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("layer"))
    assert "reap" in header or "tokens" in header
    assert "100%" not in captured.out
