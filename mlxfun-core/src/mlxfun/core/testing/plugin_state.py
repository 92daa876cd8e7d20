"""The plugin manager's state in tests: an in-process plugin registered for a ``with`` block,
or plugins reloaded under other ``MLXFUN_*`` settings."""

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def registered_plugin(
    plugin, name: str, distribution: str = "local", version: str = "0"
) -> Iterator:
    """Register an in-process plugin (a module or object with hookimpls) for a ``with`` block;
    it is unregistered afterwards, also when registration itself fails."""
    from .. import plugins

    try:
        plugins.register_plugin(plugin, name=name, distribution=distribution, version=version)
    except Exception:
        if plugins.pm.get_plugin(name) is plugin:
            plugins.unregister_plugin(name)
        raise
    try:
        yield plugin
    finally:
        if plugins.pm.get_plugin(name) is plugin:
            plugins.unregister_plugin(name)


@contextmanager
def fresh_plugin_state(**environ: str | None) -> Iterator:
    """Forget loaded plugins, set ``MLXFUN_*`` environment variables (None unsets), and load
    again lazily inside the block; afterwards the environment is restored and plugins reload
    on next use. ``with fresh_plugin_state(MLXFUN_LOAD_PLUGINS="mlxfun-methods"): ...``"""
    from .. import plugins

    saved = {key: os.environ.get(key) for key in environ}
    try:
        for key, value in environ.items():
            _setenv(key, value)
        plugins.reset()
        yield plugins
    finally:
        for key, value in saved.items():
            _setenv(key, value)
        plugins.reset()


def _setenv(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


@contextmanager
def substituted_plugin(kind: str, obj) -> Iterator:
    """In a ``with`` block, looking up the ``kind`` plugin named ``obj.name`` gives ``obj``, as
    if an installed plugin registered it (it replaces one of that name, keeping its
    distribution); an adapter is also tried first by ``adapter_for_config``. The registry is
    restored afterwards. The kit runs the commands' own path this way on the object under test."""
    from .. import plugins
    from ..types import PluginInfo

    by_name = plugins.registry()[kind]
    saved = dict(by_name)
    current = saved.get(obj.name)
    where = (current.distribution, current.version) if current else ("mlxfun-kit", "0")
    info = PluginInfo(kind, obj.name, str(obj.description), *where, obj=obj)
    by_name.clear()
    by_name[obj.name] = info
    by_name.update((name, other) for name, other in saved.items() if name != obj.name)
    try:
        yield obj
    finally:
        by_name.clear()
        by_name.update(saved)
