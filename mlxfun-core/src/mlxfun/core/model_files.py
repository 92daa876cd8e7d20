"""A model directory's ``model_file``: the ones mlxfun accepts, and the copy of a plugin's model
module that ``--model-file`` writes.

mlxfun never runs a model directory's Python. It accepts two kinds of ``model_file``, both
written by mlxfun, and builds each from code that is installed, never from the file:

- ``mlxfun_nonuniform.py`` (``nonuniform``): from mlxfun's template and the installed base
  module;
- ``mlxfun_router_bias.py`` (``biased_routers``, ``mlxfun amplify``): likewise;
- a copy of a plugin's model module (config ``"mlxfun": {"model_module": "package.module"}``):
  from that module as installed, when the installed adapter of the config's model type
  declares it (``architectures``).

Any other ``model_file`` is refused.

``copy_model_module`` (``mlxfun prune --model-file``, ``mlxfun merge --model-file``) copies the
installed plugin's model module into an output as its ``model_file``, so that stock
``mlx_lm.load(path, trust_remote_code=True)`` loads the output without mlxfun or the plugin. The
copy is a snapshot (it does not get the plugin's later fixes) and must be a single file that
imports only absolute names: mlx-lm runs it alone, outside its package.
"""

import ast
from pathlib import Path

from . import architectures, biased_routers, nonuniform
from .errors import MlxfunError

MODULE_KEY = "model_module"  # config["mlxfun"][MODULE_KEY]: the module a model_file copies


def copied_module(config: dict) -> str | None:
    """The model module whose copy is the config's ``model_file`` (mlxfun wrote it), or None."""
    recorded = config.get("mlxfun")
    return recorded.get(MODULE_KEY) if isinstance(recorded, dict) else None


def model_classes(model_dir, config: dict) -> tuple[type, type]:
    """``(Model, ModelArgs)`` that build ``config``, what every mlxfun load uses: for a
    ``model_file`` mlxfun wrote, from the installed code it stands for
    (``model_file_classes``; any other ``model_file`` is refused), else the installed adapter's
    ``model_module`` or mlx-lm's module (``architectures``)."""
    if config.get("model_file") is not None:
        return model_file_classes(model_dir, config)
    return architectures.model_classes(config)


def model_file_classes(model_dir, config: dict) -> tuple[type, type]:
    """``(Model, ModelArgs)`` for a config with a ``model_file``, from installed code only."""
    model_file = config["model_file"]
    if nonuniform.is_nonuniform(config):
        module = nonuniform.load_module(config)
        return module.Model, module.ModelArgs
    if biased_routers.has_router_biases(config):
        module = biased_routers.load_module(config)
        return module.Model, module.ModelArgs
    copied = copied_module(config)
    if copied is None:
        raise MlxfunError(
            f"{model_dir} builds its architecture from its own Python file model_file="
            f"{model_file!r}; mlxfun never runs a model directory's code and only knows the "
            f"model files it writes ({nonuniform.MODEL_FILE}, copies of installed plugins' model "
            "modules): use a model that mlx-lm or an installed adapter plugin builds"
        )
    if copied != architectures.declared_module(config):
        raise MlxfunError(
            f"{model_dir}'s model_file {model_file!r} is mlxfun's copy of {copied}, and no "
            f"installed adapter for model type {config.get('model_type')!r} declares that "
            "module; mlxfun never runs a model directory's code: install the plugin that "
            "provides it (stock mlx-lm loads the copy: mlx_lm.load(path, trust_remote_code=True))"
        )
    module = architectures.model_module(config)
    return module.Model, module.ModelArgs


def copy_model_module(config: dict) -> tuple[dict, dict[str, str]]:
    """``(config, files)`` of an output (its config, written by mlxfun) with the installed
    plugin's model module copied in as its ``model_file``; ``files`` maps file names to the
    text to write beside config.json. A non-uniform config keeps ``mlxfun_nonuniform.py`` as its
    model file, which then imports the copy (``"base_file"``)."""
    name = architectures.declared_module(config)
    if name is None:
        raise MlxfunError(
            f"--model-file copies a plugin's model module, and model type "
            f"{config.get('model_type')!r} is built by mlx-lm itself, which loads the output "
            "without one: drop --model-file"
        )
    path = _single_file(name, architectures.import_model_module(name))
    source = path.read_text()
    config = dict(config)
    if nonuniform.is_nonuniform(config):
        spec = dict(config["mlxfun"]["nonuniform"], base_file=path.name)
        config["mlxfun"] = dict(config["mlxfun"], nonuniform=spec)
        model_file = nonuniform.model_file_source(spec["base_module"], path.name)
        return config, {path.name: source, nonuniform.MODEL_FILE: model_file}
    config["model_file"] = path.name
    config["mlxfun"] = dict(config.get("mlxfun") or {}, **{MODULE_KEY: name})
    return config, {path.name: source}


def _single_file(name: str, module) -> Path:
    """The module's source file, once it is one file that mlx-lm can run on its own."""
    path = Path(getattr(module, "__file__", None) or "")
    if path.suffix != ".py" or path.name == "__init__.py":
        raise MlxfunError(
            f"--model-file needs a model module that is one .py file; {name} is "
            f"{'a package' if path.name == '__init__.py' else 'not a Python source file'}"
        )
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            raise MlxfunError(
                f"--model-file: {name} imports from its own package ({'.' * node.level}"
                f"{node.module or ''}, line {node.lineno}); mlx-lm runs a model_file alone, so "
                "copy only a module that imports absolute names (mlx_lm.models.base, ...)"
            )
    return path
