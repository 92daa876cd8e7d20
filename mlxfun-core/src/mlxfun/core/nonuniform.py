"""Models whose MoE layers have different expert counts (model-wide pruning).

Stock mlx-lm builds every MoE layer with the config's one expert count. A non-uniform model
records its counts in config.json::

    "model_file": "mlxfun_nonuniform.py",
    "mlxfun": {"nonuniform": {
        "base_module": "mlx_lm.models.qwen3_moe",
        "num_experts_keys": ["num_experts"],
        "base_num_experts": 8,
        "layers": [{"layer": 0, "module": "model.layers.0", "num_experts": 6}, ...]}}

or, for modules with their own sizes (``mlxfun prune-neurons --last``, ``sizes_config``),
``{"layer": 1, "module": "model.layers.1.mlp", "config": {"intermediate_size": 48}}`` entries
(``num_experts_keys`` empty),
and ships ``mlxfun_nonuniform.py`` (``MODEL_FILE_SOURCE`` below, with the base module filled
in): its ``ModelArgs`` is the architecture's own, remembering the config; its ``Model`` builds the
architecture's own model with ``base_num_experts`` (the config's expert-count keys, set to the
largest count), then, for every other count, builds the architecture's model from the same
config with the expert-count keys set to that count and moves its decoder layers
(``module``) into place. Each MoE layer is therefore exactly what the architecture's module
builds for that count; parameters are created lazily and never evaluated before the weights
replace them.

The base module is mlx-lm's (``mlx_lm.models.<type>``) or, for a plugin's architecture, the
``model_module`` its installed adapter declares (``architectures``). With ``--model-file`` the
plugin's module is also copied beside the file (``"base_file"``), and the file imports that copy.

Stock mlx-lm loads such a directory only with ``trust_remote_code=True``
(``mlx_lm.load(path, trust_remote_code=True)``, ``mlx_lm.generate --trust-remote-code``). The
file imports nothing but its base module. mlxfun itself never runs the file on disk (nor a
copied base file): it builds the model from this template with the installed base module
(``load_module``; ``mlxfun.core.models.load_model``, ``slicing.model_skeleton``) and refuses any
other ``model_file``.
"""

import copy

from .errors import MlxfunError

MODEL_FILE = "mlxfun_nonuniform.py"

MODEL_FILE_SOURCE = '''"""A Mixture-of-Experts model with its own expert count in every MoE layer, written by
mlxfun {version} (model-wide expert pruning).

Each module listed in config.json["mlxfun"]["nonuniform"]["layers"] is built by the
architecture's own module ({base_module}) with the expert count ("num_experts") and the config
values ("config", such as a pruned MLP's intermediate size) recorded for it. Load with
mlx_lm.load(path, trust_remote_code=True) or mlx_lm.generate --trust-remote-code.
"""

import copy
import importlib
import importlib.util
import pathlib

BASE_MODULE = "{base_module}"
# The architecture's module copied beside this file (mlxfun --model-file), or None: import it.
BASE_FILE = {base_file!r}


def _base():
    if BASE_FILE is None:
        return importlib.import_module(BASE_MODULE)
    path = pathlib.Path(__file__).with_name(BASE_FILE)
    spec = importlib.util.spec_from_file_location("mlxfun_base_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


base = _base()


def _get(root, path):
    for part in path.split("."):
        root = root[int(part)] if isinstance(root, (list, tuple)) else getattr(root, part)
    return root


def _put(root, path, value):
    parent_path, _, last = path.rpartition(".")
    parent = _get(root, parent_path) if parent_path else root
    if isinstance(parent, list):
        parent[int(last)] = value
    else:
        setattr(parent, last, value)


def _set_key(config, dotted, value):
    *parents, last = dotted.split(".")
    for part in parents:
        config = config[part]
    config[last] = value


class ModelArgs(base.ModelArgs):
    """The architecture's ModelArgs; it also keeps the config the model was built from."""

    @classmethod
    def from_dict(cls, params):
        args = super().from_dict(params)
        object.__setattr__(args, "mlxfun_config", copy.deepcopy(dict(params)))
        return args


class Model(base.Model):
    def __init__(self, args):
        super().__init__(args)
        config = getattr(args, "mlxfun_config", None)
        if config is None:
            raise ValueError("build this model with ModelArgs.from_dict(config)")
        spec = config["mlxfun"]["nonuniform"]
        built = {{}}
        for layer in spec["layers"]:
            overrides = dict(layer.get("config", {{}}))
            count = layer.get("num_experts", spec["base_num_experts"])
            if count != spec["base_num_experts"]:
                overrides.update({{key: count for key in spec["num_experts_keys"]}})
            if not overrides:
                continue
            name = repr(sorted(overrides.items()))
            if name not in built:
                variant = copy.deepcopy(config)
                variant.pop("model_file", None)
                for key, value in overrides.items():
                    _set_key(variant, key, value)
                built[name] = base.Model(base.ModelArgs.from_dict(variant))
            _put(self, layer["module"], _get(built[name], layer["module"]))
'''


def is_nonuniform(config: dict) -> bool:
    return (
        config.get("model_file") == MODEL_FILE
        and isinstance(config.get("mlxfun"), dict)
        and isinstance(config["mlxfun"].get("nonuniform"), dict)
    )


def get_key(config: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


def set_key(config: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        config = config[part]
    config[last] = value


def present_keys(config: dict, keys) -> list[str]:
    """The adapter's expert-count keys that this config has; if none, the first key whose
    parent exists (mlx-lm then used the architecture's default)."""
    found = [k for k in keys if get_key(config, k) is not None]
    if found:
        return found
    for key in keys:
        parent = key.rpartition(".")[0]
        if not parent or isinstance(get_key(config, parent), dict):
            return [key]
    raise MlxfunError(f"the config has none of the expert-count keys {', '.join(keys)}")


def base_module(config: dict) -> str:
    """The module that builds this config: an installed adapter's ``model_module``, else
    mlx-lm's (after mlx-lm's model-type remappings)."""
    from . import architectures

    # The module mlx-lm imports; it may take Model from another module (solar_open: glm4_moe).
    return architectures.module_name(config)


def model_file_source(base: str, base_file: str | None = None) -> str:
    from . import __version__

    return MODEL_FILE_SOURCE.format(base_module=base, base_file=base_file, version=__version__)


def uniform_config(config: dict, keys: list[str], count: int) -> dict:
    """The config of a uniformly pruned model: every expert-count key set to ``count``."""
    config = copy.deepcopy(config)
    config.pop("model_file", None)
    if isinstance(config.get("mlxfun"), dict):
        config["mlxfun"].pop("nonuniform", None)
        config["mlxfun"].pop("model_module", None)  # a copied model module (--model-file)
        if not config["mlxfun"]:
            config.pop("mlxfun")
    for key in keys:
        set_key(config, key, count)
    return config


def nonuniform_config(config: dict, keys: list[str], layers: list[dict]) -> tuple[dict, str]:
    """``(config, model file source)`` for per-layer counts ``layers`` (dicts with ``layer``,
    ``module`` and ``num_experts``). The expert-count keys hold the largest count."""
    base = base_module(config)
    largest = max(layer["num_experts"] for layer in layers)
    config = uniform_config(config, keys, largest)
    config["model_file"] = MODEL_FILE
    config.setdefault("mlxfun", {})["nonuniform"] = {
        "base_module": base,
        "num_experts_keys": list(keys),
        "base_num_experts": largest,
        "layers": [dict(layer) for layer in layers],
    }
    return config, model_file_source(base)


def sizes_config(config: dict, modules: list[dict]) -> tuple[dict, str]:
    """``(config, model file source)`` for modules built with their own config values
    (``modules``: dicts with ``layer``, ``module`` (its path) and ``config``, such as
    ``{"intermediate_size": 48}`` for an MLP with fewer neurons); the config keeps its values
    for every other module."""
    if is_nonuniform(config):
        raise MlxfunError(
            "this model already has per-layer expert counts or sizes (mlxfun_nonuniform.py); "
            "giving its modules other sizes as well is not supported: start from its source model"
        )
    base = base_module(config)
    config = uniform_config(config, [], 0)
    config["model_file"] = MODEL_FILE
    config.setdefault("mlxfun", {})["nonuniform"] = {
        "base_module": base,
        "num_experts_keys": [],
        "base_num_experts": None,
        "layers": [dict(module) for module in modules],
    }
    return config, model_file_source(base)


def load_module(config: dict):
    """The model file's module, from mlxfun's own template and the installed base module (never
    a file from disk)."""
    import re
    import types

    from . import architectures

    base = config["mlxfun"]["nonuniform"].get("base_module")
    # The name is pasted into the template's source and imported: only mlx-lm's own modules
    # and the model module that the installed adapter of this model type declares.
    mlx_lm_module = isinstance(base, str) and re.fullmatch(
        r"mlx_lm\.models\.[A-Za-z_][A-Za-z0-9_]*", base
    )
    if not mlx_lm_module and (base is None or base != architectures.declared_module(config)):
        raise MlxfunError(
            f"config.json mlxfun.nonuniform.base_module is {base!r}, neither an mlx-lm model "
            "module (mlx_lm.models.NAME) nor the model_module of the installed adapter for "
            f"model type {config.get('model_type')!r}; install the plugin that provides it, or "
            "restore the config mlxfun wrote"
        )
    # imported here first (light: see mlxlm_models), so that the template's own import of it
    # finds it in sys.modules
    architectures.import_model_module(base)
    module = types.ModuleType("mlxfun_nonuniform_model")
    exec(compile(model_file_source(base), MODEL_FILE, "exec"), module.__dict__)
    return module


def build_model(config: dict):
    """A non-uniform model's module tree (parameters lazy, unloaded), as its model file
    builds it."""
    module = load_module(config)
    return module.Model(module.ModelArgs.from_dict(config))
