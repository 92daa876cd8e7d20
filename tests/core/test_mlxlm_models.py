"""``mlxfun.core.mlxlm_models``: mlx-lm's model classes without mlx-lm's loaders (transformers);
what it picks and reads equals mlx-lm's own, and mlx-lm still loads normally afterwards."""

import json
import math
import subprocess
import sys
from pathlib import Path

import mlx_lm.utils
import pytest
from mlxfun.core import mlxlm_models

from ..adapters import test_examples as examples
from ..model_dirs import write_model_dir


def test_remapping_tables_are_the_installed_mlx_lm_ones():
    assert mlxlm_models.MODEL_REMAPPING == mlx_lm.utils.MODEL_REMAPPING
    assert mlxlm_models.MODEL_ARCHITECTURE_REMAPPING == mlx_lm.utils.MODEL_ARCHITECTURE_REMAPPING


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "qwen3_moe"},
        {"model_type": "mistral"},
        {"model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"]},
        {"model_type": "bailing_hybrid", "architectures": "BailingMoeV3ForCausalLM"},
        {"model_type": "solar_open"},
    ],
    ids=lambda c: c["model_type"],
)
def test_model_classes_are_mlx_lms(config):
    assert mlxlm_models.model_classes(config) == tuple(mlx_lm.utils._get_classes(config))


def test_unknown_model_type_is_mlx_lms_error():
    with pytest.raises(ValueError, match="not supported"):
        mlxlm_models.model_classes({"model_type": "no_such_model"})


def test_load_config_reads_like_mlx_lm(tmp_path):
    config = {"model_type": "x", "cap": {"__float__": "Infinity"}, "xs": [{"__float__": "NaN"}]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    ours, theirs = mlxlm_models.load_config(tmp_path), mlx_lm.utils.load_config(tmp_path)
    assert ours["cap"] == theirs["cap"] == math.inf
    assert math.isnan(ours["xs"][0]) and math.isnan(theirs["xs"][0])
    assert ours["eos_token_id"] == theirs["eos_token_id"] == [1, 2]


# Run in a fresh interpreter: a light import first, then mlx-lm as a user imports it.
LIGHT_THEN_MLX_LM = """
import sys
from mlxfun.core import mlxlm_models

model_class, args_class = mlxlm_models.model_classes({"model_type": "qwen3_moe"})
module = sys.modules["mlx_lm.models.qwen3_moe"]
assert "transformers" not in sys.modules and "mlx_lm" not in sys.modules
assert mlxlm_models.model_module("qwen3_moe") is module

import mlx_lm
import mlx_lm.models.qwen3_moe

assert mlx_lm.models.qwen3_moe is module, "submodule not bound to the real package"
assert mlx_lm.utils._get_classes({"model_type": "qwen3_moe"}) == (model_class, args_class)
model, tokenizer = mlx_lm.load(sys.argv[1])
assert type(model) is model_class
assert tokenizer.encode("hi")
print("ok")
"""


def test_mlx_lm_loads_normally_after_a_light_import(tmp_path):
    model_dir = write_model_dir(tmp_path / "m", "qwen3_moe", examples.QWEN3_MOE)
    result = subprocess.run(
        [sys.executable, "-c", LIGHT_THEN_MLX_LM, str(model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


WITH_ANOTHER_THREAD = """
import sys, threading
from mlxfun.core import mlxlm_models

stop = threading.Event()
worker = threading.Thread(target=stop.wait, daemon=True)
worker.start()
module = mlxlm_models.model_module("qwen3_moe")
# the ordinary import ran mlx_lm/__init__: no moment with a bare stand-in for the thread to see
assert hasattr(sys.modules.get("mlx_lm"), "load"), "the bare import was used with a thread"
stop.set()
worker.join()
import mlx_lm
assert mlx_lm.models.qwen3_moe is module
print("ok")
"""


def test_with_other_threads_the_ordinary_import_is_used():
    """Another thread could import mlx_lm while the bare stand-in is in sys.modules and keep
    it; with threads running, model_module imports mlx_lm the ordinary way."""
    result = subprocess.run(
        [sys.executable, "-c", WITH_ANOTHER_THREAD],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
