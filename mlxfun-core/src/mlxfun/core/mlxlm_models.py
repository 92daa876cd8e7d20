"""mlx-lm's model classes without mlx-lm's package start-up.

Importing any ``mlx_lm.models.<type>`` runs ``mlx_lm/__init__.py`` first, which imports mlx-lm's
converter, generator and loaders and through them transformers (~3 s). Building a model's module
tree from its config needs none of that. ``model_module`` imports the model module under a bare
stand-in for the package (the real package's ``__path__``, its ``__init__`` not run) and takes
the stand-in out of ``sys.modules`` again, so a later ``import mlx_lm`` runs the real
``__init__`` as usual and finds the model modules already imported: the same module objects, the
same classes. ``_BindSubmodules`` then sets the submodules imported before it (``models``) as
attributes of the real package, as an ordinary import would have.

Only code that builds models from config (``architectures``: ``slicing.model_skeleton``,
``nonuniform``, plugins' model modules) goes through here; mlx-lm's loaders, tokenizers and generation are imported as usual where needed.
"""

import importlib
import importlib.util
import json
import sys
import threading
from pathlib import Path

PACKAGE = "mlx_lm"

# mlx_lm.utils.MODEL_REMAPPING / MODEL_ARCHITECTURE_REMAPPING as of mlx-lm 0.32 (mlx_lm.utils
# imports transformers); the tests check them against the installed mlx-lm. A model type whose
# module these tables do not find goes to mlx-lm's own lookup (``model_classes``).
MODEL_REMAPPING = {
    "mistral": "llama",
    "llava": "mistral3",
    "phi-msft": "phixtral",
    "falcon_mamba": "mamba",
    "joyai_llm_flash": "deepseek_v3",
    "kimi_k2": "deepseek_v3",
    "qwen2_5_vl": "qwen2_vl",
    "minimax_m2": "minimax",
    "iquestcoder": "llama",
    "xverse": "llama",
    "gemma4_unified": "gemma4",
    "deepseek_v41_text": "deepseek_v41",
}
MODEL_ARCHITECTURE_REMAPPING = {
    ("bailing_hybrid", "BailingMoeV3ForCausalLM"): "bailing_moe_v3",
}


def module_name(config: dict) -> str:
    """The ``mlx_lm.models`` module that builds ``config``, after mlx-lm's remappings (as
    ``mlx_lm.utils._get_classes`` picks it)."""
    model_type = config["model_type"]
    architectures = config.get("architectures") or ()
    if isinstance(architectures, str):
        architectures = (architectures,)
    for architecture in architectures:
        remapped = MODEL_ARCHITECTURE_REMAPPING.get((model_type, architecture))
        if remapped is not None:
            return remapped
    return MODEL_REMAPPING.get(model_type, model_type)


def load_config(model_dir) -> dict:
    """config.json as ``mlx_lm.utils.load_config`` reads it: non-finite floats tagged by
    transformers (``{"__float__": "Infinity"}``) decoded, ``eos_token_id`` from
    generation_config.json. Missing or broken files give mlxfun's one-line errors."""
    from .config import read_config

    config = _decode_floats(read_config(model_dir))
    try:
        generation = json.loads((Path(model_dir) / "generation_config.json").read_text())
    except (OSError, ValueError):
        generation = {}
    if isinstance(generation, dict) and (eos := generation.get("eos_token_id", False)):
        config["eos_token_id"] = eos
    return config


_FLOAT_TAGS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def _decode_floats(value):
    if isinstance(value, dict):
        if set(value) == {"__float__"} and value["__float__"] in _FLOAT_TAGS:
            return _FLOAT_TAGS[value["__float__"]]
        return {k: _decode_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_floats(v) for v in value]
    return value


def model_classes(config: dict) -> tuple[type, type]:
    """``(Model, ModelArgs)`` for ``config``, as ``mlx_lm.utils._get_classes`` returns them,
    without importing mlx-lm's loaders. Raises ``ValueError`` for a model type mlx-lm lacks."""
    try:
        module = model_module(module_name(config))
    except ImportError:
        # Not where the tables above point: mlx-lm's own lookup decides (and words the error).
        from mlx_lm.utils import _get_classes

        return tuple(_get_classes(config))
    return module.Model, module.ModelArgs


def model_module(name: str):
    """The module ``mlx_lm.models.<name>``. When mlx-lm is not imported yet, it is imported
    without running ``mlx_lm/__init__.py`` (see the module docstring)."""
    return import_light(f"{PACKAGE}.models.{name}")


def import_light(full: str):
    """Import the module ``full``, an mlx-lm model module or a plugin's model module built from
    mlx-lm's (``mlx_lm.models.base``, ``switch_layers``, ...), without running
    ``mlx_lm/__init__.py`` when mlx-lm is not imported yet (see the module docstring)."""
    if full in sys.modules:
        return sys.modules[full]
    # With other threads running, one of them could import mlx_lm while the bare package
    # stands in for it and keep the stand-in: take the ordinary (slower) import then.
    if PACKAGE in sys.modules or threading.active_count() > 1:
        return importlib.import_module(full)
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {PACKAGE!r}", name=PACKAGE)
    bare = importlib.util.module_from_spec(spec)  # __path__, __spec__ etc.; nothing executed
    if _BindSubmodules in sys.meta_path:
        sys.meta_path.remove(_BindSubmodules)
    sys.modules[PACKAGE] = bare
    try:
        return importlib.import_module(full)
    finally:
        if sys.modules.get(PACKAGE) is bare:
            del sys.modules[PACKAGE]
        sys.meta_path.insert(0, _BindSubmodules)


class _BindSubmodules:
    """Import hook in place after a bare import until the real ``mlx_lm`` is imported. The real
    package's ``__init__`` imports submodules (``mlx_lm._version`` first); at the first of those
    imports the hook sets the submodules imported under the bare package as the real package's
    attributes (``mlx_lm.models``), then removes itself. It never finds a module itself."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        package = sys.modules.get(PACKAGE)
        if package is not None and name.startswith(PACKAGE + "."):
            if cls in sys.meta_path:
                sys.meta_path.remove(cls)
            for full, module in list(sys.modules.items()):
                parent, _, child = full.rpartition(".")
                if parent == PACKAGE and module is not None and child not in vars(package):
                    setattr(package, child, module)
        return None
