"""The sum merge properties of tests/core/test_core_stats_properties.py with the built-in
scorers (mlxfun-methods, found through the plugin registry, all in one collector as ``mlxfun
collect`` runs them): merging files equals one collect over both, in any order and grouping,
and an empty collection changes nothing, for every accumulator (sums, counts, maxima, the
random baseline's shape)."""

from hypothesis import given
from hypothesis import strategies as st
from mlxfun.core import plugins

from .core.properties import PROPERTY
from .core.test_core_stats_properties import (
    batches,
    check_empty_merge_is_identity,
    check_files_merge_like_one_collect,
    check_merge_order_does_not_matter,
    layouts,
)


def builtin_scorers() -> list:
    infos = plugins.registry()["scorer"].values()
    scorers = [info.obj for info in infos if info.distribution == "mlxfun-methods"]
    assert {"reap", "max_activation", "frequency"} <= {s.name for s in scorers}
    return scorers


@PROPERTY
@given(data=st.data())
def test_builtin_scorers_merge_like_one_collect(data):
    layout = data.draw(layouts())
    a, b, c = (data.draw(batches(layout)) for _ in range(3))
    scorers = builtin_scorers()
    check_files_merge_like_one_collect(scorers, layout, a, b)
    check_merge_order_does_not_matter(scorers, layout, a, b, c)
    check_empty_merge_is_identity(scorers, layout, a)
