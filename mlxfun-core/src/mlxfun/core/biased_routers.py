"""Models whose router Linears carry a bias their architecture does not have (``mlxfun
amplify`` on routers without a correction bias or a Linear bias).

Stock mlx-lm loads checkpoints strictly: a ``<router>.bias`` tensor for a Linear built without
one is refused. Such an output records the routers in config.json::

    "model_file": "mlxfun_router_bias.py",
    "mlxfun": {"router_bias": {"base_module": "mlx_lm.models.qwen3_moe",
                               "routers": ["model.layers.0.mlp.gate", ...]}}

and ships ``mlxfun_router_bias.py`` (``MODEL_FILE_SOURCE``): its ``Model`` is the
architecture's own, with a zero ``bias`` added to each listed router (an ``nn.Linear`` adds its
``bias`` when it has one, and ``nn.quantize`` keeps it in the ``QuantizedLinear``), so the
checkpoint's bias tensors load into it. Stock mlx-lm needs ``trust_remote_code=True``; mlxfun
builds the model from this template and the installed base module, never from the file.
"""

import types

from .errors import MlxfunError

MODEL_FILE = "mlxfun_router_bias.py"
KEY = "router_bias"

MODEL_FILE_SOURCE = '''"""A Mixture-of-Experts model whose routers add a per-expert bias to their logits, written
by mlxfun {version} (mlxfun amplify).

The architecture's own module ({base_module}) builds the model; the routers listed in
config.json["mlxfun"]["router_bias"]["routers"] get a bias, which the checkpoint holds. Load
with mlx_lm.load(path, trust_remote_code=True) or mlx_lm.generate --trust-remote-code.
"""

import copy
import importlib

import mlx.core as mx

base = importlib.import_module("{base_module}")


def _get(root, path):
    for part in path.split("."):
        root = root[int(part)] if isinstance(root, (list, tuple)) else getattr(root, part)
    return root


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
        for path in config["mlxfun"]["router_bias"]["routers"]:
            router = _get(self, path)
            router.bias = mx.zeros((router.weight.shape[0],), dtype=router.weight.dtype)
'''


def has_router_biases(config: dict) -> bool:
    recorded = config.get("mlxfun")
    return (
        config.get("model_file") == MODEL_FILE
        and isinstance(recorded, dict)
        and isinstance(recorded.get(KEY), dict)
    )


def model_file_source(base: str) -> str:
    from . import __version__

    return MODEL_FILE_SOURCE.format(base_module=base, version=__version__)


def biased_config(config: dict, base: str, routers: list[str]) -> dict:
    """The output's config: the model file and the routers that carry a bias."""
    config = dict(config)
    config["model_file"] = MODEL_FILE
    config["mlxfun"] = dict(
        config.get("mlxfun") or {}, **{KEY: {"base_module": base, "routers": list(routers)}}
    )
    return config


def load_module(config: dict):
    """The model file's module, from this template and the installed base module."""
    import re

    from . import architectures

    base = config["mlxfun"][KEY].get("base_module")
    known = isinstance(base, str) and re.fullmatch(r"mlx_lm\.models\.[A-Za-z_][A-Za-z0-9_]*", base)
    if not known and (base is None or base != architectures.declared_module(config)):
        raise MlxfunError(
            f"config.json mlxfun.{KEY}.base_module is {base!r}, neither an mlx-lm model module "
            "nor the model_module of the installed adapter for this model type; restore the "
            "config mlxfun wrote"
        )
    architectures.import_model_module(base)
    module = types.ModuleType("mlxfun_router_bias_model")
    exec(compile(model_file_source(base), MODEL_FILE, "exec"), module.__dict__)
    return module
