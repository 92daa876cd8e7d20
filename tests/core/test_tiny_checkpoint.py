"""``mlxfun.core.testing.save_tiny_checkpoint``: a tiny seeded model saved as an mlx-lm model
directory that stock mlx-lm loads back, weights, config and tokenizer alike."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3_moe
from mlx_lm.utils import load_model, load_tokenizer
from mlxfun.core import testing

TOKENS = mx.array([[1, 7, 42, 200, 255, 3]])


@pytest.mark.parametrize("bits", [None, 4])
def test_stock_mlx_lm_loads_the_model_that_was_built(tmp_path, bits):
    path = testing.save_tiny_checkpoint(tmp_path / "m", "qwen3_moe", seed=3, bits=bits)
    built = testing.build_tiny_model("qwen3_moe", testing.TINY_ARGS, seed=3, bits=bits)
    loaded, config = load_model(path)
    assert config["model_type"] == "qwen3_moe"
    assert config["num_experts"] == testing.TINY_ARGS["num_experts"]
    if bits is not None:
        assert config["quantization"] == {"group_size": 32, "bits": bits}
    assert mx.array_equal(loaded(TOKENS), built(TOKENS)).item()


def test_the_byte_tokenizer_maps_bytes_to_ids(tmp_path):
    path = testing.save_tiny_checkpoint(tmp_path / "m", "qwen3_moe")
    tokenizer = load_tokenizer(path)
    text = "héllo\n"
    ids = tokenizer.encode(text)
    assert ids == list(text.encode())
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == 0


def test_a_module_builds_another_model_type(tmp_path):
    # a plugin's model module: here mlx-lm's qwen3_moe standing in under a new model type
    args = dict(testing.TINY_ARGS, num_experts=4)
    path = testing.save_tiny_checkpoint(tmp_path / "m", "acme_moe", args, module=qwen3_moe)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "acme_moe" and config["num_experts"] == 4
    weights = mx.load(str(path / "model.safetensors"))
    built = testing.build_tiny_model("acme_moe", args, module="mlx_lm.models.qwen3_moe")
    for name, value in weights.items():
        np.testing.assert_array_equal(
            np.array(value), np.array(dict(tree_flatten(built.parameters()))[name])
        )
