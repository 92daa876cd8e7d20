"""``check_selector``: a selector answers every request ``mlxfun prune`` makes with a valid
``Selection``, and ``mlxfun prune`` works with it.

The requests are scenarios on tiny models: ``--n`` and ``--ratio`` on a Qwen3-MoE model whose
MoE layers are decoder layers 1 and 2; ``--protect`` / ``--target`` and ``--min-keep`` on it; a
non-uniform model (layers of 7 and 6 experts, as a ``model-wide`` prune leaves them); a
DeepSeek-V3 group-limited router (2 groups). ``select`` gets exactly what the command passes
(``mlxfun.core.types.SelectOptions``): with ``commands`` the kit runs the ``prune`` compressor
itself and checks each call as it happens; without, it calls ``select`` with the options the
command passes for those models (a test of mlxfun's keeps the two equal).
"""

import copy

import attrs
import numpy as np

from ..errors import MlxfunError
from ..types import Selection, SelectOptions
from . import commands
from .failures import fail, plugin_label
from .plugin import check_plugin


@attrs.frozen
class Scenario:
    """One request of ``mlxfun prune``: the tiny model, the command's options (``request``,
    given the scores so that protected and targeted experts are ones that matter) and the
    ``select`` options it passes for them (``options``)."""

    name: str
    model: str  # commands.checkpoint name
    describe: str
    request: object  # (scores, n) -> CompressRequest fields
    options: object  # (scores, n) -> SelectOptions
    refusal_ok: bool = True  # an MlxfunError is a clean refusal the user sees as one line
    removes: bool = False  # must remove experts (with expect_removal)


def _lowest(row, count: int) -> list[int]:
    return sorted(int(e) for e in np.argsort(row, kind="stable")[:count])


def _highest(row) -> int:
    return int(np.argsort(row, kind="stable")[-1])


def _qwen(n=None, ratio=None, **changes) -> SelectOptions:
    options = dict(
        top_k=[2, 2],
        min_keep=[2, 2],
        num_experts=[8, 8],
        protect={},
        target={},
        layer_indices=[1, 2],
        n=n,
        ratio=ratio,
    )
    return SelectOptions(**{**options, **changes})


def _protect_request(scores, n):
    protect, target = _lowest(scores[0, :8], 2), [_highest(scores[1, :8])]
    return {"n": n, "min_keep": 3, "protect": {1: protect}, "target": {2: target}}


def _protect_options(scores, n):
    protect, target = _lowest(scores[0, :8], 2), [_highest(scores[1, :8])]
    return _qwen(n, min_keep=[3, 3], protect={0: protect}, target={1: target})


SCENARIOS = (
    Scenario(
        "n",
        "qwen3_moe",
        "mlxfun prune --n {n} on a tiny qwen3_moe model (MoE layers 1, 2: 8 experts, top-2)",
        lambda scores, n: {"n": n},
        lambda scores, n: _qwen(n),
        refusal_ok=False,
        removes=True,
    ),
    Scenario(
        "ratio",
        "qwen3_moe",
        "mlxfun prune --ratio 0.25 on a tiny qwen3_moe model (no n is passed)",
        lambda scores, n: {"ratio": 0.25},
        lambda scores, n: _qwen(ratio=0.25),
        removes=True,
    ),
    Scenario(
        "protect",
        "qwen3_moe",
        "mlxfun prune --n {n} --min-keep 3 --protect/--target (decoder layers 1, 2 = MoE layer "
        "positions 0, 1) on a tiny qwen3_moe model",
        _protect_request,
        _protect_options,
    ),
    Scenario(
        "min_keep",
        "qwen3_moe",
        "mlxfun prune --n {n} --min-keep 7 on a tiny qwen3_moe model (at most 1 may go)",
        lambda scores, n: {"n": n, "min_keep": 7},
        lambda scores, n: _qwen(n, min_keep=[7, 7]),
    ),
    Scenario(
        "nonuniform",
        "nonuniform",
        "mlxfun prune --n {n} on a non-uniform qwen3_moe model (7 and 6 experts; the scores "
        "have 7 columns)",
        lambda scores, n: {"n": n},
        lambda scores, n: _qwen(n, num_experts=[7, 6]),
    ),
    Scenario(
        "groups",
        "deepseek_v3",
        "mlxfun prune --n {n} on a tiny deepseek_v3 model (router groups: 2 groups of 4)",
        lambda scores, n: {"n": n},
        lambda scores, n: SelectOptions(
            top_k=[2, 2],
            min_keep=[4, 4],
            num_experts=[8, 8],
            protect={},
            target={},
            groups=2,
            layer_indices=[0, 1],
            n=n,
        ),
    ),
)
SCORE_SHAPES = {"qwen3_moe": (2, 8), "nonuniform": (2, 7), "deepseek_v3": (2, 8)}


def check_selector(
    selector,
    n: int = 2,
    expect_removal: bool = True,
    commands: bool = True,
    seed: int = 0,
) -> None:
    """``select`` answers what ``mlxfun prune`` asks with a valid ``types.Selection``, and the
    command works with it (``--n n``, ``--ratio``, ``--protect``/``--target``/``--min-keep``, a
    non-uniform model, router groups; see ``SCENARIOS``).

    Every call gets the command's own arguments (``types.SelectOptions``: per-layer lists,
    ``protect``/``target`` by MoE layer position) and must: not raise (an ``MlxfunError`` is a
    clean refusal, accepted except for plain ``--n``); not modify the scores; return a
    ``Selection`` whose ``keep``/``removed`` are ``dict[int, list[int]]`` of sorted Python ints
    partitioning each layer's ``range(num_experts[layer])``, with ``num_experts`` as given,
    at least ``min_keep[layer]`` kept, protected experts kept, targets removed, equal removals
    per router group; answer the same again; and answer tied scores validly too. With
    ``expect_removal``, ``--n`` and ``--ratio`` remove something.

    With ``commands`` (the default) the kit runs ``mlxfun prune`` itself on tiny checkpoints
    (through the ``prune`` compressor plugin, so ``mlxfun-methods`` and ``mlxfun-adapters``
    must be installed), checks every call as it happens, then writes one pruned model and
    loads it. Without, it calls ``select`` directly with those arguments on seeded random
    scores (only ``mlxfun-core`` needed).
    """
    check_plugin("selector", selector)
    label = plugin_label("selector", selector)
    for scenario in SCENARIOS:
        if commands:
            _through_prune(label, selector, scenario, n, expect_removal)
        else:
            scores = np.random.default_rng(seed).random(SCORE_SHAPES[scenario.model])
            options = scenario.options(scores, n).as_kwargs()
            checked = CheckedSelector(selector, label, scenario, n, expect_removal)
            try:
                checked.select(scores, **options)
            except MlxfunError:
                if checked.refused is None:
                    raise
    if commands:
        _write_and_load(label, selector, n)


@attrs.define
class CheckedSelector:
    """The selector under test as prune gets it from the registry: every call is checked and
    recorded (``calls``: the scores and options), a clean refusal is kept in ``refused``."""

    selector: object
    label: str
    scenario: Scenario
    n: int
    expect_removal: bool = False
    calls: list = attrs.field(factory=list)
    refused: MlxfunError | None = None

    @property
    def name(self) -> str:
        return self.selector.name

    @property
    def description(self) -> str:
        return self.selector.description

    def select(self, scores, **options) -> Selection:
        self.calls.append((np.array(scores, copy=True), copy.deepcopy(options)))
        where = self.scenario.describe.format(n=self.n)
        try:
            chosen = SelectOptions(**options)
        except TypeError as exc:
            raise AssertionError(
                f"mlxfun passed select() arguments that are not SelectOptions ({exc}); "
                "this is a bug in mlxfun, not in the selector"
            ) from None
        try:
            selection = _checked_call(self.label, self.selector, scores, options, chosen, where)
        except MlxfunError as exc:
            if not self.scenario.refusal_ok:
                fail(
                    self.label,
                    f"select() refused {where}: MlxfunError: {exc}; a selector must handle "
                    "the plain --n request",
                )
            self.refused = exc
            raise
        if self.expect_removal and self.scenario.removes and selection.total_removed == 0:
            fail(self.label, f"select() removed no expert for {where}")
        return selection


def _through_prune(label: str, selector, scenario: Scenario, n: int, expect_removal: bool):
    """One ``mlxfun prune --dry-run`` with the checked selector in the registry."""
    from ..stats import load_stats
    from .plugin_state import substituted_plugin

    model = run_kit_step(label, commands.checkpoint, scenario.model)
    stats = run_kit_step(label, commands.stats, scenario.model)
    scores = load_stats(stats).score(commands.KIT_SCORER)
    checked = CheckedSelector(selector, label, scenario, n, expect_removal)
    where = scenario.describe.format(n=n)
    request = dict(
        model=model,
        stats=stats,
        scorer=commands.KIT_SCORER,
        selector=selector.name,
        dry_run=True,
        **scenario.request(scores, n),
    )
    with commands.kit_plugins(), substituted_plugin("selector", checked):
        try:
            commands.run_step(label, where, commands.prune, **request)
        except AssertionError as exc:
            if checked.refused is not None and exc.__cause__ is checked.refused:
                return checked
            raise
    if not checked.calls:
        fail(label, f"{where} did not call select(); is the selector registered by name?")
    return checked


def run_kit_step(label: str, function, *args):
    """Make the kit's tiny checkpoints; a missing adapter or compressor says what to install."""
    try:
        return function(*args)
    except MlxfunError as exc:
        raise AssertionError(
            f"{label}: the kit runs mlxfun's commands on tiny models and needs the built-in "
            f"plugins (pip install mlxfun-adapters mlxfun-methods), or pass commands=False: "
            f"{exc}"
        ) from exc


def _write_and_load(label: str, selector, n: int) -> None:
    """``mlxfun prune --n n`` writes a model that mlxfun loads, with the kept experts."""
    from .plugin_state import substituted_plugin

    output = commands.scratch() / f"pruned-{selector.name}"
    if output.exists():
        import shutil

        shutil.rmtree(output)
    where = f"mlxfun prune --n {n} (writing {output.name}) on a tiny qwen3_moe model"
    with commands.kit_plugins(), substituted_plugin("selector", selector):
        summary = commands.run_step(
            label,
            where,
            commands.prune,
            model=commands.checkpoint("qwen3_moe"),
            stats=commands.stats("qwen3_moe"),
            output=output,
            scorer=commands.KIT_SCORER,
            selector=selector.name,
            n=n,
        )
        model, adapter = commands.run_step(
            label, f"loading the output of {where}", commands.load_and_run, output
        )
    counts = [layer.num_experts for layer in adapter.moe_layers(model)]
    kept = [len(summary["keep"][str(index)]) for index in (1, 2)]
    if counts != kept:
        fail(label, f"the pruned model has {counts} experts per MoE layer, the keep map {kept}")


def _checked_call(label, selector, scores, options: dict, chosen: SelectOptions, where: str):
    """``select(scores, **options)`` checked: no exception but an ``MlxfunError``, scores
    untouched, a valid selection, the same answer twice, a valid answer on tied scores."""
    original = np.array(scores, copy=True)
    selection = _call(label, selector, scores, options, where)
    if not np.array_equal(scores, original):
        fail(label, "select() modified the scores it was given; work on a copy")
    check_selection(label, selection, chosen, where)
    again = _call(label, selector, original.copy(), options, where)
    if not isinstance(again, Selection) or (again.keep, again.removed) != (
        selection.keep,
        selection.removed,
    ):
        fail(label, f"select() gave a different selection for the same scores ({where})")
    tied = _call(label, selector, np.ones_like(original), options, where)
    check_selection(f"{label} on tied scores", tied, chosen, where)
    return selection


def _call(label, selector, scores, options: dict, where: str):
    try:
        return selector.select(scores, **copy.deepcopy(options))
    except MlxfunError:
        raise
    except Exception as exc:
        raise AssertionError(_raised(label, selector, scores, options, where, exc)) from exc


def _raised(label, selector, scores, options: dict, where: str, exc: Exception) -> str:
    """What went wrong, the arguments with their types, and the argument to blame when the
    call works with it as a plain int."""
    message = f"{label}: select() raised {type(exc).__name__}: {exc}, called as {where} calls it"
    hint = _blame(selector, scores, options, exc)
    return f"{message}; {hint}{describe_call(scores, options)}"


def _blame(selector, scores, options: dict, exc: Exception) -> str:
    if isinstance(exc, TypeError) and "unexpected keyword argument" in str(exc):
        return (
            "accept **options: mlxfun passes every field of mlxfun.core.types.SelectOptions "
            "and may add more; "
        )
    for name in ("top_k", "min_keep", "num_experts"):
        value = options.get(name)
        if not (isinstance(value, list) and value and len(set(value)) == 1):
            continue
        try:
            selector.select(
                np.array(scores, copy=True), **{**copy.deepcopy(options), name: value[0]}
            )
        except Exception:
            continue
        return (
            f"it works when {name} is an int, but {name} is a list[int] with one value per MoE "
            f"layer position (here {value}): use {name}[layer]; "
        )
    return ""


def describe_call(scores, options: dict) -> str:
    """``select()``'s arguments with their documented types and values."""
    types = {field.name: field.type for field in attrs.fields(SelectOptions)}
    shape = tuple(np.shape(scores))
    parts = [f"scores: {np.asarray(scores).dtype} array {shape}"]
    parts += [f"{name}: {types.get(name, '?')} = {value!r}" for name, value in options.items()]
    return (
        "the arguments were " + ", ".join(parts) + " (see SelectOptions in mlxfun.core.types "
        "and docs/plugins.md, Types)"
    )


def check_selection(label: str, selection, chosen: SelectOptions, where: str = "") -> None:
    """``selection`` is a valid answer to ``select(scores, **chosen.as_kwargs())``."""
    if not isinstance(selection, Selection):
        fail(
            label,
            f"select() returned a {type(selection).__name__}, expected "
            "mlxfun.core.types.Selection(keep, removed, num_experts)",
        )
    layers = len(chosen.num_experts)
    for what in ("keep", "removed"):
        value = getattr(selection, what)
        if not isinstance(value, dict):
            fail(
                label,
                f"Selection.{what} is a {type(value).__name__} ({_short(value)}), expected "
                f"dict[int, list[int]]: MoE layer position (0..{layers - 1}) -> sorted expert ids",
            )
        bad = [k for k in value if type(k) is not int]
        if bad:
            fail(
                label,
                f"Selection.{what} has keys {bad!r} of type {type(bad[0]).__name__}, expected "
                "Python int MoE layer positions (convert numpy integers with int())",
            )
    if sorted(selection.keep) != list(range(layers)):
        fail(
            label,
            f"Selection.keep has layer positions {sorted(selection.keep)}, expected every MoE "
            f"layer position 0..{layers - 1} (positions, not decoder layer indices "
            f"{chosen.layer_indices})",
        )
    if not set(selection.removed) <= set(range(layers)):
        fail(
            label,
            f"Selection.removed has layer positions {sorted(selection.removed)} outside "
            f"0..{layers - 1} (positions, not decoder layer indices {chosen.layer_indices})",
        )
    if not isinstance(selection.num_experts, list) or list(selection.num_experts) != list(
        chosen.num_experts
    ):
        fail(
            label,
            f"Selection.num_experts is {selection.num_experts!r}, expected {chosen.num_experts} "
            "(list[int]: the num_experts option, each layer's count before removal)",
        )
    for position in range(layers):
        _check_layer(label, selection, chosen, position, where)


def _check_layer(label: str, selection, chosen: SelectOptions, position: int, where: str):
    layer = f"MoE layer position {position} (decoder layer {chosen.layer_indices[position]})"
    keep, removed = selection.keep[position], selection.removed.get(position, [])
    for what, ids in (("keep", keep), ("removed", removed)):
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            held = sorted({type(i).__name__ for i in ids}) if isinstance(ids, list) else []
            fail(
                label,
                f"Selection.{what}[{position}] is a {type(ids).__name__}"
                + (f" of {', '.join(held)}" if held else "")
                + f" ({ids!r}), expected list[int] of Python ints "
                "(they are written to JSON; convert numpy integers with int())",
            )
        if ids != sorted(set(ids)):
            fail(label, f"Selection.{what}[{position}] = {ids} must be sorted without duplicates")
    count = chosen.num_experts[position]
    if set(keep) & set(removed):
        fail(label, f"{layer}: experts {sorted(set(keep) & set(removed))} are kept and removed")
    if set(keep) | set(removed) != set(range(count)):
        fail(
            label,
            f"{layer}: keep {keep} and removed {removed} do not cover exactly its experts "
            f"0..{count - 1} (num_experts[{position}] = {count}; the scores may have more "
            f"columns) in {where}",
        )
    if len(keep) < chosen.min_keep[position]:
        fail(
            label,
            f"{layer} keeps {len(keep)} experts, fewer than min_keep[{position}] = "
            f"{chosen.min_keep[position]} (min_keep and top_k are lists, one per layer) in {where}",
        )
    lost = sorted(set(chosen.protect.get(position, [])) & set(removed))
    if lost:
        fail(
            label,
            f"{layer}: protected experts {lost} were removed (protect = {chosen.protect}, keyed "
            f"by MoE layer position) in {where}",
        )
    kept = sorted(set(chosen.target.get(position, [])) & set(keep))
    if kept:
        fail(
            label,
            f"{layer}: targeted experts {kept} were kept (target = {chosen.target}, keyed by "
            f"MoE layer position) in {where}",
        )
    if chosen.groups > 1:
        size = count // chosen.groups
        gone = [sum(1 for e in removed if e // size == g) for g in range(chosen.groups)]
        if len(set(gone)) != 1:
            fail(
                label,
                f"{layer} removes {gone} experts from its {chosen.groups} router groups of "
                f"{size}; groups > 1 needs the same number from each (or raise MlxfunError to "
                f"refuse) in {where}",
            )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
