"""What every plugin kind declares: a name, a description and the attributes of its kind."""

import re

from ..types import CHANNEL_STATS, KINDS, OBSERVABLES, REQUIRED_ATTRIBUTES
from .failures import fail, plugin_label

# Names appear on the command line and in stats file keys (``acc.<scorer>.<key>``): no dots,
# no spaces.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def check_plugin(kind: str, obj) -> None:
    """The attributes every plugin of ``kind`` needs, with the right types.

    ``name`` (a short identifier: letters, digits, ``_`` and ``-``), ``description`` (one
    non-empty line), the methods and attributes in ``types.REQUIRED_ATTRIBUTES[kind]``, and for
    adapters ``model_types`` that ``matches`` accepts, for scorers ``needs`` within
    ``types.OBSERVABLES``.
    """
    if kind not in KINDS:
        raise AssertionError(f"unknown plugin kind {kind!r}; kinds are {', '.join(KINDS)}")
    label = plugin_label(kind, obj)
    missing = [
        a for a in ("name", "description", *REQUIRED_ATTRIBUTES[kind]) if not hasattr(obj, a)
    ]
    if missing:
        fail(
            label,
            f"lacks {', '.join(missing)} (a {kind} needs name, description and "
            f"{', '.join(REQUIRED_ATTRIBUTES[kind])})",
        )
    name, description = obj.name, obj.description
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        fail(
            label,
            f"name {name!r} must be a non-empty str of letters, digits, '_' and '-' "
            "(it is typed on the command line and used in stats file keys)",
        )
    if not isinstance(description, str) or not description.strip() or "\n" in description:
        fail(
            label,
            f"description {description!r} must be one non-empty line (`mlxfun plugins` prints it)",
        )
    for attr in REQUIRED_ATTRIBUTES[kind]:
        value = getattr(obj, attr)
        if attr in ("model_types", "needs", "stats"):
            continue
        if not callable(value):
            fail(label, f"{attr} must be callable, got {type(value).__name__}")
    if kind == "adapter":
        _check_adapter_declaration(label, obj)
    if kind == "scorer":
        needs = obj.needs
        if not isinstance(needs, frozenset | set):
            fail(label, f"needs must be a frozenset, got {type(needs).__name__}")
        unknown = set(needs) - OBSERVABLES
        if unknown:
            fail(
                label,
                f"needs {sorted(unknown)} are not observable; choose from "
                f"{', '.join(sorted(OBSERVABLES))}",
            )
    if kind == "neuron_scorer":
        stats = obj.stats
        if not isinstance(stats, frozenset | set):
            fail(label, f"stats must be a frozenset, got {type(stats).__name__}")
        unknown = set(stats) - CHANNEL_STATS
        if unknown:
            fail(
                label,
                f"stats {sorted(unknown)} are not collected; choose from "
                f"{', '.join(sorted(CHANNEL_STATS))}",
            )


def _check_adapter_declaration(label: str, adapter) -> None:
    model_types = adapter.model_types
    if not isinstance(model_types, tuple | list) or not model_types:
        fail(label, f"model_types must be a non-empty tuple of str, got {model_types!r}")
    for model_type in model_types:
        if not isinstance(model_type, str) or not model_type:
            fail(label, f"model_types holds {model_type!r}, not a config model_type string")
    if adapter.matches({"model_type": "mlxfun-no-such-architecture"}):
        fail(
            label,
            "matches() accepts a config of an unknown model_type; it must only accept "
            "the architectures it supports",
        )
