"""Which Python module builds a model type: an installed adapter's ``model_module``, else
mlx-lm's own.

A plugin adds an architecture that mlx-lm lacks by declaring on its adapter
``model_module="package.module"``: a module exposing ``Model`` and ``ModelArgs`` as mlx-lm's
``mlx_lm.models.<type>`` modules do. Everything in mlxfun that builds a model from a config asks
here (``models.load_mlx_model`` passes ``model_classes`` to mlx-lm's ``load_model`` as its
``get_model_classes``; ``slicing.model_skeleton``, ``nonuniform`` and the testing kit's tiny
models too). The installed adapters are consulted first, through the plugin manager, then
mlx-lm's modules. Nothing is written into mlx-lm's package and nothing is patched, so a plugin
works the same installed regularly or editable. A ``model_file`` in config.json is the
loaders' business (``models.model_classes``); this module never looks at one.
"""

import importlib

from .errors import MlxfunError


def _adapter_info(config: dict):
    """The registered adapter (``PluginInfo``) whose ``matches`` accepts ``config``, or None."""
    from . import plugins

    for info in plugins.registry()["adapter"].values():
        if info.obj.matches(config):
            return info
    return None


def declared_module(config: dict) -> str | None:
    """The ``model_module`` that the installed adapter of ``config`` declares, or None (then
    mlx-lm builds the model)."""
    info = _adapter_info(config)
    return getattr(info.obj, "model_module", None) if info is not None else None


def module_name(config: dict) -> str:
    """The dotted name of the module that builds ``config``: the adapter's ``model_module``,
    else mlx-lm's (after mlx-lm's model-type remappings)."""
    from . import mlxlm_models

    declared = declared_module(config)
    if declared is not None:
        return declared
    return f"{mlxlm_models.PACKAGE}.models.{mlxlm_models.module_name(config)}"


def import_model_module(name: str, declared_by: str = ""):
    """Import the model module ``name`` (light: without mlx-lm's start-up, see ``mlxlm_models``)
    and check that it exposes ``Model`` and ``ModelArgs``."""
    from . import mlxlm_models

    who = (
        f"{declared_by} declares model_module={name!r}" if declared_by else f"model module {name!r}"
    )
    try:
        module = mlxlm_models.import_light(name)
    except ImportError as exc:
        raise MlxfunError(
            f"{who}, which cannot be imported ({type(exc).__name__}: {exc}); install the package "
            "that provides it"
        ) from None
    missing = [attr for attr in ("Model", "ModelArgs") if not hasattr(module, attr)]
    if missing:
        raise MlxfunError(
            f"{who}, which lacks {' and '.join(missing)}: a model module defines Model and "
            "ModelArgs as mlx-lm's mlx_lm.models.<type> modules do"
        )
    return module


def _declared_module(config: dict):
    """The installed adapter's model module for ``config``, imported, or None."""
    info = _adapter_info(config)
    name = getattr(info.obj, "model_module", None) if info is not None else None
    if name is None:
        return None
    return import_model_module(name, f"adapter {info.name!r} ({info.distribution})")


def model_module(config: dict):
    """The module that builds ``config`` (``module_name``), imported."""
    from . import mlxlm_models

    module = _declared_module(config)
    if module is not None:
        return module
    try:
        # the module mlx-lm imports (solar_open's takes its Model from glm4_moe)
        return mlxlm_models.model_module(mlxlm_models.module_name(config))
    except ImportError:
        model_class, _ = model_classes(config)  # mlx-lm's own lookup, or the one-line error
        return importlib.import_module(model_class.__module__)


def model_classes(config: dict) -> tuple[type, type]:
    """``(Model, ModelArgs)`` for ``config``: the installed adapter's ``model_module``, else
    mlx-lm's (``mlx_lm.utils._get_classes``'s choice). Usable as the ``get_model_classes`` of
    ``mlx_lm.utils.load_model``. A model type that neither knows is a one-line error."""
    from . import mlxlm_models

    module = _declared_module(config)
    if module is not None:
        return module.Model, module.ModelArgs
    try:
        return mlxlm_models.model_classes(config)
    except ValueError:
        raise MlxfunError(
            f"model type {config.get('model_type')!r} is unknown: mlx-lm has no such model and "
            "no installed adapter declares a model_module for it; install the plugin that adds "
            "it (mlxfun plugins --kind adapter lists the installed adapters)"
        ) from None
