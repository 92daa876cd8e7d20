"""The plugin manager with in-process plugins and entry points of test distributions.

These tests need only mlxfun-core: every test loads plugins from its own distributions (see
``fake_dists``) or none at all, never from what happens to be installed.
"""

import uuid

import numpy as np
import pluggy
import pytest
from mlxfun.core import testing
from mlxfun.core.errors import MlxfunError
from mlxfun.core.hookspecs import hookimpl
from mlxfun.core.types import Selection

from .fake_dists import BROKEN, GOOD, MISSPELLED, forget_modules, write_dist


class CountScorer:
    name = "count"
    description = "tokens routed to the expert"
    needs = frozenset({"selected"})

    def init(self, num_layers, num_experts):
        return {"count": np.zeros((num_layers, num_experts))}

    def update(self, acc, obs):
        np.add.at(acc["count"][obs.layer], obs.selected.reshape(-1), 1.0)

    def finalize(self, acc):
        return acc["count"].copy()


class BottomSelector:
    """Written against the documented types (``mlxfun.core.types.SelectOptions``): per-layer
    ``top_k`` / ``min_keep`` / ``num_experts`` lists, ``protect`` / ``target`` keyed by MoE layer
    position; router groups are refused cleanly."""

    name = "lowest"
    description = "the n lowest-scoring experts of every layer"

    def select(self, scores, n=None, ratio=None, **options):
        num_layers, width = scores.shape
        counts = options.get("num_experts") or [width] * num_layers
        min_keep = options.get("min_keep") or options.get("top_k") or [1] * num_layers
        protect, target = options.get("protect") or {}, options.get("target") or {}
        if options.get("groups", 1) != 1:
            raise MlxfunError("lowest does not support router groups")
        keep, removed = {}, {}
        for layer, count in enumerate(counts):
            wanted = n if n is not None else int((ratio or 0) * count)
            doomed = sorted(target.get(layer, []))
            free = [
                int(e)
                for e in np.argsort(scores[layer, :count], kind="stable")
                if e not in doomed and e not in protect.get(layer, [])
            ]
            extra = max(0, min(wanted, count - min_keep[layer]) - len(doomed))
            removed[layer] = sorted(doomed + free[:extra])
            keep[layer] = [e for e in range(count) if e not in removed[layer]]
        return Selection(keep, removed, list(counts))


class MethodsPlugin:
    @hookimpl
    def register_scorers(self, register):
        register(CountScorer())

    @hookimpl
    def register_selectors(self, register):
        register(BottomSelector())


class SameNamePlugin:
    @hookimpl
    def register_scorers(self, register):
        register(CountScorer())


class MisspelledPlugin:
    @hookimpl
    def register_scorer(self, register):  # the hook is register_scorers
        register(CountScorer())


class RaisingPlugin:
    @hookimpl
    def register_selectors(self, register):
        raise ValueError("cannot build my selectors")


@pytest.fixture
def no_installed_plugins():
    """A plugin manager that loads no entry point (MLXFUN_LOAD_PLUGINS="")."""
    with testing.fresh_plugin_state(
        MLXFUN_LOAD_PLUGINS="", MLXFUN_STRICT_PLUGINS=None, MLXFUN_TRACE_PLUGINS=None
    ) as plugins:
        yield plugins


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path for test distributions, with unique module names."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    names = []

    def module_name(stem):
        name = f"{stem}_{uuid.uuid4().hex[:8]}"
        names.append(name)
        return name

    yield folder, module_name
    forget_modules(*names)


def test_in_process_plugin_objects_are_found_by_name(no_installed_plugins):
    plugins = no_installed_plugins
    with testing.registered_plugin(MethodsPlugin(), "methods-test", "my-dist", "2.0"):
        assert isinstance(plugins.get_scorer("count"), CountScorer)
        assert plugins.plugin_names("selector") == ["lowest"]
        rows = [info.as_dict() for info in plugins.all_plugins()]
        assert {
            "kind": "scorer",
            "name": "count",
            "distribution": "my-dist",
            "version": "2.0",
            "description": "tokens routed to the expert",
        } in rows
    assert plugins.plugin_names("scorer") == []
    with pytest.raises(MlxfunError, match="unknown scorer 'count'; known scorers: none installed"):
        plugins.get_scorer("count")


def test_unknown_names_list_the_known_ones(no_installed_plugins):
    plugins = no_installed_plugins
    with testing.registered_plugin(MethodsPlugin(), "methods-test"):
        with pytest.raises(MlxfunError, match="unknown selector 'bottom'; known selectors: lowest"):
            plugins.get_selector("bottom")
        with pytest.raises(MlxfunError, match="unknown scorer 'reap'; known scorers: count"):
            plugins.get_scorer("reap")
    with pytest.raises(MlxfunError, match="supported model types: none"):
        plugins.adapter_for_config({"model_type": "qwen3_moe"})


def test_the_same_kind_and_name_twice_is_reported(no_installed_plugins):
    plugins = no_installed_plugins
    with testing.registered_plugin(MethodsPlugin(), "first", "dist-a"):
        with testing.registered_plugin(SameNamePlugin(), "second", "dist-b"):
            kept = plugins.registry()["scorer"]["count"]
            [failure] = plugins.failures()
            assert failure.kind == "scorer" and failure.name == "count"
            assert {kept.distribution, failure.distribution} == {"dist-a", "dist-b"}
            assert f"already registered by {kept.distribution}; kept that one" in failure.error


def test_the_first_registered_of_two_same_names_is_kept(no_installed_plugins):
    with testing.registered_plugin(MethodsPlugin(), "first", "dist-a"):
        with testing.registered_plugin(SameNamePlugin(), "second", "dist-b"):
            assert no_installed_plugins.registry()["scorer"]["count"].distribution == "dist-a"


def test_the_same_name_twice_is_fatal_when_strict(no_installed_plugins, monkeypatch):
    with testing.registered_plugin(MethodsPlugin(), "first", "dist-a"):
        with testing.registered_plugin(SameNamePlugin(), "second", "dist-b"):
            monkeypatch.setenv("MLXFUN_STRICT_PLUGINS", "1")
            with pytest.raises(MlxfunError, match="scorer 'count' is already registered by dist-"):
                no_installed_plugins.registry()


def test_a_misspelled_hook_is_refused_in_process(no_installed_plugins):
    plugins = no_installed_plugins
    plugin = MisspelledPlugin()
    with pytest.raises(pluggy.PluginValidationError, match="register_scorer"):
        with testing.registered_plugin(plugin, "misspelled"):
            pass
    assert plugins.pm.get_plugin("misspelled") is None  # nothing left behind
    with testing.registered_plugin(MethodsPlugin(), "methods-test"):
        assert plugins.plugin_names("scorer") == ["count"]


def test_a_hook_that_raises_is_reported_and_the_rest_still_works(no_installed_plugins):
    plugins = no_installed_plugins
    with testing.registered_plugin(RaisingPlugin(), "raising", "dist-r"):
        with testing.registered_plugin(MethodsPlugin(), "methods-test"):
            assert plugins.plugin_names("scorer") == ["count"]
            [failure] = plugins.failures()
            assert failure.distribution == "dist-r"
            assert (
                failure.error == "register_selectors raised ValueError: cannot build my selectors"
            )


def test_entry_points_load_with_distribution_and_version(site, monkeypatch):
    folder, module_name = site
    good = module_name("good")
    write_dist(folder, "mlxfun-good-test", good, GOOD.format(scorer="good_count"), version="3.1")
    with testing.fresh_plugin_state(MLXFUN_LOAD_PLUGINS="mlxfun-good-test") as plugins:
        [info] = plugins.all_plugins()
        assert info.as_dict() == {
            "kind": "scorer",
            "name": "good_count",
            "distribution": "mlxfun-good-test",
            "version": "3.1",
            "description": "tokens routed to the expert (test plugin)",
        }
        testing.check_scorer(plugins.get_scorer("good_count"), commands=False)


def test_load_plugins_selects_distributions_by_normalised_name(site):
    folder, module_name = site
    a, b = module_name("a"), module_name("b")
    write_dist(folder, "mlxfun-a-test", a, GOOD.format(scorer="from_a"))
    write_dist(folder, "mlxfun-b-test", b, GOOD.format(scorer="from_b"))
    with testing.fresh_plugin_state(MLXFUN_LOAD_PLUGINS="mlxfun-core,MLXFUN_B.test") as plugins:
        assert plugins.plugin_names("scorer") == ["from_b"]
    with testing.fresh_plugin_state(MLXFUN_LOAD_PLUGINS="mlxfun-a-test,mlxfun-b-test") as plugins:
        assert plugins.plugin_names("scorer") == ["from_a", "from_b"]
    with testing.fresh_plugin_state(MLXFUN_LOAD_PLUGINS="") as plugins:
        assert plugins.all_plugins() == []


def test_load_plugins_accepts_spaces_after_commas(site):
    folder, module_name = site
    write_dist(folder, "mlxfun-b-test", module_name("b"), GOOD.format(scorer="from_b"))
    with testing.fresh_plugin_state(MLXFUN_LOAD_PLUGINS="mlxfun-core, mlxfun-b-test") as plugins:
        assert plugins.plugin_names("scorer") == ["from_b"]


def test_a_broken_entry_point_is_reported_and_others_still_load(site, capsys):
    folder, module_name = site
    broken, good = module_name("broken"), module_name("good")
    write_dist(folder, "mlxfun-broken-test", broken, BROKEN, entry="broken")
    write_dist(folder, "mlxfun-good-test", good, GOOD.format(scorer="good_count"))
    env = {"MLXFUN_LOAD_PLUGINS": "mlxfun-broken-test,mlxfun-good-test"}
    with testing.fresh_plugin_state(**env, MLXFUN_STRICT_PLUGINS=None) as plugins:
        assert plugins.plugin_names("scorer") == ["good_count"]
        [failure] = plugins.failures()
        assert failure.as_dict() == {
            "kind": "plugin",
            "name": "broken",
            "distribution": "mlxfun-broken-test",
            "version": "1.0",
            "description": "",
            "error": "ImportError: No module named 'some_missing_dependency'",
        }
    assert "warning: skipped plugin 'broken' from mlxfun-broken-test" in capsys.readouterr().err
    with testing.fresh_plugin_state(**env, MLXFUN_STRICT_PLUGINS="1") as plugins:
        with pytest.raises(MlxfunError, match="plugin 'broken' from mlxfun-broken-test: Import"):
            plugins.registry()


def test_a_misspelled_hook_in_an_entry_point_is_reported_not_ignored(site):
    folder, module_name = site
    misspelled, good = module_name("misspelled"), module_name("good")
    write_dist(folder, "mlxfun-typo-test", misspelled, MISSPELLED, entry="typo")
    write_dist(folder, "mlxfun-good-test", good, GOOD.format(scorer="good_count"))
    env = {"MLXFUN_LOAD_PLUGINS": "mlxfun-typo-test,mlxfun-good-test"}
    with testing.fresh_plugin_state(**env) as plugins:
        [failure] = plugins.failures()
        assert failure.name == "typo" and failure.distribution == "mlxfun-typo-test"
        assert "unknown hook" in failure.error and "register_scorer" in failure.error
        assert plugins.plugin_names("scorer") == ["good_count"]
        assert not plugins.pm.has_plugin("typo")
    with testing.fresh_plugin_state(**env, MLXFUN_STRICT_PLUGINS="1") as plugins:
        with pytest.raises(MlxfunError, match="register_scorer"):
            plugins.registry()


def test_two_distributions_with_the_same_entry_point_name_are_reported(site):
    folder, module_name = site
    one, two = module_name("one"), module_name("two")
    write_dist(folder, "mlxfun-one-test", one, GOOD.format(scorer="from_one"), entry="same")
    write_dist(folder, "mlxfun-two-test", two, GOOD.format(scorer="from_two"), entry="same")
    with testing.fresh_plugin_state(MLXFUN_LOAD_PLUGINS="mlxfun-one-test,mlxfun-two-test") as p:
        assert len(p.plugin_names("scorer")) == 1
        [failure] = p.failures()
        assert "entry point name 'same' is already used by" in failure.error


def test_trace_switch_prints_hook_calls(no_installed_plugins, capsys):
    with testing.fresh_plugin_state(MLXFUN_LOAD_PLUGINS="", MLXFUN_TRACE_PLUGINS="1") as plugins:
        with testing.registered_plugin(MethodsPlugin(), "methods-test"):
            plugins.registry()
            plugins.pm.hook.register_scorers(register=lambda obj: None)
    assert "register_scorers" in capsys.readouterr().err
    with testing.fresh_plugin_state(MLXFUN_LOAD_PLUGINS="") as plugins:
        plugins.pm.hook.register_scorers(register=lambda obj: None)
    assert capsys.readouterr().err == ""  # tracing is undone by reset()


def test_the_conformance_kit_passes_the_in_process_plugins():
    testing.check_plugin("scorer", CountScorer())
    testing.check_scorer(CountScorer(), commands=False)
    testing.check_selector(BottomSelector(), commands=False)
    testing.check_selector(BottomSelector(), n=3, commands=False)


# ----- which plugin raised (what `mlxfun` reports in one line)


class RaisingCompressor:
    """Calls the selector it is given, as prune does, so a selector's failure happens inside it."""

    name = "squash"
    description = "calls a selector"

    def compress(self, request):
        from mlxfun.core import plugins

        if request == "itself":
            raise KeyError("compressor's own bug")
        return plugins.get_selector(request).select(np.ones((2, 4)), n=1)


class FailingSelector(BottomSelector):
    name = "failing"

    def select(self, scores, **options):
        return _helper(scores)


def _helper(scores):
    raise ZeroDivisionError("division by zero in a helper")


class FailingPlugin:
    @hookimpl
    def register_selectors(self, register):
        register(FailingSelector())
        register(BottomSelector())

    @hookimpl
    def register_compressors(self, register):
        register(RaisingCompressor())


def raised(function, *args):
    try:
        function(*args)
    except Exception as exc:
        return exc
    raise AssertionError("nothing raised")


def test_the_innermost_plugin_frame_names_the_failing_plugin(no_installed_plugins):
    plugins = no_installed_plugins
    with testing.registered_plugin(FailingPlugin(), "failing-test", "mlxfun-failing", "0.3"):
        compressor = plugins.get_compressor("squash")
        exc = raised(compressor.compress, "failing")  # the selector's helper raised
        info = plugins.failed_plugin(exc)
        assert (info.kind, info.name, info.distribution) == (
            "selector",
            "failing",
            "mlxfun-failing",
        )
        assert plugins.plugin_failure_message(info, exc) == (
            "selector plugin 'failing' (mlxfun-failing 0.3) failed: ZeroDivisionError: "
            "division by zero in a helper"
        )
        info = plugins.failed_plugin(raised(compressor.compress, "itself"))
        assert (info.kind, info.name) == ("compressor", "squash")
        assert plugins.failed_plugin(raised(int, "not a number")) is None  # no plugin code ran


def test_copies_held_functions_and_chained_exceptions_are_attributed(no_installed_plugins):
    import attrs

    plugins = no_installed_plugins

    @attrs.frozen
    class Seeded(CountScorer):
        name: str = "seeded"
        seed: int = 0

        def update(self, acc, obs):
            raise ValueError(f"seed {self.seed}")

    def route(block, logits):
        raise RuntimeError("route failed")

    holder = type("Holder", (), {})()
    holder.name, holder.description, holder.select = "held", "holds its function", route

    class Plugin:
        @hookimpl
        def register_scorers(self, register):
            register(Seeded())

        @hookimpl
        def register_selectors(self, register):
            register(holder)

    with testing.registered_plugin(Plugin(), "copies-test", "mlxfun-copies", "1"):
        copy = attrs.evolve(plugins.get_scorer("seeded"), seed=3)  # what collect's with_seed makes
        assert plugins.failed_plugin(raised(copy.update, {}, None)).name == "seeded"
        assert plugins.failed_plugin(raised(holder.select, None, None)).name == "held"

        def wraps():
            try:
                copy.update({}, None)
            except ValueError as exc:
                raise RuntimeError("wrapped") from exc

        assert plugins.failed_plugin(raised(wraps)).name == "seeded"
