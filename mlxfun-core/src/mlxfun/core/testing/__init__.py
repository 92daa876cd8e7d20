"""Conformance checks for mlxfun plugins, for plugin authors to run in their own tests.

Each ``check_*`` function takes a plugin object, calls it exactly as mlxfun's commands call it
(the arguments of ``mlxfun.core.types``, derived from tiny models), runs the commands' own path
with it (``collect``, ``prune``, loading the result) on tiny checkpoints, and raises
``AssertionError`` with a message that names the plugin, the argument or return value, what
arrived and what was expected::

    from mlxfun.core import testing

    def test_my_scorer():
        testing.check_scorer(MyScorer())

The commands' path needs the built-in plugins (``mlxfun-adapters``, ``mlxfun-methods``): the
core reaches them through the plugin registry. ``commands=False`` checks the calls alone, with
``mlxfun-core`` only.

Or subclass ``PluginConformance`` (pytest collects it when the subclass is named ``Test...``)::

    class TestMyScorer(testing.PluginConformance):
        plugin_kind = "scorer"
        plugin_object = MyScorer()

An adapter needs a model: define ``make_model(self) -> (model, model_type)``, for instance with
``build_tiny_model``. This package imports neither Typer nor SciPy, and MLX only inside the
functions that run a model.

One module per plugin kind, and the helpers they share:

- ``plugin``: ``check_plugin``, the attributes every kind declares;
- ``scorer``, ``selector``, ``adapter``, ``compressor``, ``intervention``, ``neuron_scorer``:
  ``check_scorer``, ``check_selector``, ``check_adapter``, ``check_compressor``,
  ``check_intervention``, ``check_neuron_scorer``;
- ``commands``: the commands' path: tiny checkpoints with their stats, ``collect`` and
  ``prune`` through the functions the CLI calls, the kit's own scorer and selector;
- ``conformance``: ``PluginConformance``, the pytest base class running them;
- ``observations``: ``make_observation``, a synthetic ``LayerObservation``;
- ``tiny_models``: ``build_tiny_model``, a model with seeded random weights, and
  ``save_tiny_checkpoint``, one saved with a byte-level tokenizer (``write_byte_tokenizer``);
- ``plugin_state``: ``registered_plugin``, ``fresh_plugin_state`` and ``substituted_plugin``;
- ``failures``: how every check fails (an ``AssertionError`` naming the plugin).

Import the names from ``mlxfun.core.testing``; the modules are its layout, not its interface.
"""

from .adapter import check_adapter
from .compressor import check_compressor
from .conformance import PluginConformance
from .intervention import check_intervention
from .neuron_scorer import check_neuron_scorer
from .observations import make_observation
from .plugin import NAME_PATTERN, check_plugin
from .plugin_state import fresh_plugin_state, registered_plugin, substituted_plugin
from .scorer import check_scorer
from .selector import check_selector
from .tiny_models import TINY_ARGS, build_tiny_model, save_tiny_checkpoint, write_byte_tokenizer

__all__ = [
    "NAME_PATTERN",
    "TINY_ARGS",
    "PluginConformance",
    "build_tiny_model",
    "check_adapter",
    "check_compressor",
    "check_intervention",
    "check_neuron_scorer",
    "check_plugin",
    "check_scorer",
    "check_selector",
    "fresh_plugin_state",
    "make_observation",
    "registered_plugin",
    "save_tiny_checkpoint",
    "substituted_plugin",
    "write_byte_tokenizer",
]
