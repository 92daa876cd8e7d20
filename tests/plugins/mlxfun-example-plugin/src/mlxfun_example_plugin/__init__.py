"""An example mlxfun plugin: the ``example_moe`` adapter, the ``token_share`` scorer and the
``example_bottom`` selector.

mlxfun imports this module through the ``mlxfun`` entry point whenever it lists or looks up
plugins, so it imports nothing heavy: the hooks import the modules that define the objects.
"""

from mlxfun.core.hookspecs import hookimpl


@hookimpl
def register_adapters(register):
    from .adapter import EXAMPLE_MOE

    register(EXAMPLE_MOE)


@hookimpl
def register_scorers(register):
    from .scorer import TokenShare

    register(TokenShare())


@hookimpl
def register_selectors(register):
    from .selector import ExampleBottom

    register(ExampleBottom())
