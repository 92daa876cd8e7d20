"""Steering is router-faithful on every supported architecture (the tiny configs of the adapter
tests), float32 and 4-bit:

- ``mask`` gives the logits of the pruned model (the same experts removed by ``mlxfun prune``,
  loaded with stock mlx-lm): the masked experts are excluded as if they did not exist;
- ``force`` puts the expert in every token's top-k (the indices the experts module received);
- observation inside ``steering`` sees the steered routing (one hooked class per module);
- with steering off, the model is bit-identical to the unsteered one.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load as mlx_lm_load
from mlxfun.core import plugins
from mlxfun.core.errors import MlxfunError
from mlxfun.core.hooks import call_hooks
from mlxfun.core.observe import Observer
from mlxfun.core.router_bias import bias_point
from mlxfun.methods.interventions import SteerIntervention
from mlxfun.methods.prune import PruneRequest, prune
from mlxfun.methods.steer import (
    FORCE,
    MASK,
    layer_biases,
    parse_spec,
    ranked_group,
    spec_from_report,
    steering,
)

from .test_prune import CASES, TOKENS, grouped_args, write_dir, write_stats


def mask_spec(removed: dict) -> dict:
    return {
        "rules": [
            {"layer": int(layer), "experts": list(experts), "mode": "mask"}
            for layer, experts in removed.items()
        ]
    }


@pytest.mark.parametrize("bits", [None, 4], ids=["f32", "4bit"])
@pytest.mark.parametrize("case,model_type,args", CASES, ids=[c[0] for c in CASES])
def test_mask_equals_the_pruned_model(tmp_path, case, model_type, args, bits):
    args, groups = grouped_args(model_type, args)
    source, adapter = write_dir(tmp_path / "model", model_type, args, bits)
    stats = write_stats(source, tmp_path / "stats.npz")
    out = tmp_path / "pruned"
    prune(PruneRequest(model=source, stats=stats, output=out, n=2 if groups == 1 else groups))
    removed = json.loads((out / "mlxfun.json").read_text())["removed"]
    original, _ = mlx_lm_load(str(source))
    pruned, _ = mlx_lm_load(str(out))
    plain = original(TOKENS)
    with steering(original, mask_spec(removed), adapter=adapter):
        steered = original(TOKENS)
    after = original(TOKENS)
    expected = pruned(TOKENS)
    mx.eval(plain, steered, after, expected)
    np.testing.assert_allclose(np.array(steered), np.array(expected), atol=1e-4, rtol=1e-4)
    assert not np.allclose(np.array(plain), np.array(expected), atol=1e-4, rtol=1e-4)
    # nothing is left behind
    assert mx.array_equal(plain, after).item()


def routed_indices(model, adapter):
    """``{position: indices the experts module received}`` during a forward (hooks)."""
    seen = {}

    def hook(position):
        def wrapper(module, call, x, indices, *args, **kwargs):
            seen[position] = np.array(indices)
            return call(x, indices, *args, **kwargs)

        return wrapper

    layers = adapter.moe_layers(model)
    return layers, seen, [(layer.experts, hook(layer.position)) for layer in layers]


# Architectures whose experts module does not receive the router's indices (dbrx calls list
# experts; longcat's zero experts arrive as expert 0): the observer's selection is used instead.
STACKED = [c for c in CASES if c[0] not in ("dbrx", "longcat_flash", "longcat_flash_ngram")]


@pytest.mark.parametrize("case,model_type,args", CASES, ids=[c[0] for c in CASES])
def test_force_puts_the_expert_in_every_tokens_top_k(tmp_path, case, model_type, args):
    args, _ = grouped_args(model_type, args)
    source, adapter = write_dir(tmp_path / "model", model_type, args, None)
    model, _ = mlx_lm_load(str(source))
    layers = adapter.moe_layers(model)
    # per layer, the expert the unsteered model picks least (so forcing it changes something)
    with Observer(model, adapter) as observer:
        model(TOKENS)
    least, most = {}, {}
    for layer, obs in zip(layers, observer.observations()):
        counts = np.bincount(obs.selected.reshape(-1), minlength=layer.num_experts)
        stored = layer.num_experts - layer.zero_experts
        least[layer.index] = int(np.argmin(counts[:stored]))
        most[layer.index] = int(np.argmax(counts[:stored]))
    # forced together with a mask on the most used expert: the forced one is in every top-k
    # and the masked one in none (the remaining slots are not filled among ties)
    spec = {
        "rules": [{"layer": i, "experts": [e], "mode": "force"} for i, e in least.items()]
        + [{"layer": i, "experts": [e], "mode": "mask"} for i, e in most.items()]
    }
    with steering(model, spec, adapter=adapter):
        with Observer(model, adapter) as observer:
            model(TOKENS)
        observations = observer.observations()
    for layer, obs in zip(layers, observations):
        assert np.all(np.any(obs.selected == least[layer.index], axis=-1)), layer.index
        assert not np.any(obs.selected == most[layer.index]), layer.index
    if case in [c[0] for c in STACKED]:
        layers, seen, hooks = routed_indices(model, adapter)
        with steering(model, spec, adapter=adapter), call_hooks(hooks):
            mx.eval(model(TOKENS))
        for layer in layers:
            used = seen[layer.position].reshape(-1, layer.top_k)
            assert np.all(np.any(used == least[layer.index], axis=-1)), layer.index
            assert not np.any(used == most[layer.index]), layer.index


def test_steering_off_is_bit_identical_and_observation_composes(tmp_path):
    source, adapter = write_dir(tmp_path / "model", *CASES[0][1:], None)
    model, tokenizer = mlx_lm_load(str(source))
    from mlx_lm import generate

    before = generate(model, tokenizer, "hello", max_tokens=8)
    logits = model(TOKENS)
    names = {name for name, _ in tree_flatten(model.parameters())}
    spec = {"rules": [{"layer": "all", "experts": [0, 1], "mode": "mask"}]}
    with steering(model, spec, adapter=adapter):
        steered = generate(model, tokenizer, "hello", max_tokens=8)
        # observation inside steering: the adapter's routing sees the mask
        with Observer(model, adapter) as observer:
            model(TOKENS)
        for obs in observer.observations():
            assert not np.isin(obs.selected, [0, 1]).any()
    assert generate(model, tokenizer, "hello", max_tokens=8) == before
    assert mx.array_equal(model(TOKENS), logits).item()
    # the router Linears' steering bias is gone again
    assert {name for name, _ in tree_flatten(model.parameters())} == names
    assert isinstance(steered, str)


def test_the_intervention_returns_its_undo(tmp_path):
    source, adapter = write_dir(tmp_path / "model", *CASES[0][1:], None)
    model, _ = mlx_lm_load(str(source))
    plain = model(TOKENS)
    undo = SteerIntervention().apply(
        model, adapter, spec={"rules": [{"layer": "all", "experts": [3], "mode": "mask"}]}
    )
    steered = model(TOKENS)
    undo()
    mx.eval(plain, steered)
    assert not mx.array_equal(plain, steered).item()
    assert mx.array_equal(plain, model(TOKENS)).item()
    assert plugins.get_intervention("steer").name == "steer"


def test_bias_points_cover_the_router_families():
    points = {}
    for case, model_type, args in CASES:
        args, _ = grouped_args(model_type, args)
        from .adapters.harness import build_tiny

        model = build_tiny(model_type, args)
        adapter = plugins.adapter_for_config({"model_type": model_type, **args})
        points[case] = bias_point(adapter, adapter.moe_layers(model)[0])
    assert points["qwen3_moe"] == "router" and points["mixtral"] == "router"
    assert points["deepseek_v3"] == "correction" and points["minimax"] == "correction"
    assert points["deepseek"] == "gate" and points["deepseek_v2"] == "gate"


# ---------------------------------------------------------------------------------------------
# Spec values and bad input


class _Layer:
    def __init__(self, position, index, num_experts=8, top_k=2):
        self.position, self.index, self.num_experts, self.top_k = (
            position,
            index,
            num_experts,
            top_k,
        )


LAYERS = [_Layer(0, 1), _Layer(1, 3)]


def test_spec_values_per_layer():
    spec = parse_spec(
        {
            "rules": [
                {"layer": "all", "experts": [0], "mode": "mask"},
                {"layer": 3, "experts": [5], "mode": "force"},
                {"layer": 1, "experts": [2, 4], "mode": "bias", "bias": 1.5},
                {"layer": "all", "experts": [2], "mode": "bias", "bias": -0.5},
            ]
        }
    )
    biases = layer_biases(spec, LAYERS)
    np.testing.assert_array_equal(biases[0], [MASK, 0, 1.0, 0, 1.5, 0, 0, 0])
    np.testing.assert_array_equal(biases[1], [MASK, 0, -0.5, 0, 0, FORCE, 0, 0])


@pytest.mark.parametrize(
    "rules,message",
    [
        ([{"layer": 2, "experts": [0], "mode": "mask"}], "layer 2 is not an MoE layer"),
        ([{"layer": 1, "experts": [8], "mode": "mask"}], "there is no expert 8"),
        (
            [
                {"layer": 1, "experts": [3], "mode": "mask"},
                {"layer": "all", "experts": [3], "mode": "force"},
            ],
            "both mask and force",
        ),
        ([{"layer": 1, "experts": [1, 2, 3], "mode": "force"}], "force at most 2"),
        ([{"layer": 1, "experts": list(range(7)), "mode": "mask"}], "mask at most 6"),
        ([{"layer": 1, "experts": [1], "mode": "shove"}], "mode must be one of"),
        ([{"layer": 1, "experts": [1], "mode": "bias"}], "numeric bias"),
        ([{"layer": 1, "experts": [], "mode": "mask"}], "non-empty list"),
        ([{"layer": "first", "experts": [1], "mode": "mask"}], "decoder layer index"),
    ],
)
def test_bad_specs_are_one_line_errors(rules, message):
    with pytest.raises(MlxfunError, match=message) as info:
        layer_biases(parse_spec({"rules": rules}), LAYERS)
    assert "\n" not in str(info.value)


def test_a_spec_for_another_model_is_refused(tmp_path):
    source, adapter = write_dir(tmp_path / "model", *CASES[0][1:], None)
    model, _ = mlx_lm_load(str(source))
    from mlxfun.core.stats import model_fingerprint

    config = json.loads((source / "config.json").read_text())
    fingerprint = model_fingerprint(config, adapter.moe_layers(model))
    spec = {"rules": [{"layer": "all", "experts": [0], "mode": "mask"}]}
    with steering(model, dict(spec, fingerprint=fingerprint), adapter=adapter, config=config):
        pass
    other = dict(fingerprint, experts_per_layer=[16] * len(fingerprint["experts_per_layer"]))
    with pytest.raises(MlxfunError, match="written for another model") as info:
        with steering(model, dict(spec, fingerprint=other), adapter=adapter, config=config):
            pass
    assert "\n" not in str(info.value)
    with pytest.raises(MlxfunError, match="model type 'mixtral'"):
        with steering(model, dict(spec, fingerprint=dict(fingerprint, model_type="mixtral"))):
            pass


def test_spec_from_a_scan_report():
    """The scans' report format (docs/scans.md): groups map decoder layers to experts; --top
    ranks them model-wide by the group part's selection share, then risk difference."""
    report = {
        "format": 1,
        "scan": "safety-scan",
        "fingerprint": {"model_type": "qwen3_moe"},
        "moe_layers": [1, 3],
        "parts": {
            "response": {
                "selection_frequency": [
                    [0, 0, 0.9, 0, 0, 0, 0, 1.0],
                    [0, 1.0, 0, 0, 0, 0.95, 0, 0],
                ],
                "risk_difference": [[0, 0, 0.2, 0, 0, 0, 0, 0.1], [0, 0.3, 0, 0, 0, 0.5, 0, 0]],
            }
        },
        "groups": {
            "control": {"part": "response", "experts": {"1": [2, 7], "3": [1, 5]}},
            "detection": {"part": "prompt", "experts": {"1": [0], "3": []}},
        },
    }
    spec = spec_from_report(report, "control", 3, "mask")
    # ranked: (3,1) 1.0/0.3, (1,7) 1.0/0.1, (3,5) 0.95, (1,2) 0.9
    assert [r.to_json() for r in spec.rules] == [
        {"layer": 1, "experts": [7], "mode": "mask"},
        {"layer": 3, "experts": [1, 5], "mode": "mask"},
    ]
    assert spec.fingerprint == {"model_type": "qwen3_moe"}
    assert spec_from_report(report, "detection", None, "bias", 2.0).rules[0].bias == 2.0
    with pytest.raises(MlxfunError, match="no group 'refuse'; its groups: control, detection"):
        spec_from_report(report, "refuse", 3, "mask")
    hand = {"groups": {"code": [{"layer": 3, "expert": 5}, [1, 2]]}}
    assert [r.layer for r in spec_from_report(hand, "code", None, "force").rules] == [1, 3]


def test_spec_from_a_twin_group_ranks_by_the_reversed_statistics():
    """A twin group (format 2: the experts the reference set prefers) names its selection share
    and sign: best = highest reverse share, then most negative risk difference."""
    report = {
        "moe_layers": [1, 3],
        "parts": {
            "decision": {
                "selection_frequency": [[1.0, 0, 0, 0], [0, 0, 0, 1.0]],
                "reverse_selection_frequency": [[0, 0.9, 1.0, 1.0], [1.0, 0.9, 0, 0]],
                "risk_difference": [[0.4, -0.1, -0.2, -0.3], [-0.5, -0.6, 0, 0.2]],
            }
        },
        "groups": {
            "harmless_decision": {
                "part": "decision",
                "selection": "reverse_selection_frequency",
                "sign": -1,
                "experts": {"1": [1, 2, 3], "3": [0, 1]},
            }
        },
    }
    # reverse share 1.0: (3,0) -0.5, (1,3) -0.3, (1,2) -0.2; then 0.9: (3,1) -0.6, (1,1) -0.1
    assert ranked_group(report, "harmless_decision") == [(3, 0), (1, 3), (1, 2), (3, 1), (1, 1)]
    spec = spec_from_report(report, "harmless_decision", 2, "force")
    assert [r.to_json() for r in spec.rules] == [
        {"layer": 1, "experts": [3], "mode": "force"},
        {"layer": 3, "experts": [0], "mode": "force"},
    ]
    # read as a first-set group (format 1: no selection, no sign) it would rank otherwise
    plain = {**report["groups"]["harmless_decision"]}
    del plain["selection"], plain["sign"]
    old = dict(report, groups={"harmless_decision": plain})
    assert ranked_group(old, "harmless_decision")[:2] == [(1, 1), (1, 2)]
    bad = dict(report, groups={"g": dict(report["groups"]["harmless_decision"], sign=2)})
    with pytest.raises(MlxfunError, match="bad 'selection' or 'sign'"):
        ranked_group(bad, "g")


# ---------------------------------------------------------------------------------------------
# The conformance check third parties reuse


MASK_ALL_0 = {"spec": {"rules": [{"layer": "all", "experts": [0, 1], "mode": "mask"}]}}


class TestSteerConformance:
    def test_the_steer_intervention_passes(self):
        from mlxfun.core.testing import check_intervention

        check_intervention(SteerIntervention(), MASK_ALL_0)

    def test_an_intervention_beside_the_shared_hooks_fails(self):
        """A router edit that the adapter's routing cannot see (a private class swap of the
        block that re-routes) is caught by the observation check."""
        import attrs
        from mlxfun.core.testing import check_intervention

        @attrs.define
        class Sneaky:
            name: str = "sneaky"
            description: str = "swaps the experts' indices behind the observer's back"

            def apply(self, model, adapter, **options):
                def call(block, x):
                    probs = mx.softmax(block.gate(x), axis=-1, precise=True)
                    inds = mx.argpartition(probs, kth=-2, axis=-1)[..., -2:]
                    inds = (inds + 1) % 8  # a private re-routing
                    scores = mx.take_along_axis(probs, inds, axis=-1)
                    y = block.switch_mlp(x, inds)
                    return (y * scores[..., None]).sum(axis=-2)

                restore = []
                for layer in adapter.moe_layers(model):
                    cls = type(layer.block)
                    layer.block.__class__ = type(cls.__name__, (cls,), {"__call__": call})
                    restore.append((layer.block, cls))

                def undo():
                    for module, cls in restore:
                        module.__class__ = cls

                return undo

        with pytest.raises(AssertionError, match="sneaky.*observation does not see"):
            check_intervention(Sneaky())

    def test_a_wrong_undo_fails(self):
        from mlxfun.core.testing import check_intervention

        class Leaky:
            name = "leaky"
            description = "steers and forgets to undo"

            def apply(self, model, adapter, **options):
                SteerIntervention().apply(model, adapter, **MASK_ALL_0)
                return lambda: None

        with pytest.raises(AssertionError, match="did not restore"):
            check_intervention(Leaky())


from mlxfun.core.testing import PluginConformance  # noqa: E402


class TestSteerPluginConformance(PluginConformance):
    plugin_kind = "intervention"
    plugin_object = SteerIntervention()
    checks = {"options": MASK_ALL_0}


# ---------------------------------------------------------------------------------------------
# The commands


def test_steer_spec_and_generate_commands(tmp_path, capsys):
    from mlxfun.cli.app import main

    source, adapter = write_dir(tmp_path / "model", *CASES[0][1:], None)
    report = tmp_path / "report.json"
    report.write_text(
        json.dumps({"scan": "domain", "groups": {"code": [[0, 3], [1, 5], [0, 4], [1, 1]]}})
    )
    spec_file = tmp_path / "spec.json"
    assert main(
        [
            "steer",
            "spec",
            "--from",
            str(report),
            "--group",
            "code",
            "--top",
            "3",
            "--mode",
            "force",
            "-o",
            str(spec_file),
        ]
    ) in (0, None)
    spec = json.loads(spec_file.read_text())
    assert spec["rules"] == [
        {"layer": 0, "experts": [3, 4], "mode": "force"},
        {"layer": 1, "experts": [5], "mode": "force"},
    ]
    capsys.readouterr()
    code = main(
        [
            "steer",
            "generate",
            "--model",
            str(source),
            "--spec",
            str(spec_file),
            "--prompt",
            "hello",
            "--compare",
            "--max-tokens",
            "6",
            "--json",
        ]
    )
    assert code in (0, None)
    answers = json.loads(capsys.readouterr().out)["answers"]
    assert set(answers[0]) == {"prompt", "steered", "plain"}
    from mlx_lm import generate

    model, tokenizer = mlx_lm_load(str(source))
    assert answers[0]["plain"] == generate(model, tokenizer, "hello", max_tokens=6)
    with steering(model, spec_file, adapter=adapter):
        assert answers[0]["steered"] == generate(model, tokenizer, "hello", max_tokens=6)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--group", "nope"], "has no group 'nope'"),
        (["--group", "code", "--mode", "bias"], "needs --bias"),
        (["--group", "code", "--mode", "push"], "--mode must be one of"),
    ],
)
def test_steer_spec_bad_input_is_one_line(tmp_path, capsys, args, message):
    from mlxfun.cli.app import main

    report = tmp_path / "report.json"
    report.write_text(json.dumps({"groups": {"code": [[0, 3]]}}))
    code = main(["steer", "spec", "--from", str(report), "-o", str(tmp_path / "s.json"), *args])
    err = capsys.readouterr().err.strip()
    assert code not in (0, None) and message in err and len(err.splitlines()) == 1


def test_steer_generate_refuses_a_spec_for_other_layers(tmp_path, capsys):
    from mlxfun.cli.app import main

    source, _ = write_dir(tmp_path / "model", *CASES[0][1:], None)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"rules": [{"layer": 7, "experts": [0], "mode": "mask"}]}))
    code = main(["steer", "generate", "--model", str(source), "--spec", str(spec), "-p", "x"])
    err = capsys.readouterr().err.strip()
    assert code not in (0, None) and "layer 7 is not an MoE layer" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("case", ["qwen3_moe", "deepseek_v3", "deepseek"])
def test_collect_inside_steering_sees_the_steered_routing(tmp_path, case):
    """Statistics collection (the layer runner, its observer) composes with steering: masked
    experts are never counted, forced ones on every token, and the runner's own routing check
    (the adapter's routing equals the block's) passes on every token."""
    from mlxfun.core.collect import collect_stats

    model_type, args = next((c[1], c[2]) for c in CASES if c[0] == case)
    args, _ = grouped_args(model_type, args)
    source, adapter = write_dir(tmp_path / "model", model_type, args, None)
    model, _ = mlx_lm_load(str(source))
    sequences = [list(range(i, i + 20)) for i in range(0, 60, 7)]
    scorers = [plugins.get_scorer("frequency")]
    spec = {
        "rules": [
            {"layer": "all", "experts": [0, 1], "mode": "mask"},
            {"layer": "all", "experts": [3], "mode": "force"},
        ]
    }
    with steering(model, spec, adapter=adapter):
        collector, layers = collect_stats(model, adapter, sequences, scorers, 3, progress=False)
    frequency = collector.scores()["frequency"]
    tokens = sum(len(s) for s in sequences)
    for layer in layers:
        assert frequency[layer.position, 0] == frequency[layer.position, 1] == 0
        counts = collector.accumulators["frequency"]
        assert frequency[layer.position, 3] == frequency[layer.position].max(), counts
    plain, _ = collect_stats(model, adapter, sequences, scorers, 3, progress=False)
    assert (plain.scores()["frequency"][:, :2] > 0).any()
    assert tokens > 0


def test_force_weights_per_router_family(tmp_path):
    """What force does to the gate weights, checked with numpy on the observed router logits:
    a correction-bias router (DeepSeek-V3) weights the forced expert by its own un-biased
    sigmoid score, renormalised over the chosen experts and scaled; a softmax router
    (Qwen3-MoE) sees the +50 in its logits, so the forced expert takes nearly all the weight."""
    cases = {c[0]: c for c in CASES}
    needs = frozenset({"selected", "weights", "logits"})
    for case in ("deepseek_v3", "qwen3_moe"):
        _, model_type, args = cases[case]
        args, _ = grouped_args(model_type, args)
        source, adapter = write_dir(tmp_path / case, model_type, args, None)
        model, _ = mlx_lm_load(str(source))
        spec = {"rules": [{"layer": "all", "experts": [3], "mode": "force"}]}
        with steering(model, spec, adapter=adapter):
            with Observer(model, adapter, needs) as observer:
                model(TOKENS)
            observations = observer.observations()
        for layer, obs in zip(adapter.moe_layers(model), observations):
            logits = obs.logits.astype(np.float64)
            if case == "deepseek_v3":
                scores = 1 / (1 + np.exp(-logits))
                chosen = np.take_along_axis(scores, obs.selected.astype(np.int64), -1)
                expected = chosen / chosen.sum(-1, keepdims=True)
                expected *= layer.block.gate.routed_scaling_factor
                np.testing.assert_allclose(obs.weights, expected, rtol=1e-4, atol=1e-6)
            else:
                forced = obs.weights[obs.selected == 3]
                assert forced.shape[0] == obs.selected.shape[0] and np.all(forced > 0.999)


def test_the_third_party_example_in_plugins_md_passes_the_kit():
    """docs/plugins.md's intervention example, run as written."""
    from pathlib import Path

    from mlxfun.core.testing import check_intervention

    text = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    start = text.index("class Shy:")
    block = text[text.rindex("```python", 0, start) + len("```python") : text.index("```", start)]
    namespace: dict = {}
    exec(compile(block, "plugins.md", "exec"), namespace)
    check_intervention(namespace["Shy"](), {"expert": 1, "bias": -5.0})
