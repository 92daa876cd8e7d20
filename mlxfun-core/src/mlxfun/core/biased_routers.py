"""Models whose routers carry a bias their architecture does not have (``mlxfun amplify`` on
routers without a correction bias or a Linear bias).

Stock mlx-lm loads checkpoints strictly: a ``<router>.bias`` tensor for a Linear built without
one is refused. Such an output records the routers in config.json::

    "model_file": "mlxfun_router_bias.py",
    "mlxfun": {"router_bias": {"base_module": "mlx_lm.models.qwen3_moe",
                               "routers": ["model.layers.0.mlp.gate", ...]}}

and ships ``mlxfun_router_bias.py`` (``MODEL_FILE_SOURCE``): its ``Model`` is the
architecture's own, with a zero ``bias`` added to each listed router (an ``nn.Linear`` adds its
``bias`` when it has one, and ``nn.quantize`` keeps it in the ``QuantizedLinear``), so the
checkpoint's bias tensors load into it.

A router that is a raw weight array inside a gate module (deepseek, deepseek_v2: the gate
computes ``x @ self.weight.T`` and routes on it) is listed under ``"gates"`` instead: the gate
module gets the ``bias`` and a subclass (``GATE_SOURCE``, also ``bias_gate`` in memory) whose
call hands the gate's own code an input whose ``@`` adds the bias to the logits it forms, so the
gate's routing (softmax, group-limited selection, scaling) runs unchanged on the biased logits:
the place and the operations where run-time steering adds it (``MoEAdapter.router_logits``,
which adds a biased gate's ``bias`` as well). Stock mlx-lm needs ``trust_remote_code=True``; mlxfun
builds the model from this template and the installed base module, never from the file.
"""

import types

from .errors import MlxfunError

MODEL_FILE = "mlxfun_router_bias.py"
KEY = "router_bias"

# The biased gate: shared by the model file and ``bias_gate`` (one source, run in both).
GATE_SOURCE = '''
class _BiasedInput:
    """A gate's input whose ``@`` (the gate's ``x @ self.weight.T``) adds the gate's bias to
    the logits; anything else reads the input itself."""

    def __init__(self, x, bias):
        self.x, self.bias, self.used = x, bias, False

    def __getattr__(self, name):
        return getattr(self.x, name)

    def __matmul__(self, weight):
        self.used = True
        logits = self.x @ weight
        return logits + self.bias.astype(logits.dtype)


_BIASED_GATES = {}


def _biased_gate_class(cls):
    if getattr(cls, "_mlxfun_gate_bias", False):
        return cls
    if cls not in _BIASED_GATES:

        def __call__(self, x, *args, **kwargs):
            biased = _BiasedInput(x, self.bias)
            out = cls.__call__(self, biased, *args, **kwargs)
            if not biased.used:
                raise RuntimeError(
                    f"{cls.__name__} did not form its logits as x @ weight; this model file "
                    "does not fit the installed mlx-lm"
                )
            return out

        _BIASED_GATES[cls] = type(
            cls.__name__, (cls,), {"__call__": __call__, "_mlxfun_gate_bias": True}
        )
    return _BIASED_GATES[cls]


def bias_gate(gate, bias):
    """Give ``gate`` (a module holding a raw router ``weight``) the ``bias`` on its logits."""
    gate.bias = bias
    gate.__class__ = _biased_gate_class(type(gate))
'''

MODEL_FILE_SOURCE = '''"""A Mixture-of-Experts model whose routers add a per-expert bias to their logits, written
by mlxfun {version} (mlxfun amplify).

The architecture's own module ({base_module}) builds the model; the routers listed in
config.json["mlxfun"]["router_bias"]["routers"] get a bias, which the checkpoint holds, and the
gates listed in ["gates"] (a raw router weight inside a gate module) add their bias to the
logits they form. Load with mlx_lm.load(path, trust_remote_code=True) or mlx_lm.generate
--trust-remote-code.
"""

import copy
import importlib

import mlx.core as mx

base = importlib.import_module("{base_module}")


def _get(root, path):
    for part in path.split("."):
        root = root[int(part)] if isinstance(root, (list, tuple)) else getattr(root, part)
    return root

{gate_source}

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
        recorded = config["mlxfun"]["router_bias"]
        for path in recorded["routers"]:
            router = _get(self, path)
            router.bias = mx.zeros((router.weight.shape[0],), dtype=router.weight.dtype)
        for path in recorded.get("gates", []):
            gate = _get(self, path)
            bias_gate(gate, mx.zeros((gate.weight.shape[0],), dtype=gate.weight.dtype))
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

    return MODEL_FILE_SOURCE.format(base_module=base, version=__version__, gate_source=GATE_SOURCE)


_gate_namespace: dict = {}


def bias_gate(gate, bias) -> None:
    """Give a gate module that holds a raw router ``weight`` a ``bias`` on its logits, in
    memory, with the model file's code (``GATE_SOURCE``)."""
    if not _gate_namespace:
        exec(compile(GATE_SOURCE, MODEL_FILE, "exec"), _gate_namespace)
    _gate_namespace["bias_gate"](gate, bias)


def biased_config(config: dict, base: str, routers: list[str], gates: list[str] = ()) -> dict:
    """The output's config: the model file, the router Linears and the gates (raw router
    arrays) that carry a bias."""
    config = dict(config)
    config["model_file"] = MODEL_FILE
    recorded = {"base_module": base, "routers": list(routers)}
    if gates:
        recorded["gates"] = list(gates)
    config["mlxfun"] = dict(config.get("mlxfun") or {}, **{KEY: recorded})
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
