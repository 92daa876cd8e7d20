"""The bundled demo MoE and its data: what README's first command and the quality benchmark use."""

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlxfun.core import plugins
from mlxfun.core.datasets import load_samples, tokenize_samples
from mlxfun.core.models import load_model

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "demo" / "model"
DATA = ROOT / "demo" / "data"
SETS = ["calib_code", "calib_prose", "calib_mixed", "eval_code", "eval_prose"]


@pytest.fixture(scope="module")
def demo():
    return load_model(MODEL)


def test_the_demo_model_is_a_small_stock_qwen3_moe_in_bf16():
    config = json.loads((MODEL / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe"
    assert (config["num_experts"], config["num_experts_per_tok"]) == (16, 2)
    assert config["mlp_only_layers"] == [] and config["decoder_sparse_step"] == 1
    weights = mx.load(str(MODEL / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}
    assert (MODEL / "model.safetensors").stat().st_size <= 20_000_000


def test_every_layer_is_moe_with_16_experts(demo):
    model, _, config = demo
    layers = plugins.adapter_for_config(config).moe_layers(model)
    assert [layer.index for layer in layers] == list(range(config["num_hidden_layers"]))
    assert {(layer.num_experts, layer.top_k) for layer in layers} == {(16, 2)}


def test_the_data_sets_parse_and_calibration_is_not_evaluation():
    texts = {name: [s.text for s in load_samples([DATA / f"{name}.jsonl"])] for name in SETS}
    assert all(len(t) >= 20 for t in texts.values())
    assert texts["calib_mixed"] == texts["calib_code"] + texts["calib_prose"]
    calibration = set(texts["calib_mixed"])
    assert not calibration & set(texts["eval_code"] + texts["eval_prose"])


@pytest.mark.parametrize("domain", ["code", "prose"])
def test_the_model_is_trained(demo, domain):
    """Held-out perplexity far below a uniform guess (4096): the shipped weights learned."""
    model, tokenizer, _ = demo
    samples = load_samples([DATA / f"eval_{domain}.jsonl"])[:2]
    tokens = mx.array(tokenize_samples(samples, tokenizer, 256)[0])[None]
    loss = nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], reduction="mean")
    assert math.exp(loss.item()) < 600
