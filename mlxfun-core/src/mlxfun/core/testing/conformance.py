"""``PluginConformance``: a pytest base class running the kit's checks on one plugin."""

from .adapter import check_adapter
from .compressor import check_compressor
from .failures import plugin_label
from .intervention import check_intervention
from .neuron_scorer import check_neuron_scorer
from .plugin import check_plugin
from .scorer import check_scorer
from .selector import check_selector


class PluginConformance:
    """Subclass as ``class TestMine(PluginConformance)`` and set ``plugin_kind`` and
    ``plugin_object``; adapters also define ``make_model(self) -> (model, model_type)``.

    ``check_registered`` (default True) also checks that the installed plugins register an
    object of that name, i.e. that your entry point works; set it False for objects you do not
    register. ``checks`` passes keyword arguments to the kind's check function (for instance
    ``{"n": 3}`` for a selector, ``{"check_weights": False}`` for an adapter, ``{"commands":
    False}`` to skip the commands' path where only mlxfun-core is installed, ``{"options":
    {...}}`` for an intervention's own options).
    """

    plugin_kind: str = ""
    plugin_object = None
    check_registered: bool = True
    checks: dict = {}

    def make_model(self):
        raise NotImplementedError(
            f"{type(self).__name__}: an adapter's conformance test needs a model; define "
            "make_model(self) returning (model, model_type), e.g. with "
            "mlxfun.core.testing.build_tiny_model"
        )

    def test_plugin_attributes(self):
        check_plugin(self.plugin_kind, self.plugin_object)

    def test_protocol(self):
        kind, obj, options = self.plugin_kind, self.plugin_object, dict(self.checks)
        if kind == "scorer":
            check_scorer(obj, **options)
        elif kind == "selector":
            check_selector(obj, **options)
        elif kind == "adapter":
            model, model_type = self.make_model()
            check_adapter(obj, model, model_type, **options)
        elif kind == "compressor":
            check_compressor(obj, **options)
        elif kind == "intervention":
            check_intervention(obj, **options)
        elif kind == "neuron_scorer":
            check_neuron_scorer(obj, **options)
        else:
            check_plugin(kind, obj)

    def test_registered_by_name(self):
        if not self.check_registered:
            return
        from .. import plugins

        kind, obj = self.plugin_kind, self.plugin_object
        found = plugins.registry()[kind].get(obj.name)
        if found is None:
            failed = plugins.failures()
            errors = "; ".join(f"{f.name}: {f.error}" for f in failed) or "none reported"
            raise AssertionError(
                f"{plugin_label(kind, obj)} is not registered by any installed plugin (plugin errors: "
                f"{errors}); install your package and check its `mlxfun` entry point and "
                f"register_{kind}s hook"
            )
        if not (found.obj is obj or found.obj == obj):
            raise AssertionError(
                f"the registered {kind} {obj.name!r} (from {found.distribution}) is not this "
                "object; does another plugin use the same name?"
            )
