"""The conformance kit runs the commands' own path (needs mlxfun-adapters and mlxfun-methods):
its calls are the commands' calls, its failures name the plugin and what to fix, and a plugin
that passes it works in the commands. The mistakes it catches without the commands are in
tests/core/test_core_testing.py."""

import re
import shutil

import attrs
import numpy as np
import pytest
from mlxfun.core import plugins, testing
from mlxfun.core.errors import MlxfunError
from mlxfun.core.outputs import atomic_output_dir
from mlxfun.core.stats import load_stats
from mlxfun.core.testing import commands
from mlxfun.core.testing.selector import SCENARIOS, CheckedSelector
from mlxfun.core.types import SelectOptions
from mlxfun.methods.ream import MergeRequest

from .adapters.harness import build_tiny
from .adapters.test_examples import MIXTRAL, QWEN3_MOE
from .core.test_core_plugins import BottomSelector, CountScorer
from .core.test_core_testing import SELECTOR_MISTAKES


def fails(match):
    return pytest.raises(AssertionError, match=match)


# ----- selectors


def test_the_kits_direct_calls_are_the_calls_prune_makes():
    """Without the commands, check_selector passes each scenario's SelectOptions; here the
    prune compressor makes the same requests and its calls must be exactly those options."""
    for scenario in SCENARIOS:
        recorder = CheckedSelector(plugins.get_selector("bottom"), "bottom", scenario, n=2)
        with commands.kit_plugins(), testing.substituted_plugin("selector", recorder):
            stats = commands.stats(scenario.model)
            scores = load_stats(stats).score(commands.KIT_SCORER)
            try:
                commands.prune(
                    model=commands.checkpoint(scenario.model),
                    stats=stats,
                    scorer=commands.KIT_SCORER,
                    selector="bottom",
                    dry_run=True,
                    **scenario.request(scores, 2),
                )
            except MlxfunError:
                assert scenario.refusal_ok
        seen, options = recorder.calls[0]
        np.testing.assert_array_equal(seen, scores)
        assert SelectOptions(**options) == scenario.options(scores, 2), scenario.name
        assert options == scenario.options(scores, 2).as_kwargs()


@pytest.mark.parametrize("name", ["bottom", "strided", "model-wide", "example_bottom"])
def test_installed_selectors_pass_the_kit_through_prune(name):
    testing.check_selector(plugins.get_selector(name), n=2)


@pytest.mark.parametrize(
    "selector, match",
    SELECTOR_MISTAKES,
    ids=lambda value: type(value).__name__ if not isinstance(value, str) else "",
)
def test_the_kit_catches_each_selector_mistake_inside_prune(selector, match):
    if type(selector).__name__ == "Unsorted":  # the real scores order the experts differently
        match = "Selection.keep\\[0\\] = \\[7, .*must be sorted"
    with fails(f"selector '{selector.name}' \\({type(selector).__name__}\\).*{match}"):
        testing.check_selector(selector)


def test_a_selector_passing_the_kit_writes_a_model_that_loads():
    testing.check_selector(BottomSelector())
    written = commands.scratch() / "pruned-lowest"
    model, adapter = commands.load_and_run(written)
    assert [layer.num_experts for layer in adapter.moe_layers(model)] == [6, 6]


# ----- scorers


class Recording(CountScorer):
    """Records what it observed, to show the kit ran the real collect with it."""

    name = "recording"
    seen: list = []

    def update(self, acc, obs):
        Recording.seen.append((obs.layer, obs.num_experts, obs.selected.dtype, obs.weights.dtype))
        super().update(acc, obs)


def test_check_scorer_runs_collect_merge_and_prune_with_the_scorer():
    Recording.seen.clear()
    testing.check_scorer(Recording())
    real = [s for s in Recording.seen if s[2] == np.uint32 and s[1] == 8]
    # synthetic observations have 3 layers; the tiny checkpoint's MoE layers are positions 0, 1
    assert {layer for layer, *_ in real} >= {0, 1}
    assert {(s[2], s[3]) for s in real} == {(np.dtype(np.uint32), np.dtype(np.float32))}


class FailsOnRealText(CountScorer):
    """Synthetic observations have at least 7 tokens; one short sample has fewer."""

    name = "short"

    def update(self, acc, obs):
        if obs.num_tokens < 7:
            raise IndexError(f"only {obs.num_tokens} tokens")
        super().update(acc, obs)


def test_a_scorer_failing_in_collect_fails_the_kit_naming_the_step():
    commands.CALIBRATION.append("12345")  # restored below
    try:
        with fails(
            "scorer 'short' \\(FailsOnRealText\\): mlxfun collect --scorers short on a tiny "
            "qwen3_moe model failed in scorer 'short' .*IndexError: only 5 tokens"
        ):
            testing.check_scorer(FailsOnRealText())
    finally:
        commands.CALIBRATION.pop()
        commands._cache.pop("calibration", None)


@pytest.mark.parametrize("name", ["reap", "frequency", "ean_mean", "token_share", "random"])
def test_installed_scorers_pass_the_kit_through_the_commands(name):
    testing.check_scorer(plugins.get_scorer(name))


# ----- adapters


@pytest.mark.parametrize("model_type, args", [("qwen3_moe", QWEN3_MOE), ("mixtral", MIXTRAL)])
def test_builtin_adapters_pass_collect_prune_and_load(model_type, args):
    adapter = plugins.adapter_for_config({"model_type": model_type})
    testing.check_adapter(adapter, build_tiny(model_type, args), model_type)


def test_an_adapter_editing_the_wrong_config_key_fails_at_loading_the_pruned_model():
    adapter = plugins.adapter_for_config({"model_type": "qwen3_moe"})
    wrong = attrs.evolve(adapter, num_experts_keys=("n_experts",))
    with fails("loading a tiny qwen3_moe checkpoint after mlxfun prune --n 1 .*num_experts_keys"):
        testing.check_adapter(wrong, build_tiny("qwen3_moe", QWEN3_MOE), "qwen3_moe")


def test_a_new_model_type_without_model_classes_fails_the_kit_not_the_user():
    """The issue's first finding: check_adapter passed, then no checkpoint could be loaded."""
    adapter = plugins.adapter_for_config({"model_type": "qwen3_moe"})
    acme = attrs.evolve(adapter, name="acme_moe", model_types=("acme_moe",))
    model = testing.build_tiny_model("acme_moe", QWEN3_MOE, module="qwen3_moe")
    with fails("adapter 'acme_moe' .*mlxfun collect on a tiny acme_moe checkpoint failed"):
        testing.check_adapter(acme, model, "acme_moe")
    declared = attrs.evolve(acme, model_module="mlx_lm.models.qwen3_moe")
    testing.check_adapter(declared, model, "acme_moe")


# ----- compressors


def test_the_builtin_compressors_pass_the_kit():
    testing.check_compressor(plugins.get_compressor("prune"))
    merge = {"request_type": MergeRequest, "group_size": 2, "progress": False}
    testing.check_compressor(plugins.get_compressor("ream"), **merge)


@attrs.frozen
class Copier:
    """Copies the model: a correct (if useless) compressor."""

    name: str = "copier"
    description: str = "copies the model"
    dry_run_writes: bool = False
    overwrite: bool = False
    touch_input: bool = False

    def compress(self, request) -> dict:
        if request.dry_run and not self.dry_run_writes:
            return {"dry_run": True}
        if self.touch_input:
            (request.model / "config.json").write_text(
                (request.model / "config.json").read_text() + " "
            )
        if self.overwrite and request.output.exists():
            shutil.rmtree(request.output)
        with atomic_output_dir(request.output, force=request.force) as tmp:
            for path in request.model.iterdir():
                shutil.copy2(path, tmp / path.name)
        return {"output": str(request.output)}


@pytest.mark.parametrize(
    "compressor, match",
    [
        (Copier(dry_run_writes=True), "compress\\(\\) with dry_run wrote"),
        (Copier(overwrite=True), "compress\\(\\) replaced an existing output without force"),
        (Copier(touch_input=True), "compress\\(\\) modified its inputs"),
    ],
    ids=["dry_run_writes", "overwrite", "touch_input"],
)
def test_check_compressor_catches(compressor, match):
    testing.check_compressor(Copier())
    with fails(f"compressor 'copier' \\(Copier\\): {match}"):
        testing.check_compressor(compressor)


def test_kit_messages_name_the_expected_type():
    """The issue's `TypeError: unhashable type: 'list'` is now a message with the fix."""
    from .core.test_core_testing import KeepAsList

    with pytest.raises(AssertionError) as caught:
        testing.check_selector(KeepAsList())
    message = str(caught.value)
    assert re.search(r"Selection\.keep is a list .*expected dict\[int, list\[int\]\]", message)
    assert "unhashable" not in message
