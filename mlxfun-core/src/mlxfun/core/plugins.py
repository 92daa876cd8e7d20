"""The plugin manager: loads the ``mlxfun`` entry points and keeps a registry per plugin kind.

Built-in plugins (mlxfun-adapters, mlxfun-methods) are found through the same entry points as
third-party ones. Environment switches:

- ``MLXFUN_LOAD_PLUGINS=dist1,dist2``: load only these distributions ("" loads none).
- ``MLXFUN_STRICT_PLUGINS=1``: a plugin that fails to load is an error, not a warning.
- ``MLXFUN_TRACE_PLUGINS=1``: print every hook call to stderr.
"""

import functools
import importlib.metadata
import os
import re
import sys

import attrs
import pluggy

from . import hookspecs
from .errors import MlxfunError
from .types import KINDS, REQUIRED_ATTRIBUTES, PluginInfo

ENTRY_POINT_GROUP = "mlxfun"
HOOK_FOR_KIND = {kind: f"register_{kind}s" for kind in KINDS}

pm = pluggy.PluginManager("mlxfun")
pm.add_hookspecs(hookspecs)

_loaded = False
_load_failures: list[PluginInfo] = []
_plugin_dists: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
_registry: dict[str, dict[str, PluginInfo]] | None = None
_registry_failures: list[PluginInfo] = []
_untrace = None  # undoes MLXFUN_TRACE_PLUGINS tracing
_used: dict[
    tuple[str, str], PluginInfo
] = {}  # plugins handed out by get_plugin / adapter_for_config


def _normalize(dist_name: str) -> str:
    return re.sub(r"[-_.]+", "-", dist_name).lower()


def _warn(message: str) -> None:
    print(f"mlxfun: warning: {message}", file=sys.stderr)


def _fail(failure: PluginInfo, failures: list[PluginInfo]) -> None:
    if os.environ.get("MLXFUN_STRICT_PLUGINS") == "1":
        raise MlxfunError(f"plugin {failure.name!r} from {failure.distribution}: {failure.error}")
    failures.append(failure)
    _warn(f"skipped plugin {failure.name!r} from {failure.distribution}: {failure.error}")


def load_plugins() -> None:
    """Load every ``mlxfun`` entry point once; a failing one is reported and skipped."""
    global _loaded, _untrace
    if _loaded:
        return
    _loaded = True
    if os.environ.get("MLXFUN_TRACE_PLUGINS") == "1":
        pm.trace.root.setwriter(lambda text: print(text, end="", file=sys.stderr))
        _untrace = pm.enable_tracing()
    only = os.environ.get("MLXFUN_LOAD_PLUGINS")
    allowed = (
        None if only is None else {_normalize(d.strip()) for d in only.split(",") if d.strip()}
    )
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist
        dist_name = dist.name if dist else "unknown"
        version = dist.version if dist else "unknown"
        if allowed is not None and _normalize(dist_name) not in allowed:
            continue
        _load_entry_point(entry_point, dist_name, version)


def _load_entry_point(entry_point, dist_name: str, version: str) -> None:
    failure = PluginInfo("plugin", entry_point.name, "", dist_name, version, error="")
    if pm.has_plugin(entry_point.name):
        owner = _plugin_dists[entry_point.name][0]
        error = f"entry point name {entry_point.name!r} is already used by {owner}; rename it"
        _fail(attrs.evolve(failure, error=error), _load_failures)
        return
    try:
        module = entry_point.load()
        pm.register(module, name=entry_point.name)
    except Exception as exc:  # a broken plugin must not break mlxfun
        _fail(attrs.evolve(failure, error=f"{type(exc).__name__}: {exc}"), _load_failures)
        return
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        pm.unregister(name=entry_point.name)
        _fail(attrs.evolve(failure, error=f"unknown hook: {exc}"), _load_failures)
        return
    _plugin_dists[entry_point.name] = (dist_name, version)


def register_plugin(plugin, name: str, distribution: str = "local", version: str = "0") -> None:
    """Register an in-process plugin (a module or object with hookimpls); used by tests."""
    load_plugins()
    pm.register(plugin, name=name)
    pm.check_pending()
    _plugin_dists[name] = (distribution, version)
    _reset_registry()


def unregister_plugin(name: str) -> None:
    pm.unregister(name=name)
    _plugin_dists.pop(name, None)
    _reset_registry()


def reset() -> None:
    """Forget every loaded plugin and failure; the next lookup loads the entry points again.

    For tests that load plugins under other ``MLXFUN_*`` settings (``mlxfun.core.testing``).
    """
    global _loaded, _untrace
    for name, _ in pm.list_name_plugin():
        pm.unregister(name=name)
    if _untrace is not None:
        _untrace()
        _untrace = None
    _loaded = False
    _load_failures.clear()
    _plugin_dists.clear()
    _used.clear()
    _reset_registry()


def _reset_registry() -> None:
    global _registry
    _registry = None
    _registry_failures.clear()


def _build_registry() -> dict[str, dict[str, PluginInfo]]:
    registry: dict[str, dict[str, PluginInfo]] = {kind: {} for kind in KINDS}
    for kind in KINDS:
        hook_name = HOOK_FOR_KIND[kind]
        impls = getattr(pm.hook, hook_name).get_hookimpls()  # in registration order
        for impl in impls:
            dist, version = _plugin_dists.get(impl.plugin_name, ("unknown", "unknown"))
            found: list = []
            # One plugin at a time, so a failure names its plugin; through pm (not
            # impl.function) so MLXFUN_TRACE_PLUGINS shows the call.
            others = [other.plugin for other in impls if other is not impl]
            try:
                pm.subset_hook_caller(hook_name, others)(register=found.append)
            except Exception as exc:
                error = f"{hook_name} raised {type(exc).__name__}: {exc}"
                _fail(
                    PluginInfo(kind, impl.plugin_name, "", dist, version, error=error),
                    _registry_failures,
                )
                continue
            for obj in found:
                _add(registry[kind], kind, obj, dist, version)
    return registry


def _add(by_name: dict, kind: str, obj, dist: str, version: str) -> None:
    name = getattr(obj, "name", None)
    missing = [
        a for a in ("name", "description", *REQUIRED_ATTRIBUTES[kind]) if not hasattr(obj, a)
    ]
    if missing or not isinstance(name, str):
        error = f"{kind} object {obj!r} lacks {', '.join(missing) or 'a string name'}"
        _fail(PluginInfo(kind, str(name), "", dist, version, error=error), _registry_failures)
        return
    if name in by_name:
        first = by_name[name]
        error = f"{kind} {name!r} is already registered by {first.distribution}; kept that one"
        _fail(
            PluginInfo(kind, name, obj.description, dist, version, error=error), _registry_failures
        )
        return
    by_name[name] = PluginInfo(kind, name, obj.description, dist, version, obj=obj)


def registry() -> dict[str, dict[str, PluginInfo]]:
    global _registry
    load_plugins()
    if _registry is None:
        _registry = _build_registry()
    return _registry


def failures() -> list[PluginInfo]:
    """Plugins that failed to load or register, with their errors."""
    registry()
    return [*_load_failures, *_registry_failures]


def all_plugins() -> list[PluginInfo]:
    """Every registered plugin object, then every failure."""
    found = [info for kind in KINDS for info in registry()[kind].values()]
    return found + failures()


def plugin_names(kind: str) -> list[str]:
    return sorted(registry()[kind])


def get_plugin(kind: str, name: str):
    by_name = registry()[kind]
    if name not in by_name:
        known = ", ".join(sorted(by_name)) or "none installed"
        raise MlxfunError(f"unknown {kind} {name!r}; known {kind}s: {known}")
    _used[kind, name] = by_name[name]
    return by_name[name].obj


def get_adapter(name: str):
    return get_plugin("adapter", name)


def get_scorer(name: str):
    return get_plugin("scorer", name)


def get_selector(name: str):
    return get_plugin("selector", name)


def get_compressor(name: str):
    return get_plugin("compressor", name)


def get_intervention(name: str):
    return get_plugin("intervention", name)


def get_neuron_scorer(name: str):
    return get_plugin("neuron_scorer", name)


def adapter_for_config(config: dict):
    """The adapter for a model's config.json, or a one-line error listing what is supported."""
    model_type = config.get("model_type")
    adapters = registry()["adapter"].values()
    for info in adapters:
        if info.obj.matches(config):
            _used["adapter", info.name] = info
            return info.obj
    for info in adapters:
        reason = getattr(info.obj, "unsupported", {}).get(model_type)
        if reason:
            raise MlxfunError(f"architecture {model_type!r} is not supported: {reason}")
    supported = sorted({t for info in adapters for t in info.obj.model_types})
    raise MlxfunError(
        f"unsupported architecture {model_type!r}; supported model types: "
        f"{', '.join(supported) or 'none (install mlxfun-adapters)'}"
    )


# ---------------------------------------------------------------------------------------------
# A plugin that raises while a command runs


def failed_plugin(exc: BaseException) -> PluginInfo | None:
    """The registered plugin whose code raised ``exc``, or None when no plugin code was running.

    The innermost frame of the traceback (then of the exceptions ``exc`` was raised from) that
    runs a plugin's code names it: a method of the plugin object (or of a copy of it, such as
    a scorer given the run's seed), or a function the object holds (an adapter's ``route``).
    When several plugins hold the same function (built-in adapters share routing functions),
    the one a look-up handed out wins.
    """
    import traceback

    if _registry is None:
        return None
    infos = [info for kind in KINDS for info in _registry[kind].values()]
    infos.sort(key=lambda info: (info.kind, info.name) not in _used)
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
        for frame in reversed(frames):
            for info in infos:
                if _runs(frame, info.obj):
                    return info
        exc = exc.__cause__ or exc.__context__
    return None


def plugin_failure_message(info: PluginInfo, exc: BaseException) -> str:
    """One line: which plugin failed, of which kind and distribution, and with what."""
    text = str(exc).strip().splitlines()
    detail = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return f"{info.kind} plugin {info.name!r} ({info.distribution} {info.version}) failed: {detail}"


def _runs(frame, obj) -> bool:
    """Whether ``frame`` runs code of the plugin object ``obj``."""
    owner = frame.f_locals.get("self")
    if owner is obj:
        return True
    cls = type(obj)
    if owner is not None and type(owner) is cls and not cls.__module__.startswith("mlxfun.core"):
        return True
    return frame.f_code in _held_code(obj)


def _held_code(obj) -> set:
    """The code objects of the functions ``obj`` holds as attributes (an adapter's ``route``,
    ``logits``, ``scores``; a namespace's ``select``)."""
    values = []
    if attrs.has(type(obj)):
        values = [getattr(obj, field.name, None) for field in attrs.fields(type(obj))]
    elif hasattr(obj, "__dict__"):
        values = list(vars(obj).values())
    codes = set()
    for value in values:
        while isinstance(value, functools.partial):
            value = value.func
        function = getattr(value, "__func__", value)
        code = getattr(function, "__code__", None)
        if code is not None:
            codes.add(code)
    return codes
