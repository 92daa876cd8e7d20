"""Installed-looking plugin distributions for tests, without pip.

``write_dist`` puts a module and a ``<name>-<version>.dist-info`` folder (METADATA and
entry_points.txt) into a folder that the test prepends to ``sys.path``, so
``importlib.metadata.entry_points()`` finds the entry point exactly as it finds an installed
package's.
"""

import sys
from pathlib import Path

GOOD = """
from mlxfun.core.hookspecs import hookimpl


class Count:
    name = "{scorer}"
    description = "tokens routed to the expert (test plugin)"
    needs = frozenset({{"selected"}})

    def init(self, num_layers, num_experts):
        import numpy as np

        return {{"count": np.zeros((num_layers, num_experts))}}

    def update(self, acc, obs):
        import numpy as np

        np.add.at(acc["count"][obs.layer], obs.selected.reshape(-1), 1.0)

    def finalize(self, acc):
        return acc["count"].copy()


@hookimpl
def register_scorers(register):
    register(Count())
"""

MISSPELLED = """
from mlxfun.core.hookspecs import hookimpl


@hookimpl
def register_scorer(register):  # should be register_scorers
    raise AssertionError("never called")
"""

BROKEN = """
raise ImportError("No module named 'some_missing_dependency'")
"""


def write_dist(
    site: Path, dist: str, module: str, source: str, entry: str | None = None, version: str = "1.0"
) -> None:
    """A distribution ``dist`` whose ``mlxfun`` entry point ``entry`` (default: the module
    name) loads ``module`` with ``source``."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[mlxfun]\n{entry or module} = {module}\n")


def forget_modules(*names: str) -> None:
    for name in names:
        sys.modules.pop(name, None)
