"""``check_scorer``: a scorer accumulates exactly and merges exactly."""

import tempfile
from collections.abc import Callable
from pathlib import Path

import attrs
import numpy as np

from ..types import LayerObservation
from .failures import fail, plugin_label
from .observations import make_observation
from .plugin import check_plugin


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
        fail(
            label,
            f"finalize() after {what} gave shape {array.shape}, expected "
            f"(num_layers, num_experts) = {shape}",
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        fail(label, f"finalize() after {what} gave dtype {array.dtype}, expected a float array")
    if not np.all(np.isfinite(array)):
        fail(
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
    commands: bool = True,
) -> None:
    """A scorer accumulates exactly and merges exactly, and ``mlxfun collect``, ``mlxfun stats
    merge`` and ``mlxfun prune`` work with it.

    On synthetic observations shaped like the observer's (``make_observation``), called as
    ``collect`` calls a scorer (``init(num_layers, num_experts)``, ``update(acc, obs)`` per
    layer and batch, ``finalize(acc)``):

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

    With ``commands`` (the default; needs ``mlxfun-adapters`` and ``mlxfun-methods``), the
    commands' own path on a tiny Qwen3-MoE checkpoint: ``mlxfun collect --scorers <name>``
    writes finite (MoE layers, experts) scores, ``finalize`` of the stored accumulators; ``mlxfun
    stats merge`` of collects over two halves of the text equals one collect over all of it;
    ``mlxfun prune --scorer <name> --dry-run`` ranks by them.
    """
    check_plugin("scorer", scorer)
    trial = _Trial(
        scorer,
        plugin_label("scorer", scorer),
        num_layers,
        num_experts,
        top_k,
        frozenset(scorer.needs),
    )
    empty, empty_scores = _check_init(trial)
    batch_a, batch_b = trial.observations(1, 12), trial.observations(2, 7)
    acc_a = _check_update(trial, batch_a, empty)
    scores_a = _check_finalize(trial, acc_a)
    if layer_local:
        _check_layer_local(trial, batch_a, empty_scores, rtol)
    _check_batching(trial, rtol)
    _check_combine(trial, acc_a, batch_a, batch_b, rtol)
    _check_stats_file(trial, acc_a, scores_a, rtol)
    if commands:
        _check_commands(trial, rtol)


@attrs.frozen
class _Trial:
    """One scorer under test: synthetic observations for it, and accumulations of them that
    fail with a message when ``update`` misbehaves."""

    scorer: object
    label: str
    num_layers: int
    num_experts: int
    top_k: int
    needs: frozenset

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_layers, self.num_experts)

    def observations(self, seed: int, tokens: int) -> list[LayerObservation]:
        """One observation per layer, with only what the scorer needs; the last expert is
        never routed to."""
        return [
            make_observation(
                layer,
                self.num_experts,
                tokens + 3 * layer,
                self.top_k,
                self.needs | {"selected", "weights"},
                seed=seed * 100 + layer,
                never_routed=(self.num_experts - 1,),
            )
            for layer in range(self.num_layers)
        ]

    def accumulate(self, *batches) -> dict:
        result = self.scorer.init(*self.shape)
        for batch in batches:
            for obs in batch:
                try:
                    returned = self.scorer.update(result, obs)
                except (AttributeError, TypeError) as exc:
                    missing = [f for f in ("norms", "logits", "outputs") if getattr(obs, f) is None]
                    fail(
                        self.label,
                        f"update() failed with {type(exc).__name__}: {exc}; an observation "
                        f"has only selected, weights and what `needs` lists "
                        f"({sorted(self.needs)}), here not: {', '.join(missing)}",
                    )
                if returned is not None and returned is not result:
                    fail(
                        self.label,
                        "update() returned new accumulators; mlxfun ignores what it returns, "
                        "so change `acc` in place",
                    )
        return result

    def scores(self, acc, what: str) -> np.ndarray:
        return _check_scores(self.label, self.scorer.finalize(acc), self.shape, what)


def _check_init(trial: _Trial) -> tuple[dict, np.ndarray]:
    """``init`` gives a dict of float64 arrays under plain string keys; returns a copy of them
    and their scores."""
    label = trial.label
    acc = trial.scorer.init(trial.num_layers, trial.num_experts)
    if not isinstance(acc, dict):
        fail(label, f"init() must return a dict of numpy arrays, got {type(acc).__name__}")
    for key, value in acc.items():
        if not isinstance(key, str) or not key or any(c.isspace() for c in key):
            fail(label, f"init() key {key!r} must be a non-empty str without spaces")
        if not isinstance(value, np.ndarray) or value.dtype != np.float64:
            fail(
                label,
                f"init()[{key!r}] must be a float64 numpy array (exact sums), got "
                f"{getattr(value, 'dtype', type(value).__name__)}",
            )
    empty = _copy_acc(acc)
    return empty, trial.scores(trial.scorer.init(*trial.shape), "init()")


def _check_update(trial: _Trial, batch, empty: dict) -> dict:
    """``init`` gives fresh arrays and ``update`` changes them in place, keeping shapes and
    dtype; returns the accumulators of ``batch``."""
    label = trial.label
    other = trial.scorer.init(*trial.shape)
    acc = trial.accumulate(batch)
    if not _same_acc(other, empty):
        fail(
            label,
            "init() returned arrays shared between calls (updating one accumulator "
            "changed another); create new arrays in init()",
        )
    for key, value in acc.items():
        if value.shape != empty[key].shape or value.dtype != np.float64:
            fail(
                label,
                f"update() changed {key!r} from {empty[key].shape} float64 to "
                f"{value.shape} {value.dtype}; keep the accumulators' shapes and dtype",
            )
    if trial.needs and _same_acc(acc, empty):
        fail(
            label,
            f"update() did not change the accumulators although the scorer needs "
            f"{sorted(trial.needs)}; update must add the observation into `acc` in place",
        )
    return acc


def _check_finalize(trial: _Trial, acc: dict) -> np.ndarray:
    """``finalize``: the right shape, finite, no side effects, deterministic."""
    before = _copy_acc(acc)
    scores = trial.scores(acc, "update()")
    if not _same_acc(acc, before):
        fail(trial.label, "finalize() modified the accumulators; return a new array")
    again = trial.scores(acc, "update()")
    if not np.array_equal(scores, again):
        fail(trial.label, "finalize() gave different scores for the same accumulators")
    return scores


def _check_layer_local(trial: _Trial, batch, empty_scores: np.ndarray, rtol: float) -> None:
    """Observations of one layer change only that layer's row of scores."""
    row = min(1, trial.num_layers - 1)
    scores = trial.scores(trial.accumulate([batch[row]]), "update()")
    others = [r for r in range(trial.num_layers) if r != row]
    if not np.allclose(scores[others], empty_scores[others], rtol=rtol, atol=0):
        fail(
            trial.label,
            f"an observation of layer {row} changed the scores of other layers; use "
            "obs.layer as the row (or pass layer_local=False if that is intended)",
        )


def _check_batching(trial: _Trial, rtol: float) -> None:
    """The same tokens in two batches give the scores of one batch."""
    whole = trial.observations(3, 20)
    halves = [_slice(o, slice(0, 9)) for o in whole], [_slice(o, slice(9, None)) for o in whole]
    finalize = trial.scorer.finalize
    if not _allclose(finalize(trial.accumulate(whole)), finalize(trial.accumulate(*halves)), rtol):
        fail(
            trial.label,
            "scores differ when the same tokens arrive in two batches instead of one; "
            "accumulate sums and counts and divide in finalize()",
        )


def _check_combine(trial: _Trial, acc_a: dict, batch_a, batch_b, rtol: float) -> None:
    """``combine(a, b)`` (default: the sum) leaves ``a`` and ``b`` alone and equals one
    accumulation over both."""
    scorer, label = trial.scorer, trial.label
    combine: Callable = getattr(scorer, "combine", None) or _default_combine
    acc_b = trial.accumulate(batch_b)
    copy_a, copy_b = _copy_acc(acc_a), _copy_acc(acc_b)
    merged = combine(acc_a, acc_b)
    if not (_same_acc(acc_a, copy_a) and _same_acc(acc_b, copy_b)):
        fail(label, "combine(a, b) modified its arguments; return new arrays")
    if not isinstance(merged, dict) or merged.keys() != acc_a.keys():
        fail(
            label,
            f"combine(a, b) must return a dict with the keys of init(), got "
            f"{type(merged).__name__} {list(merged) if isinstance(merged, dict) else ''}",
        )
    expected = scorer.finalize(trial.accumulate(batch_a, batch_b))
    if not _allclose(scorer.finalize(merged), expected, rtol):
        how = "the scorer's combine()" if hasattr(scorer, "combine") else "the default sum"
        fail(
            label,
            f"finalize(combine(a, b)) with {how} differs from one accumulation over "
            "both sets of observations, so merged stats files would be wrong; define "
            "combine(a, b) (e.g. maximum for a running max)",
        )


def _check_stats_file(trial: _Trial, acc: dict, scores: np.ndarray, rtol: float) -> None:
    """The accumulators survive ``save_stats``/``load_stats`` and give the same scores."""
    from ..stats import load_stats, save_stats

    scorer, label = trial.scorer, trial.label
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stats.npz"
        save_stats(
            path,
            {scorer.name: scores},
            {scorer.name: acc},
            np.zeros(trial.num_layers, dtype=np.int64),
            {},
        )
        loaded = load_stats(path)
    if scorer.name not in loaded.scores or not _same_acc(
        loaded.accumulators.get(scorer.name, {}), acc
    ):
        fail(
            label,
            "the accumulators do not survive save_stats/load_stats unchanged (keys "
            "must be plain strings; every value a float64 array)",
        )
    if not _allclose(scorer.finalize(loaded.accumulators[scorer.name]), scores, rtol):
        fail(label, "finalize() of the reloaded accumulators differs from the original scores")


def _allclose(a, b, rtol) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=1e-12))


def _check_commands(trial: _Trial, rtol: float) -> None:
    """collect, stats merge and prune with the scorer, through the commands' functions."""
    import json

    from ..stats import load_stats, merge_stats
    from . import commands
    from .plugin_state import substituted_plugin
    from .selector import run_kit_step

    scorer, label, name = trial.scorer, trial.label, trial.scorer.name
    model = run_kit_step(label, commands.checkpoint, "qwen3_moe")
    folder = Path(tempfile.mkdtemp(dir=commands.scratch()))
    halves = folder / "first.jsonl", folder / "second.jsonl"
    for half, texts in zip(halves, (commands.CALIBRATION[:2], commands.CALIBRATION[2:])):
        half.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    where = f"mlxfun collect --scorers {name} on a tiny qwen3_moe model"
    with commands.kit_plugins(), substituted_plugin("scorer", scorer):
        # one sample per batch: each token's observation is the same in every collect
        for output, datasets in (("all", None), ("first", [halves[0]]), ("second", [halves[1]])):
            path = folder / f"{output}.npz"
            commands.run_step(label, where, commands.collect, model, [name], path, datasets, 1)
        whole, first, second = (load_stats(folder / f"{n}.npz") for n in ("all", "first", "second"))
        scores = whole.score(name)
        if scores.shape != (2, 8) or not np.all(np.isfinite(scores)):
            fail(label, f"{where} stored scores of shape {scores.shape}, expected finite (2, 8)")
        if not _allclose(scorer.finalize(whole.accumulators[name]), scores, rtol):
            fail(label, f"finalize() of the accumulators {where} stored differs from its scores")
        merged = commands.run_step(
            label, "mlxfun stats merge", merge_stats, [first, second], {name: scorer}, "sum"
        )
        if not _allclose(merged.scores[name], scores, rtol):
            fail(
                label,
                "mlxfun stats merge of collects over two halves of the text differs from one "
                "collect over all of it; accumulate sums (or define combine)",
            )
        commands.run_step(
            label,
            f"mlxfun prune --scorer {name} --dry-run",
            commands.prune,
            model=model,
            stats=folder / "all.npz",
            scorer=name,
            selector=commands.KIT_SELECTOR,
            n=1,
            dry_run=True,
        )
