"""The conformance kit catches the mistakes plugin authors make, with messages that say what
to fix; and it imports neither Typer, SciPy nor MLX."""

import subprocess
import sys

import attrs
import mlx.core as mx
import numpy as np
import pytest
from mlxfun.core import testing
from mlxfun.core.errors import MlxfunError
from mlxfun.core.types import Selection

from .test_core_hooks import ADAPTER, TinyMoE
from .test_core_plugins import BottomSelector, CountScorer, MethodsPlugin
from .test_core_stats import MeanWeightScorer


def fails(match):
    return pytest.raises(AssertionError, match=match)


# ----- every kind


def test_check_plugin_names_missing_attributes():
    class NoFinalize:
        name = "half"
        description = "half a scorer"
        needs = frozenset()

        def init(self, num_layers, num_experts): ...

        def update(self, acc, obs): ...

    with fails("scorer 'half' \\(NoFinalize\\): lacks finalize"):
        testing.check_plugin("scorer", NoFinalize())
    with fails("unknown plugin kind 'scorers'"):
        testing.check_plugin("scorers", CountScorer())


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"name": "two words"}, "name 'two words' must be"),
        ({"name": "dotted.name"}, "stats file keys"),
        ({"description": ""}, "description '' must be one non-empty line"),
        ({"needs": frozenset({"gradients"})}, "needs \\['gradients'\\] are not observable"),
        ({"needs": ["selected"]}, "needs must be a frozenset"),
        ({"update": "not callable"}, "update must be callable"),
    ],
)
def test_check_plugin_types(changes, match):
    scorer = CountScorer()
    for key, value in changes.items():
        setattr(scorer, key, value)
    with fails(match):
        testing.check_plugin("scorer", scorer)


def test_check_plugin_adapter_declarations():
    testing.check_plugin("adapter", ADAPTER)
    with fails("model_types must be a non-empty tuple"):
        testing.check_plugin("adapter", attrs.evolve(ADAPTER, model_types=()))

    class Greedy:
        name = "greedy"
        description = "matches everything"
        model_types = ("x",)

        def matches(self, config):
            return True

        def moe_layers(self, model):
            return []

    with fails("accepts a config of an unknown model_type"):
        testing.check_plugin("adapter", Greedy())


# ----- scorers


class Float32Init(CountScorer):
    def init(self, num_layers, num_experts):
        return {"count": np.zeros((num_layers, num_experts), dtype=np.float32)}


class SharedArrays(CountScorer):
    acc = None

    def init(self, num_layers, num_experts):
        if SharedArrays.acc is None or SharedArrays.acc.shape != (num_layers, num_experts):
            SharedArrays.acc = np.zeros((num_layers, num_experts))
        return {"count": SharedArrays.acc}


class NoUpdate(CountScorer):
    def update(self, acc, obs):
        acc = {"count": acc["count"] + 1}  # rebinds instead of changing in place


class UndeclaredNorms(CountScorer):
    def update(self, acc, obs):
        np.add.at(acc["count"][obs.layer], obs.selected.reshape(-1), obs.norms.reshape(-1))


class ReturnsNew(CountScorer):
    def update(self, acc, obs):
        new = {"count": acc["count"].copy()}
        np.add.at(new["count"][obs.layer], obs.selected.reshape(-1), 1.0)
        return new


class WrongShape(CountScorer):
    def finalize(self, acc):
        return acc["count"].T


class NaNForUnrouted(MeanWeightScorer):
    def finalize(self, acc):
        return acc["sum"] / acc["count"]


class MutatingFinalize(CountScorer):
    def finalize(self, acc):
        acc["count"] /= max(acc["count"].sum(), 1.0)
        return acc["count"]


class IgnoresLayer(CountScorer):
    def update(self, acc, obs):
        np.add.at(acc["count"][0], obs.selected.reshape(-1), 1.0)


class PerBatchMean(CountScorer):
    def update(self, acc, obs):  # mean of the batch, not a running sum: depends on batching
        counts = np.bincount(obs.selected.reshape(-1), minlength=acc["count"].shape[1])
        acc["count"][obs.layer] = counts / obs.num_tokens


class MaxWithoutCombine(CountScorer):
    def update(self, acc, obs):
        np.maximum.at(
            acc["count"][obs.layer],
            obs.selected.reshape(-1),
            obs.weights.reshape(-1).astype(np.float64),
        )


@pytest.mark.parametrize(
    "scorer, match",
    [
        (Float32Init(), "init\\(\\)\\['count'\\] must be a float64 numpy array"),
        (SharedArrays(), "init\\(\\) returned arrays shared between calls"),
        (NoUpdate(), "update\\(\\) did not change the accumulators"),
        (UndeclaredNorms(), "an observation has only selected, weights and what `needs` lists"),
        (ReturnsNew(), "update\\(\\) returned new accumulators; .* change `acc` in place"),
        (WrongShape(), "gave shape \\(8, 3\\), expected \\(num_layers, num_experts\\)"),
        (NaNForUnrouted(), "gave NaN or inf"),
        (MutatingFinalize(), "finalize\\(\\) modified the accumulators"),
        (IgnoresLayer(), "changed the scores of other layers"),
        (PerBatchMean(), "scores differ when the same tokens arrive in two batches"),
        (MaxWithoutCombine(), "finalize\\(combine\\(a, b\\)\\) with the default sum differs"),
    ],
    ids=lambda value: type(value).__name__ if not isinstance(value, str) else "",
)
def test_check_scorer_catches(scorer, match):
    with np.errstate(all="ignore"), fails(match):
        testing.check_scorer(scorer, commands=False)


def test_make_observation_is_shaped_like_the_observer():
    obs = testing.make_observation(
        layer=2,
        num_experts=5,
        num_tokens=7,
        top_k=3,
        needs={"selected", "norms"},
        never_routed=(4,),
    )
    assert obs.layer == 2 and obs.num_tokens == 7
    assert obs.selected.shape == obs.weights.shape == obs.norms.shape == (7, 3)
    assert np.all(np.diff(obs.selected, axis=-1) > 0) and obs.selected.max() < 4
    np.testing.assert_allclose(obs.weights.sum(-1), 1.0, rtol=1e-6)
    assert obs.outputs is None and obs.logits is None


# ----- selectors: each mistake a selector written without the documented types makes


class Unsorted(BottomSelector):
    def select(self, scores, **options):
        sel = super().select(scores, **options)
        return Selection({k: v[::-1] for k, v in sel.keep.items()}, sel.removed, sel.num_experts)


class NumpyInts(BottomSelector):
    def select(self, scores, **options):
        sel = super().select(scores, **options)
        keep = {k: list(np.array(v)) for k, v in sel.keep.items()}
        return Selection(keep, sel.removed, sel.num_experts)


class NumpyKeys(BottomSelector):
    def select(self, scores, **options):
        sel = super().select(scores, **options)
        keep = {np.int64(k): v for k, v in sel.keep.items()}
        return Selection(keep, sel.removed, sel.num_experts)


class KeepAsList(BottomSelector):
    """The raw ``TypeError: unhashable type: 'list'`` of the old kit."""

    def select(self, scores, **options):
        sel = super().select(scores, **options)
        return Selection(list(sel.keep.values()), sel.removed, sel.num_experts)


class IntTopK(BottomSelector):
    def select(self, scores, n=1, top_k=1, **options):
        n = min(n, scores.shape[1] - top_k)  # top_k is a list: TypeError
        return super().select(scores, n=n, top_k=[top_k] * scores.shape[0], **options)


class NoKeywords:
    name = "no-keywords"
    description = "accepts only n and top_k"

    def select(self, scores, n, top_k):
        return BottomSelector().select(scores, n=n, top_k=top_k)


class IgnoresMinKeep(BottomSelector):
    def select(self, scores, **options):
        return super().select(scores, **{**options, "min_keep": options["top_k"]})


class DecoderIndexKeys(BottomSelector):
    """Keys its answer by decoder layer index instead of MoE layer position."""

    def select(self, scores, **options):
        sel = super().select(scores, **options)
        index = options["layer_indices"]
        return Selection(
            {index[k]: v for k, v in sel.keep.items()},
            {index[k]: v for k, v in sel.removed.items()},
            sel.num_experts,
        )


class IgnoresProtect(BottomSelector):
    def select(self, scores, **options):
        return super().select(scores, **{**options, "protect": {}})


class IgnoresTarget(BottomSelector):
    def select(self, scores, **options):
        return super().select(scores, **{**options, "target": {}})


class WholeWidth(BottomSelector):
    """Ignores ``num_experts``: partitions every column of the scores."""

    def select(self, scores, **options):
        return super().select(scores, **{**options, "num_experts": None})


class IgnoresGroups(BottomSelector):
    def select(self, scores, **options):
        return super().select(scores, **{**options, "groups": 1})


class RefusesAll(BottomSelector):
    def select(self, scores, **options):
        raise MlxfunError("lowest cannot do this")


class RemovesTooMany(BottomSelector):
    def select(self, scores, **options):
        return super().select(scores, **{**options, "n": 6, "min_keep": [1] * scores.shape[0]})


class Overlapping(BottomSelector):
    def select(self, scores, **options):
        sel = super().select(scores, **options)
        return Selection(
            {k: list(range(sel.num_experts[k])) for k in sel.keep}, sel.removed, sel.num_experts
        )


class Random(BottomSelector):
    def select(self, scores, **options):
        return super().select(np.random.random(scores.shape), **options)


class SortsInPlace(BottomSelector):
    def select(self, scores, **options):
        scores.sort(axis=-1)
        return super().select(scores, **options)


class ReturnsDict(BottomSelector):
    def select(self, scores, **options):
        return {"keep": {}, "removed": {}}


SELECTOR_MISTAKES = [
    (Unsorted(), "Selection.keep\\[0\\] = \\[7, 6, .*must be sorted"),
    (
        NumpyInts(),
        "Selection.keep\\[0\\] is a list of int64 .*expected list\\[int\\] of Python ints",
    ),
    (NumpyKeys(), "Selection.keep has keys .* of type int64, expected Python int"),
    (KeepAsList(), "Selection.keep is a list .* expected dict\\[int, list\\[int\\]\\]"),
    (IntTopK(), "raised TypeError.* it works when top_k is an int, but top_k is a list\\[int\\]"),
    (NoKeywords(), "unexpected keyword argument .* accept \\*\\*options"),
    (IgnoresMinKeep(), "keeps 6 experts, fewer than min_keep\\[0\\] = 7"),
    (DecoderIndexKeys(), "positions, not decoder layer indices \\[1, 2\\]"),
    (IgnoresProtect(), "protected experts \\[.*\\] were removed"),
    (IgnoresTarget(), "targeted experts \\[.*\\] were kept"),
    (WholeWidth(), "Selection.num_experts is \\[7, 7\\], expected \\[7, 6\\]"),
    (IgnoresGroups(), "removes \\[.*\\] experts from its 2 router groups"),
    (RefusesAll(), "select\\(\\) refused mlxfun prune --n 2 .*: MlxfunError: lowest cannot"),
    (RemovesTooMany(), "keeps 2 experts, fewer than min_keep\\[0\\] = 3"),
    (Overlapping(), "are kept and removed"),
    (Random(), "different selection for the same scores"),
    (SortsInPlace(), "select\\(\\) modified the scores"),
    (ReturnsDict(), "select\\(\\) returned a dict, expected mlxfun.core.types.Selection"),
]


@pytest.mark.parametrize(
    "selector, match",
    SELECTOR_MISTAKES,
    ids=lambda value: type(value).__name__ if not isinstance(value, str) else "",
)
def test_check_selector_catches(selector, match):
    with fails(f"selector '{selector.name}' \\({type(selector).__name__}\\).*{match}"):
        testing.check_selector(selector, commands=False)


def test_check_selector_accepts_clean_refusals_and_can_expect_no_removal():
    testing.check_selector(BottomSelector(), commands=False)  # it refuses router groups
    with fails("removed no expert for mlxfun prune --n 0"):
        testing.check_selector(BottomSelector(), n=0, commands=False)
    testing.check_selector(BottomSelector(), n=0, expect_removal=False, commands=False)


# ----- adapters


@pytest.fixture(scope="module")
def model():
    mx.random.seed(1)
    model = TinyMoE()
    mx.eval(model.parameters())
    return model


def test_check_adapter_catches_wrong_routing(model):
    def lowest(block, logits):
        indices = mx.argpartition(logits, kth=1, axis=-1)[..., :2]
        return indices, mx.softmax(mx.take_along_axis(logits, indices, axis=-1), axis=-1)

    with fails("routing does not match the model: .*differs from the block's"):
        testing.check_adapter(
            attrs.evolve(ADAPTER, route=lowest), model, "tiny_moe", commands=False
        )


def test_check_adapter_catches_wrong_weights(model):
    def unnormalised(block, logits):
        indices, _ = ADAPTER.route(block, logits)
        return indices, mx.take_along_axis(mx.softmax(logits, axis=-1), indices, axis=-1)

    wrong = attrs.evolve(ADAPTER, route=unnormalised)
    with fails("the block's output is not sum\\(weight \\* expert output\\)"):
        testing.check_adapter(wrong, model, "tiny_moe", commands=False)
    testing.check_adapter(wrong, model, "tiny_moe", check_weights=False, commands=False)


def test_check_adapter_catches_missing_layers_and_types(model):
    with fails("found no MoE layer .* check experts_attr"):
        testing.check_adapter(
            attrs.evolve(ADAPTER, experts_attr="mlp"), model, "tiny_moe", commands=False
        )
    with fails("does not declare model_type 'qwen3_moe'"):
        testing.check_adapter(ADAPTER, model, "qwen3_moe", commands=False)


# ----- the base class


class TestConformanceBaseClass(testing.PluginConformance):
    plugin_kind = "selector"
    plugin_object = BottomSelector()
    check_registered = False
    checks = {"n": 3, "commands": False}


class TestConformanceOfAnAdapter(testing.PluginConformance):
    plugin_kind = "adapter"
    plugin_object = ADAPTER
    check_registered = False
    checks = {"commands": False}  # TinyMoE is no mlx-lm model: it cannot be saved and loaded

    def make_model(self):
        mx.random.seed(2)
        return TinyMoE(), "tiny_moe"


def test_registered_by_name_checks_the_entry_point():
    class Conformance(testing.PluginConformance):
        plugin_kind = "scorer"
        plugin_object = CountScorer()

    with testing.fresh_plugin_state(MLXFUN_LOAD_PLUGINS=""):
        with fails("scorer 'count' \\(CountScorer\\) is not registered by any installed plugin"):
            Conformance().test_registered_by_name()
        with testing.registered_plugin(MethodsPlugin(), "methods-test"):
            with fails("is not this object; does another plugin use the same name"):
                Conformance().test_registered_by_name()


def test_an_adapter_without_make_model_says_what_to_define():
    class Conformance(testing.PluginConformance):
        plugin_kind = "adapter"
        plugin_object = ADAPTER

    with pytest.raises(NotImplementedError, match="define make_model"):
        Conformance().test_protocol()


# ----- imports


def test_the_kit_and_core_import_without_typer_scipy_or_mlx():
    code = (
        "import sys\n"
        "sys.modules['typer'] = sys.modules['scipy'] = None  # importing them now fails\n"
        "import mlxfun.core, mlxfun.core.plugins, mlxfun.core.stats, mlxfun.core.testing\n"
        "import mlxfun.core.adapter, mlxfun.core.observe, mlxfun.core.hooks, mlxfun.core.models\n"
        "import mlxfun.core.collect, mlxfun.core.datasets, mlxfun.core.outputs, mlxfun.core.types\n"
        "heavy = [m for m in ('mlx', 'mlx_lm', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
