"""Conformance checks for mlxfun plugins, for plugin authors to run in their own tests.

Each ``check_*`` function takes a plugin object, exercises the protocol of its kind (see
``mlxfun.core.types``) the way mlxfun itself calls it, and raises ``AssertionError`` with a
message that names the plugin and what to fix::

    from mlxfun.core import testing

    def test_my_scorer():
        testing.check_scorer(MyScorer())

Or subclass ``PluginConformance`` (pytest collects it when the subclass is named ``Test...``)::

    class TestMyScorer(testing.PluginConformance):
        plugin_kind = "scorer"
        plugin_object = MyScorer()

An adapter needs a model: define ``make_model(self) -> (model, model_type)``, for instance with
``build_tiny_model``. This module imports neither Typer nor SciPy, and MLX only inside the
functions that run a model.
"""

import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import numpy as np

from .types import KINDS, OBSERVABLES, REQUIRED_ATTRIBUTES, LayerObservation, Selection

__all__ = [
    "NAME_PATTERN",
    "PluginConformance",
    "build_tiny_model",
    "check_adapter",
    "check_plugin",
    "check_scorer",
    "check_selector",
    "fresh_plugin_state",
    "make_observation",
    "registered_plugin",
]

# Names appear on the command line and in stats file keys (``acc.<scorer>.<key>``): no dots,
# no spaces.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

ALL_NEEDS = frozenset(OBSERVABLES)


def _label(kind: str, obj) -> str:
    return f"{kind} {getattr(obj, 'name', None)!r} ({type(obj).__name__})"


def _fail(label: str, message: str):
    raise AssertionError(f"{label}: {message}")


# ---------------------------------------------------------------------------------------------
# Every kind


def check_plugin(kind: str, obj) -> None:
    """The attributes every plugin of ``kind`` needs, with the right types.

    ``name`` (a short identifier: letters, digits, ``_`` and ``-``), ``description`` (one
    non-empty line), the methods and attributes in ``types.REQUIRED_ATTRIBUTES[kind]``, and for
    adapters ``model_types`` that ``matches`` accepts, for scorers ``needs`` within
    ``types.OBSERVABLES``.
    """
    if kind not in KINDS:
        raise AssertionError(f"unknown plugin kind {kind!r}; kinds are {', '.join(KINDS)}")
    label = _label(kind, obj)
    missing = [
        a for a in ("name", "description", *REQUIRED_ATTRIBUTES[kind]) if not hasattr(obj, a)
    ]
    if missing:
        _fail(
            label,
            f"lacks {', '.join(missing)} (a {kind} needs name, description and "
            f"{', '.join(REQUIRED_ATTRIBUTES[kind])})",
        )
    name, description = obj.name, obj.description
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        _fail(
            label,
            f"name {name!r} must be a non-empty str of letters, digits, '_' and '-' "
            "(it is typed on the command line and used in stats file keys)",
        )
    if not isinstance(description, str) or not description.strip() or "\n" in description:
        _fail(
            label,
            f"description {description!r} must be one non-empty line (`mlxfun plugins` prints it)",
        )
    for attr in REQUIRED_ATTRIBUTES[kind]:
        value = getattr(obj, attr)
        if attr in ("model_types", "needs"):
            continue
        if not callable(value):
            _fail(label, f"{attr} must be callable, got {type(value).__name__}")
    if kind == "adapter":
        _check_adapter_declaration(label, obj)
    if kind == "scorer":
        needs = obj.needs
        if not isinstance(needs, frozenset | set):
            _fail(label, f"needs must be a frozenset, got {type(needs).__name__}")
        unknown = set(needs) - OBSERVABLES
        if unknown:
            _fail(
                label,
                f"needs {sorted(unknown)} are not observable; choose from "
                f"{', '.join(sorted(OBSERVABLES))}",
            )


def _check_adapter_declaration(label: str, adapter) -> None:
    model_types = adapter.model_types
    if not isinstance(model_types, tuple | list) or not model_types:
        _fail(label, f"model_types must be a non-empty tuple of str, got {model_types!r}")
    for model_type in model_types:
        if not isinstance(model_type, str) or not model_type:
            _fail(label, f"model_types holds {model_type!r}, not a config model_type string")
    if adapter.matches({"model_type": "mlxfun-no-such-architecture"}):
        _fail(
            label,
            "matches() accepts a config of an unknown model_type; it must only accept "
            "the architectures it supports",
        )


# ---------------------------------------------------------------------------------------------
# Scorers


def make_observation(
    layer: int = 0,
    num_experts: int = 8,
    num_tokens: int = 16,
    top_k: int = 2,
    needs=ALL_NEEDS,
    hidden: int = 8,
    seed: int = 0,
    never_routed: tuple[int, ...] = (),
) -> LayerObservation:
    """A synthetic ``LayerObservation`` shaped like the observer's.

    ``selected`` holds ``top_k`` distinct experts per token sorted by id (as the observer reports
    them), ``weights`` are positive float32 gate weights summing to 1 per token, ``norms`` are
    the norms of ``outputs``. Only ``selected``, ``weights`` and the fields in ``needs`` are set,
    as in a real collect. Experts in ``never_routed`` are never selected.
    """
    rng = np.random.default_rng(seed)
    allowed = np.array([e for e in range(num_experts) if e not in set(never_routed)])
    if len(allowed) < top_k:
        raise ValueError("top_k is larger than the experts that may be routed to")
    selected = np.stack(
        [np.sort(rng.choice(allowed, top_k, replace=False)) for _ in range(num_tokens)]
    )
    selected = selected.reshape(num_tokens, top_k).astype(np.int64)
    raw = rng.random((num_tokens, top_k)) + 0.1
    weights = (raw / raw.sum(-1, keepdims=True)).astype(np.float32)
    outputs = rng.normal(size=(num_tokens, top_k, hidden)).astype(np.float32)
    obs = LayerObservation(layer=layer, num_experts=num_experts, selected=selected, weights=weights)
    if "norms" in needs:
        obs.norms = np.linalg.norm(outputs, axis=-1).astype(np.float32)
    if "outputs" in needs:
        obs.outputs = outputs
    if "logits" in needs:
        obs.logits = rng.normal(size=(num_tokens, num_experts)).astype(np.float32)
    return obs


def _slice(obs: LayerObservation, part: slice) -> LayerObservation:
    fields = ("selected", "weights", "norms", "logits", "outputs")
    return attrs.evolve(
        obs, **{f: None if getattr(obs, f) is None else getattr(obs, f)[part] for f in fields}
    )


def _copy_acc(acc) -> dict:
    return {key: np.array(value, copy=True) for key, value in acc.items()}


def _same_acc(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def _default_combine(a, b):
    return {key: a[key] + b[key] for key in a}


def _check_scores(label: str, scores, shape, what: str) -> np.ndarray:
    array = np.asarray(scores)
    if array.shape != shape:
        _fail(
            label,
            f"finalize() after {what} gave shape {array.shape}, expected "
            f"(num_layers, num_experts) = {shape}",
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        _fail(label, f"finalize() after {what} gave dtype {array.dtype}, expected a float array")
    if not np.all(np.isfinite(array)):
        _fail(
            label,
            f"finalize() after {what} gave NaN or inf (an expert never routed to must "
            "still get a finite score, the lowest meaningful one)",
        )
    return array.astype(np.float64)


def check_scorer(
    scorer,
    num_layers: int = 3,
    num_experts: int = 8,
    top_k: int = 2,
    layer_local: bool = True,
    rtol: float = 1e-9,
) -> None:
    """A scorer accumulates exactly and merges exactly.

    - ``init`` gives a dict of float64 arrays, fresh on every call;
    - ``update`` changes them in place (when the scorer observes anything: ``needs`` not empty),
      keeping their shapes and dtype, and uses only what ``needs`` asks for;
    - ``finalize`` gives a finite (num_layers, num_experts) float array and leaves the
      accumulators alone; an expert that was never routed to still gets a finite score;
    - splitting a batch into two updates changes nothing;
    - ``combine(a, b)`` (default: the sum) equals one accumulation over both sets of
      observations, without modifying ``a`` or ``b``;
    - the accumulators survive the stats file (``mlxfun.core.stats.save_stats``/``load_stats``);
    - with ``layer_local`` (the default), observations of one layer change only that layer's
      row of scores.
    """
    from .stats import load_stats, save_stats

    check_plugin("scorer", scorer)
    label = _label("scorer", scorer)
    shape = (num_layers, num_experts)
    needs = frozenset(scorer.needs)

    acc = scorer.init(num_layers, num_experts)
    if not isinstance(acc, dict):
        _fail(label, f"init() must return a dict of numpy arrays, got {type(acc).__name__}")
    for key, value in acc.items():
        if not isinstance(key, str) or not key or any(c.isspace() for c in key):
            _fail(label, f"init() key {key!r} must be a non-empty str without spaces")
        if not isinstance(value, np.ndarray) or value.dtype != np.float64:
            _fail(
                label,
                f"init()[{key!r}] must be a float64 numpy array (exact sums), got "
                f"{getattr(value, 'dtype', type(value).__name__)}",
            )
    empty = _copy_acc(acc)
    empty_scores = _check_scores(label, scorer.finalize(scorer.init(*shape)), shape, "init()")

    def observations(seed, tokens):
        return [
            make_observation(
                layer,
                num_experts,
                tokens + 3 * layer,
                top_k,
                needs | {"selected", "weights"},
                seed=seed * 100 + layer,
                never_routed=(num_experts - 1,),
            )
            for layer in range(num_layers)
        ]

    def accumulate(*batches):
        result = scorer.init(*shape)
        for batch in batches:
            for obs in batch:
                try:
                    returned = scorer.update(result, obs)
                except (AttributeError, TypeError) as exc:
                    missing = [f for f in ("norms", "logits", "outputs") if getattr(obs, f) is None]
                    _fail(
                        label,
                        f"update() failed with {type(exc).__name__}: {exc}; an observation "
                        f"has only selected, weights and what `needs` lists ({sorted(needs)}), "
                        f"here not: {', '.join(missing)}",
                    )
                if returned is not None and returned is not result:
                    _fail(
                        label,
                        "update() returned new accumulators; mlxfun ignores what it returns, "
                        "so change `acc` in place",
                    )
        return result

    batch_a, batch_b = observations(1, 12), observations(2, 7)

    # init gives fresh arrays, update mutates them in place
    other = scorer.init(*shape)
    acc_a = accumulate(batch_a)
    if not _same_acc(other, empty):
        _fail(
            label,
            "init() returned arrays shared between calls (updating one accumulator "
            "changed another); create new arrays in init()",
        )
    for key, value in acc_a.items():
        if value.shape != empty[key].shape or value.dtype != np.float64:
            _fail(
                label,
                f"update() changed {key!r} from {empty[key].shape} float64 to "
                f"{value.shape} {value.dtype}; keep the accumulators' shapes and dtype",
            )
    if needs and _same_acc(acc_a, empty):
        _fail(
            label,
            f"update() did not change the accumulators although the scorer needs "
            f"{sorted(needs)}; update must add the observation into `acc` in place",
        )

    # finalize: shape, finite, no side effects, deterministic
    before = _copy_acc(acc_a)
    scores_a = _check_scores(label, scorer.finalize(acc_a), shape, "update()")
    if not _same_acc(acc_a, before):
        _fail(label, "finalize() modified the accumulators; return a new array")
    again = _check_scores(label, scorer.finalize(acc_a), shape, "update()")
    if not np.array_equal(scores_a, again):
        _fail(label, "finalize() gave different scores for the same accumulators")

    if layer_local:
        one = accumulate([batch_a[min(1, num_layers - 1)]])
        row = min(1, num_layers - 1)
        scores = _check_scores(label, scorer.finalize(one), shape, "update()")
        others = [r for r in range(num_layers) if r != row]
        if not np.allclose(scores[others], empty_scores[others], rtol=rtol, atol=0):
            _fail(
                label,
                f"an observation of layer {row} changed the scores of other layers; use "
                "obs.layer as the row (or pass layer_local=False if that is intended)",
            )

    # batching does not matter
    whole = observations(3, 20)
    halves = [_slice(o, slice(0, 9)) for o in whole], [_slice(o, slice(9, None)) for o in whole]
    np_close = _allclose(
        scorer.finalize(accumulate(whole)), scorer.finalize(accumulate(*halves)), rtol
    )
    if not np_close:
        _fail(
            label,
            "scores differ when the same tokens arrive in two batches instead of one; "
            "accumulate sums and counts and divide in finalize()",
        )

    # combine(a, b) == one accumulation over both
    combine: Callable = getattr(scorer, "combine", None) or _default_combine
    acc_b = accumulate(batch_b)
    copy_a, copy_b = _copy_acc(acc_a), _copy_acc(acc_b)
    merged = combine(acc_a, acc_b)
    if not (_same_acc(acc_a, copy_a) and _same_acc(acc_b, copy_b)):
        _fail(label, "combine(a, b) modified its arguments; return new arrays")
    if not isinstance(merged, dict) or merged.keys() != acc_a.keys():
        _fail(
            label,
            f"combine(a, b) must return a dict with the keys of init(), got "
            f"{type(merged).__name__} {list(merged) if isinstance(merged, dict) else ''}",
        )
    expected = scorer.finalize(accumulate(batch_a, batch_b))
    if not _allclose(scorer.finalize(merged), expected, rtol):
        how = "the scorer's combine()" if hasattr(scorer, "combine") else "the default sum"
        _fail(
            label,
            f"finalize(combine(a, b)) with {how} differs from one accumulation over "
            "both sets of observations, so merged stats files would be wrong; define "
            "combine(a, b) (e.g. maximum for a running max)",
        )

    # the stats file keeps the accumulators
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stats.npz"
        save_stats(
            path,
            {scorer.name: scores_a},
            {scorer.name: acc_a},
            np.zeros(num_layers, dtype=np.int64),
            {},
        )
        loaded = load_stats(path)
    if scorer.name not in loaded.scores or not _same_acc(
        loaded.accumulators.get(scorer.name, {}), acc_a
    ):
        _fail(
            label,
            "the accumulators do not survive save_stats/load_stats unchanged (keys "
            "must be plain strings; every value a float64 array)",
        )
    if not _allclose(scorer.finalize(loaded.accumulators[scorer.name]), scores_a, rtol):
        _fail(label, "finalize() of the reloaded accumulators differs from the original scores")


def _allclose(a, b, rtol) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=1e-12))


# ---------------------------------------------------------------------------------------------
# Selectors


def check_selector(
    selector,
    num_layers: int = 4,
    num_experts: int = 8,
    options: dict | None = None,
    expect_removal: bool = True,
    seed: int = 0,
) -> None:
    """Given random scores, ``select(scores, **options)`` returns a valid ``types.Selection``.

    For every layer position, ``keep`` and ``removed`` are sorted lists of Python ints that
    partition ``range(num_experts)``; ``num_experts`` lists each layer's expert count; at least
    ``top_k`` experts (``options["top_k"]``, default 2) stay; the scores are not modified; the
    same input gives the same answer; ties (all scores equal) give a valid answer too.
    ``options`` defaults to ``{"n": 2, "top_k": 2}``.
    """
    check_plugin("selector", selector)
    label = _label("selector", selector)
    options = {"n": 2, "top_k": 2} if options is None else dict(options)
    top_k = options.get("top_k", 1) or 1
    rng = np.random.default_rng(seed)
    scores = rng.random((num_layers, num_experts))
    original = scores.copy()
    selection = selector.select(scores, **options)
    if not np.array_equal(scores, original):
        _fail(label, "select() modified the scores it was given")
    _check_selection(label, selection, num_layers, num_experts, top_k, options)
    if expect_removal and selection.total_removed == 0:
        _fail(label, f"select(scores, **{options}) removed no expert")
    repeat = selector.select(scores.copy(), **options)
    if (repeat.keep, repeat.removed) != (selection.keep, selection.removed):
        _fail(label, "select() gave a different selection for the same scores; seed any randomness")
    tied = selector.select(np.ones((num_layers, num_experts)), **options)
    _check_selection(label + " on tied scores", tied, num_layers, num_experts, top_k, options)


def _check_selection(label, selection, num_layers, num_experts, top_k, options) -> None:
    if not isinstance(selection, Selection):
        _fail(
            label,
            f"select() must return mlxfun.core.types.Selection, got {type(selection).__name__}",
        )
    if list(selection.num_experts) != [num_experts] * num_layers:
        _fail(
            label,
            f"Selection.num_experts is {selection.num_experts}, expected "
            f"{[num_experts] * num_layers} (the expert count of each layer before removal)",
        )
    layers = set(range(num_layers))
    if set(selection.keep) != layers:
        _fail(
            label,
            f"Selection.keep has layer positions {sorted(selection.keep)}, expected "
            f"every position 0..{num_layers - 1}",
        )
    if not set(selection.removed) <= layers:
        _fail(
            label,
            f"Selection.removed has unknown layer positions "
            f"{sorted(set(selection.removed) - layers)}",
        )
    for layer in range(num_layers):
        keep, removed = selection.keep[layer], selection.removed.get(layer, [])
        for what, ids in (("keep", keep), ("removed", removed)):
            if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids
            ):
                _fail(
                    label,
                    f"{what}[{layer}] = {ids!r} must be a list of Python ints "
                    "(they are written to JSON; convert numpy integers with int())",
                )
            if ids != sorted(set(ids)):
                _fail(label, f"{what}[{layer}] = {ids} must be sorted without duplicates")
        if set(keep) & set(removed):
            _fail(
                label,
                f"layer {layer}: experts {sorted(set(keep) & set(removed))} are both "
                "kept and removed",
            )
        if set(keep) | set(removed) != set(range(num_experts)):
            _fail(
                label,
                f"layer {layer}: keep {keep} and removed {removed} do not cover the "
                f"experts 0..{num_experts - 1}",
            )
        if len(keep) < top_k:
            _fail(
                label,
                f"layer {layer} keeps {len(keep)} experts, fewer than top_k={top_k} "
                f"(options {options})",
            )


# ---------------------------------------------------------------------------------------------
# Adapters


def build_tiny_model(model_type: str, args: dict, seed: int = 0, module: str | None = None):
    """A tiny mlx-lm model with seeded random weights, for adapter tests.

    ``module`` is the ``mlx_lm.models`` module to build (default: ``model_type``). Parameters that
    mlx-lm initialises to a constant (zero routers or correction biases) are re-drawn so the
    routing really depends on the input.
    """
    import mlx.core as mx
    from mlx.utils import tree_map_with_path

    from .mlxlm_models import model_module

    models = model_module(module or model_type)
    mx.random.seed(seed)
    model = models.Model(models.ModelArgs.from_dict({"model_type": model_type, **args}))
    rng = np.random.default_rng(seed)

    def redraw(path, value):
        if not isinstance(value, mx.array) or not mx.issubdtype(value.dtype, mx.floating):
            return value
        flat = np.array(value)
        if flat.size and np.all(flat == flat.reshape(-1)[0]) and "norm" not in path:
            return mx.array(rng.normal(0.0, 0.3, value.shape).astype(np.float32))
        return value

    model.update(tree_map_with_path(redraw, model.parameters()))
    mx.eval(model.parameters())
    return model


def _vocab_size(model) -> int:
    args = getattr(model, "args", None)
    for holder in (args, getattr(args, "text_config", None)):
        value = (
            holder.get("vocab_size")
            if isinstance(holder, dict)
            else getattr(holder, "vocab_size", None)
        )
        if isinstance(value, int) and value > 0:
            return value
    return 32


def check_adapter(
    adapter,
    model,
    model_type: str,
    tokens=None,
    check_weights: bool = True,
    atol: float = 1e-4,
    config: dict | None = None,
):
    """The adapter finds the model's MoE layers and reproduces their routing exactly.

    - ``model_type`` is one of ``adapter.model_types`` and ``matches`` accepts ``config``;
    - ``moe_layers(model)`` finds at least one layer, in forward order, with positions 0..n-1,
      a path that leads to the block, an expert count and 1 <= top_k <= experts;
    - a forward observed through ``mlxfun.core.observe.Observer`` equals the plain forward
      bit for bit, and the model's classes are restored afterwards;
    - the adapter's routing selects exactly the experts every block used (the observer checks
      this on every token);
    - with ``check_weights``, every block's output equals the sum over its selected experts of
      gate weight times raw expert output, plus the ungated ``shared_attrs`` modules; turn it
      off for blocks that gate their shared experts or transform the sum.

    ``tokens`` (batch, seq) defaults to random ids below the vocabulary size; ``config`` (default
    ``{"model_type": model_type}``) is what ``matches`` must accept. Returns the observations of
    the forward.
    """
    import mlx.core as mx

    from .adapter import get_path, has_path
    from .hooks import call_hooks
    from .observe import Observer, RoutingMismatch

    check_plugin("adapter", adapter)
    label = _label("adapter", adapter)
    if model_type not in adapter.model_types:
        _fail(
            label,
            f"does not declare model_type {model_type!r} (model_types: "
            f"{tuple(adapter.model_types)})",
        )
    config = {"model_type": model_type} if config is None else config
    if not adapter.matches(config):
        _fail(label, f"matches() rejects the config {config!r}")

    layers = adapter.moe_layers(model)
    if not isinstance(layers, list) or not layers:
        _fail(
            label,
            f"moe_layers() found no MoE layer in this {type(model).__module__} model; "
            "check experts_attr (the experts module's attribute name on each block)",
        )
    for position, layer in enumerate(layers):
        where = f"MoE layer {position} ({getattr(layer, 'path', '?')})"
        if layer.position != position:
            _fail(label, f"{where} has position {layer.position}; positions must be 0..n-1")
        if position and layer.index <= layers[position - 1].index:
            _fail(label, f"{where}: moe_layers() must be in forward (decoder layer) order")
        if get_path(model, layer.path) is not layer.block:
            _fail(label, f"{where}: path {layer.path!r} does not lead to the block")
        if not (isinstance(layer.num_experts, int) and layer.num_experts > 0):
            _fail(label, f"{where}: num_experts {layer.num_experts!r} must be a positive int")
        if not (isinstance(layer.top_k, int) and 1 <= layer.top_k <= layer.num_experts):
            _fail(label, f"{where}: top_k {layer.top_k!r} must be in 1..{layer.num_experts}")

    if tokens is None:
        ids = np.random.default_rng(0).integers(0, min(_vocab_size(model), 256), (2, 12))
        tokens = mx.array(ids.astype(np.int32))
    classes = [type(m) for _, m in model.named_modules()]
    plain = model(tokens)
    observer = Observer(model, adapter, ALL_NEEDS)
    with observer:
        hooked = model(tokens)
    mx.eval(plain, hooked)
    if [type(m) for _, m in model.named_modules()] != classes:
        _fail(label, "the model's module classes were not restored after observation")
    if plain.shape != hooked.shape or not mx.array_equal(plain, hooked).item():
        _fail(label, "the observed forward differs from the plain one; hooks must only read")
    try:
        observations = observer.observations()
    except RoutingMismatch as exc:
        _fail(
            label,
            f"routing does not match the model: {exc}; route() must repeat the "
            "block's own router computation",
        )
    num_tokens = int(np.prod(tokens.shape))
    for layer, obs in zip(layers, observations):
        where = f"MoE layer {layer.position} ({layer.path})"
        if obs.selected.shape != (num_tokens, layer.top_k):
            _fail(
                label,
                f"{where}: observed selection {obs.selected.shape}, expected "
                f"(tokens, top_k) = {(num_tokens, layer.top_k)}",
            )
        if obs.weights.shape != obs.selected.shape or not np.all(np.isfinite(obs.weights)):
            _fail(label, f"{where}: gate weights must be finite and shaped like the selection")
        if obs.logits is not None and obs.logits.shape != (num_tokens, layer.num_experts):
            _fail(
                label,
                f"{where}: router logits {obs.logits.shape}, expected "
                f"{(num_tokens, layer.num_experts)}; the router must score every expert",
            )

    if check_weights:
        seen = {}

        def recorder(position):
            def wrapper(module, call, x, *args, **kwargs):
                out = call(x, *args, **kwargs)
                seen[position] = (x, out)
                return out

            return wrapper

        with call_hooks([(layer.block, recorder(layer.position)) for layer in layers]):
            mx.eval(model(tokens))
        for layer, obs in zip(layers, observations):
            x, out = seen[layer.position]
            rebuilt = np.einsum(
                "tk,tkh->th", obs.weights.astype(np.float64), obs.outputs.astype(np.float64)
            )
            for attr in getattr(adapter, "shared_attrs", ()):
                if not has_path(layer.block, attr):  # shared experts can be configured away
                    continue
                shared = get_path(layer.block, attr)(x).astype(mx.float32)
                rebuilt += np.array(shared, dtype=np.float64).reshape(rebuilt.shape)
            actual = np.array(out.astype(mx.float32), dtype=np.float64).reshape(rebuilt.shape)
            scale = max(1.0, float(np.abs(actual).max()))
            error = float(np.abs(actual - rebuilt).max())
            if error > atol * scale:
                _fail(
                    label,
                    f"MoE layer {layer.position} ({layer.path}): the block's output is "
                    f"not sum(weight * expert output) + shared experts (max difference "
                    f"{error:.3g}); the weights route() returns must be the factors the "
                    "block multiplies (renormalisation, scaling); pass check_weights=False "
                    "for blocks that gate their shared experts",
                )
    return observations


# ---------------------------------------------------------------------------------------------
# Plugin manager state in tests


@contextmanager
def registered_plugin(
    plugin, name: str, distribution: str = "local", version: str = "0"
) -> Iterator:
    """Register an in-process plugin (a module or object with hookimpls) for a ``with`` block;
    it is unregistered afterwards, also when registration itself fails."""
    from . import plugins

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
    from . import plugins

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


# ---------------------------------------------------------------------------------------------
# pytest-style base class


class PluginConformance:
    """Subclass as ``class TestMine(PluginConformance)`` and set ``plugin_kind`` and
    ``plugin_object``; adapters also define ``make_model(self) -> (model, model_type)``.

    ``check_registered`` (default True) also checks that the installed plugins register an
    object of that name, i.e. that your entry point works; set it False for objects you do not
    register. ``checks`` passes keyword arguments to the kind's check function (for instance
    ``{"options": {"n": 3, "top_k": 2}}`` for a selector, ``{"check_weights": False}`` for an
    adapter).
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
        else:
            check_plugin(kind, obj)

    def test_registered_by_name(self):
        if not self.check_registered:
            return
        from . import plugins

        kind, obj = self.plugin_kind, self.plugin_object
        found = plugins.registry()[kind].get(obj.name)
        if found is None:
            failed = plugins.failures()
            errors = "; ".join(f"{f.name}: {f.error}" for f in failed) or "none reported"
            raise AssertionError(
                f"{_label(kind, obj)} is not registered by any installed plugin (plugin errors: "
                f"{errors}); install your package and check its `mlxfun` entry point and "
                f"register_{kind}s hook"
            )
        if not (found.obj is obj or found.obj == obj):
            raise AssertionError(
                f"the registered {kind} {obj.name!r} (from {found.distribution}) is not this "
                "object; does another plugin use the same name?"
            )
