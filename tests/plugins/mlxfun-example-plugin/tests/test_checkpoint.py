"""An ``example_moe`` checkpoint on disk, through the ``mlxfun`` command as a user runs it:
collect -> prune -> load, the pruned model checked against the original with the removed
experts masked out of its router; and a ``--model-file`` output that stock mlx-lm loads without
this package or mlxfun."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlxfun.core import testing
from mlxfun.core.models import load_model
from mlxfun_example_plugin import example_moe

TOKENS = [[1, 7, 42, 200, 255, 3, 99, 120], [65, 66, 67, 10, 32, 101, 0, 17]]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Mixture-of-Experts layers route every token to a few experts.",
    "1, 2, 3, 5, 8, 13, 21, 34, 55, 89",
]


def mlxfun(*args):
    """The installed ``mlxfun`` command in a subprocess; it must succeed."""
    script = Path(sysconfig.get_path("scripts")) / "mlxfun"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mlxfun.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXFUN_")}
    result = subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """A saved example_moe checkpoint and its token_share statistics."""
    root = tmp_path_factory.mktemp("example_moe")
    model = testing.save_tiny_checkpoint(root / "model", "example_moe", seed=1)
    dataset = root / "calib.jsonl"
    dataset.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    stats = root / "stats.npz"
    mlxfun(
        "collect", "--model", model, "--dataset", dataset, "--scorers", "token_share", "-o", stats
    )
    return model, stats


class MaskedRouter(nn.Module):
    """The router with some experts' logits at -inf: they are never selected."""

    def __init__(self, gate, removed: list[int], num_experts: int):
        super().__init__()
        self.gate = gate
        self.mask = mx.array(np.where(np.isin(np.arange(num_experts), removed), -np.inf, 0.0))

    def __call__(self, x):
        return self.gate(x) + self.mask.astype(x.dtype)


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(TOKENS)))


# bottom removes n experts from every layer, model-wide n in all (here not evenly: non-uniform)
@pytest.mark.parametrize("selector,n,total", [("bottom", 2, 4), ("model-wide", 5, 5)])
def test_collect_prune_load(collected, tmp_path, selector, n, total):
    model_dir, stats = collected
    output = tmp_path / "pruned"
    mlxfun("prune", "--model", model_dir, "--stats", stats, "--scorer", "token_share",
           "--selector", selector, "--n", n, "-o", output)  # fmt: skip
    removed = json.loads((output / "mlxfun.json").read_text())["removed"]
    assert sum(len(experts) for experts in removed.values()) == total
    assert (output / "mlxfun_nonuniform.py").exists() == (selector == "model-wide")

    pruned, tokenizer, config = load_model(output)
    original, _, _ = load_model(model_dir)
    assert isinstance(pruned, example_moe.Model) and config["model_type"] == "example_moe"
    assert tokenizer.encode("hi") == [104, 105]
    counts = [layer.mlp.gate.weight.shape[0] for layer in pruned.layers]
    assert counts == [8 - len(removed[str(i)]) for i in range(2)]

    unmasked = logits(original)
    for i, layer in enumerate(original.layers):
        layer.mlp.gate = MaskedRouter(layer.mlp.gate, removed[str(i)], 8)
    np.testing.assert_allclose(logits(pruned), logits(original), atol=1e-5, rtol=1e-4)
    assert not np.allclose(logits(pruned), unmasked, atol=1e-3)  # the removed experts mattered


# Stock mlx-lm only: importing this package or mlxfun fails, so the copy in the output is used.
STOCK_LOAD = """
import sys
sys.modules["mlxfun"] = sys.modules["mlxfun_example_plugin"] = None
import mlx.core as mx, mlx_lm, numpy as np
model, tokenizer = mlx_lm.load(sys.argv[1], trust_remote_code=True)
np.save(sys.argv[2], np.array(model(mx.array(eval(sys.argv[3])))))
print(type(model).__module__)
"""


@pytest.mark.parametrize("selector,n", [("bottom", 2), ("model-wide", 5)])
def test_model_file_output_loads_in_stock_mlx_lm(collected, tmp_path, selector, n):
    model_dir, stats = collected
    output = tmp_path / "pruned"
    mlxfun("prune", "--model", model_dir, "--stats", stats, "--scorer", "token_share",
           "--selector", selector, "--n", n, "--model-file", "-o", output)  # fmt: skip
    assert (output / "example_moe.py").read_text() == Path(example_moe.__file__).read_text()
    saved = tmp_path / "stock.npy"
    result = subprocess.run(
        [sys.executable, "-c", STOCK_LOAD, str(output), str(saved), repr(TOKENS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "custom_model"  # built from the output's model_file
    pruned, _, _ = load_model(output)
    assert isinstance(pruned, example_moe.Model)  # mlxfun: the installed module, not the copy
    np.testing.assert_array_equal(np.load(saved), logits(pruned))
