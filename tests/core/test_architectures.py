"""Model classes from adapter plugins (``mlxfun.core.architectures``) and the model files mlxfun
accepts and writes (``mlxfun.core.model_files``), with an in-process adapter plugin for a
model type mlx-lm lacks (``acme_moe``; its model module is a file written by the test)."""

import json
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import qwen3_moe
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlxfun.core import architectures, model_files, models, nonuniform, slicing, testing
from mlxfun.core.adapter import MoEAdapter
from mlxfun.core.errors import MlxfunError
from mlxfun.core.hookspecs import hookimpl

# A plugin's model module: one file, absolute imports; Qwen3-MoE's classes under a new name.
ACME_SOURCE = '''"""acme_moe: Qwen3-MoE's layout under another model type."""
from dataclasses import dataclass

from mlx_lm.models import qwen3_moe


@dataclass
class ModelArgs(qwen3_moe.ModelArgs):
    pass


class Model(qwen3_moe.Model):
    pass
'''
EVIL = 'open(__file__ + ".RAN", "w").write("ran")\n'
TOKENS = mx.array([[1, 7, 42, 200, 255, 3]])


class AcmePlugin:
    def __init__(self, module: str):
        self.adapter = MoEAdapter(
            name="acme_moe",
            model_types=("acme_moe",),
            description="acme_moe (test): Qwen3-MoE's routing",
            route=lambda block, logits: None,
            model_module=module,
        )

    @hookimpl
    def register_adapters(self, register):
        register(self.adapter)


@pytest.fixture
def modules(tmp_path, monkeypatch):
    """A directory on sys.path for the test's model modules; they are forgotten afterwards."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    before = set(sys.modules)
    yield root
    for name in set(sys.modules) - before:
        if name.startswith("acme"):
            del sys.modules[name]


@pytest.fixture
def acme(modules):
    (modules / "acme_models.py").write_text(ACME_SOURCE)
    with testing.fresh_plugin_state(MLXFUN_LOAD_PLUGINS=""):
        with testing.registered_plugin(AcmePlugin("acme_models"), "acme"):
            yield


@pytest.fixture
def no_plugins():
    with testing.fresh_plugin_state(MLXFUN_LOAD_PLUGINS=""):
        yield


def test_the_adapter_model_module_builds_its_model_type(acme, tmp_path):
    import acme_models

    assert architectures.declared_module({"model_type": "acme_moe"}) == "acme_models"
    assert architectures.model_classes({"model_type": "acme_moe"}) == (
        acme_models.Model,
        acme_models.ModelArgs,
    )
    assert architectures.module_name({"model_type": "acme_moe"}) == "acme_models"
    # mlx-lm's own model types are untouched
    assert architectures.model_classes({"model_type": "qwen3_moe"}) == (
        qwen3_moe.Model,
        qwen3_moe.ModelArgs,
    )
    assert architectures.module_name({"model_type": "qwen3_moe"}) == "mlx_lm.models.qwen3_moe"


def test_a_checkpoint_of_the_new_type_saves_and_loads_through_mlx_lm(acme, tmp_path):
    import acme_models

    path = testing.save_tiny_checkpoint(tmp_path / "m", "acme_moe", seed=2)
    built = testing.build_tiny_model("acme_moe", testing.TINY_ARGS, seed=2)
    loaded, config = models.load_mlx_model(path)
    assert type(loaded) is acme_models.Model and config["model_type"] == "acme_moe"
    assert mx.array_equal(loaded(TOKENS), built(TOKENS)).item()
    skeleton, _ = slicing.model_skeleton(path)
    assert type(skeleton) is acme_models.Model
    # stock mlx-lm's loader, given the same get_model_classes, builds the same model
    stock, _ = mlx_lm_load_model(path, get_model_classes=architectures.model_classes)
    assert mx.array_equal(stock(TOKENS), built(TOKENS)).item()


def test_an_unknown_model_type_names_the_fix(no_plugins):
    with pytest.raises(MlxfunError, match="'acme_moe' is unknown: .*install the plugin"):
        architectures.model_classes({"model_type": "acme_moe"})


@pytest.mark.parametrize(
    "module,match",
    [
        ("acme_missing", "declares model_module='acme_missing', which cannot be imported"),
        ("json", "declares model_module='json', which lacks Model and ModelArgs"),
    ],
)
def test_a_broken_model_module_is_a_one_line_error(modules, module, match):
    with testing.fresh_plugin_state(MLXFUN_LOAD_PLUGINS=""):
        with testing.registered_plugin(AcmePlugin(module), "acme"):
            with pytest.raises(MlxfunError, match=f"adapter 'acme_moe' \\(local\\) {match}"):
                architectures.model_classes({"model_type": "acme_moe"})


# ----- --model-file: the copy, and what the loaders do with it


def copied_output(tmp_path):
    """A checkpoint of acme_moe as prune writes it with --model-file."""
    path = testing.save_tiny_checkpoint(tmp_path / "m", "acme_moe", seed=2)
    config, files = model_files.copy_model_module(json.loads((path / "config.json").read_text()))
    (path / "config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (path / name).write_text(text)
    return path, config, files


def test_the_copy_is_the_module_and_loads_in_stock_mlx_lm(acme, tmp_path):
    path, config, files = copied_output(tmp_path)
    assert config["model_file"] == "acme_models.py"
    assert config["mlxfun"] == {"model_module": "acme_models"}
    assert files == {"acme_models.py": ACME_SOURCE}
    built = testing.build_tiny_model("acme_moe", testing.TINY_ARGS, seed=2)
    stock, _ = mlx_lm_load_model(path, trust_remote_code=True)  # runs the copy
    assert type(stock).__module__ == "custom_model"
    assert mx.array_equal(stock(TOKENS), built(TOKENS)).item()


def test_mlxfun_builds_the_copy_from_the_installed_module_never_the_file(acme, tmp_path):
    import acme_models

    path, _, _ = copied_output(tmp_path)
    (path / "acme_models.py").write_text(EVIL)
    loaded, _ = models.load_mlx_model(path)
    skeleton, _ = slicing.model_skeleton(path)
    assert type(loaded) is type(skeleton) is acme_models.Model
    assert not list(path.glob("*.RAN"))


def test_the_copy_without_its_plugin_is_refused(acme, tmp_path):
    path, _, _ = copied_output(tmp_path)
    (path / "acme_models.py").write_text(EVIL)
    with testing.fresh_plugin_state(MLXFUN_LOAD_PLUGINS=""):
        with pytest.raises(MlxfunError, match="mlxfun's copy of acme_models.*install the plugin"):
            models.load_mlx_model(path)
        with pytest.raises(MlxfunError, match="never runs"):
            slicing.model_skeleton(path)
    # a config naming another installed module than the adapter's is refused as well
    config = json.loads((path / "config.json").read_text())
    config["mlxfun"]["model_module"] = "json"
    with pytest.raises(MlxfunError, match="mlxfun's copy of json"):
        models.model_classes(path, config)
    assert not list(path.glob("*.RAN"))


def test_model_file_refuses_mlx_lm_types(no_plugins):
    with pytest.raises(MlxfunError, match="'qwen3_moe' is built by mlx-lm itself.*drop"):
        model_files.copy_model_module({"model_type": "qwen3_moe"})


def test_a_package_cannot_be_copied(modules):
    (modules / "acme_pkg").mkdir()
    (modules / "acme_pkg" / "__init__.py").write_text(ACME_SOURCE)
    with testing.fresh_plugin_state(MLXFUN_LOAD_PLUGINS=""):
        with testing.registered_plugin(AcmePlugin("acme_pkg"), "pkg"):
            with pytest.raises(MlxfunError, match="one .py file; acme_pkg is a package"):
                model_files.copy_model_module({"model_type": "acme_moe"})


def test_a_relative_import_cannot_be_copied(modules):
    (modules / "acme_rel").mkdir()
    (modules / "acme_rel" / "__init__.py").write_text("")
    (modules / "acme_rel" / "models.py").write_text("from .base import *\n" + ACME_SOURCE)
    (modules / "acme_rel" / "base.py").write_text("")
    with testing.fresh_plugin_state(MLXFUN_LOAD_PLUGINS=""):
        with testing.registered_plugin(AcmePlugin("acme_rel.models"), "rel"):
            with pytest.raises(MlxfunError, match=r"imports from its own package \(.base, line 1"):
                model_files.copy_model_module({"model_type": "acme_moe"})


# ----- non-uniform models of a plugin architecture


def nonuniform_output(tmp_path, counts=(8, 6)):
    """A non-uniform acme_moe checkpoint: every expert of layer i beyond counts[i] dropped."""
    path = testing.save_tiny_checkpoint(tmp_path / "m", "acme_moe", seed=2)
    config = json.loads((path / "config.json").read_text())
    layers = [
        {"layer": i, "module": f"model.layers.{i}", "num_experts": n} for i, n in enumerate(counts)
    ]
    config, source = nonuniform.nonuniform_config(config, ["num_experts"], layers)
    weights = mx.load(str(path / "model.safetensors"))
    for name, value in list(weights.items()):
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if layer is not None and (".switch_mlp." in name or name.endswith("mlp.gate.weight")):
            weights[name] = value[: counts[layer]]
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    (path / "config.json").write_text(json.dumps(config))
    (path / nonuniform.MODEL_FILE).write_text(source)
    return path, config


def test_a_nonuniform_model_wraps_the_plugin_module(acme, tmp_path):
    import acme_models

    path, config = nonuniform_output(tmp_path)
    assert config["mlxfun"]["nonuniform"]["base_module"] == "acme_models"
    for model in (models.load_mlx_model(path)[0], slicing.model_skeleton(path)[0]):
        assert isinstance(model, acme_models.Model)
        assert [layer.mlp.gate.weight.shape[0] for layer in model.layers] == [8, 6]
    loaded, _ = models.load_mlx_model(path)
    stock, _ = mlx_lm_load_model(path, trust_remote_code=True)
    np.testing.assert_array_equal(np.array(stock(TOKENS)), np.array(loaded(TOKENS)))


def test_a_nonuniform_base_module_must_be_the_installed_adapters(acme, tmp_path):
    path, _ = nonuniform_output(tmp_path)
    with testing.fresh_plugin_state(MLXFUN_LOAD_PLUGINS=""):
        with pytest.raises(MlxfunError, match="base_module is 'acme_models', neither"):
            models.load_mlx_model(path)


def test_model_file_copies_the_module_beside_a_nonuniform_model_file(acme, tmp_path, modules):
    path, config = nonuniform_output(tmp_path)
    config, files = model_files.copy_model_module(config)
    assert config["model_file"] == nonuniform.MODEL_FILE
    assert config["mlxfun"]["nonuniform"]["base_file"] == "acme_models.py"
    assert set(files) == {"acme_models.py", nonuniform.MODEL_FILE}
    (path / "config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (path / name).write_text(text)
    loaded, _ = models.load_mlx_model(path)
    # stock mlx-lm runs the model file, which runs the copy, not the installed module
    (modules / "acme_models.py").write_text("raise ImportError('the installed module ran')\n")
    del sys.modules["acme_models"]
    stock, _ = mlx_lm_load_model(path, trust_remote_code=True)
    np.testing.assert_array_equal(np.array(stock(TOKENS)), np.array(loaded(TOKENS)))
