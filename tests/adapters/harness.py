"""Shared checks for architecture adapters on tiny seeded mlx-lm models.

A test for an architecture supplies the tiny ``ModelArgs`` and an independent numpy
re-computation of its routing, ``ref_route(block, x) -> (selected, weights)`` with ``x`` a
(tokens, hidden) float64 array and ``selected``/``weights`` (tokens, top_k); then
``check_architecture`` asserts that
1. a hooked forward equals the un-hooked one exactly,
2. the observed selection and gate weights equal the numpy routing,
3. every built-in statistic equals a brute-force loop over tokens.
"""

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlxfun.core import plugins
from mlxfun.core.errors import MlxfunError
from mlxfun.core.hooks import call_hooks
from mlxfun.core.observe import Observer
from mlxfun.core.stats import StatsCollector
from mlxfun.core.testing import build_tiny_model

ALL_NEEDS = frozenset({"selected", "weights", "norms", "logits", "outputs"})


def build_tiny(
    model_type: str, args: dict, seed: int = 0, bits: int | None = None, group_size: int = 32
):
    """A tiny model from mlx-lm's own classes with seeded random weights
    (``mlxfun.core.testing.build_tiny_model``): constant parameters (zero routers, zero
    correction biases) are re-drawn, so routing and biases really matter in the test."""
    return build_tiny_model(model_type, args, seed=seed, bits=bits, group_size=group_size)


def dequantized(module, name: str = "weight") -> np.ndarray:
    """A Linear / QuantizedLinear / SwitchLinear weight as float64 numpy."""
    if "scales" in module:
        w = mx.dequantize(
            module["weight"],
            module["scales"],
            module.get("biases"),
            group_size=module.group_size,
            bits=module.bits,
            mode=getattr(module, "mode", "affine"),
        )
        return np.array(w.astype(mx.float32), dtype=np.float64)
    return np.array(module[name].astype(mx.float32), dtype=np.float64)


def capture_block_inputs(model, adapter, tokens):
    """The input of every MoE block during one forward, as (tokens, hidden) float64 arrays."""
    layers = adapter.moe_layers(model)
    seen = {}

    def hook(position):
        def wrapper(module, call, x, *args, **kwargs):
            seen[position] = x
            return call(x, *args, **kwargs)

        return wrapper

    with call_hooks([(layer.block, hook(layer.position)) for layer in layers]):
        mx.eval(model(tokens))
    return layers, {
        p: np.array(x.astype(mx.float32), dtype=np.float64).reshape(-1, x.shape[-1])
        for p, x in seen.items()
    }


def check_architecture(model_type: str, model, ref_route, tokens=None, atol=1e-5):
    config = {"model_type": model_type}
    adapter = plugins.adapter_for_config(config)
    if tokens is None:
        vocab = model.model.embed_tokens.weight.shape[0] if hasattr(model, "model") else 256
        tokens = mx.array(np.random.default_rng(1).integers(0, min(vocab, 256), (2, 24)))

    # 1. hooks do not change the output
    plain = model(tokens)
    with Observer(model, adapter, ALL_NEEDS) as observer:
        hooked = model(tokens)
    mx.eval(plain, hooked)
    assert mx.array_equal(plain, hooked).item(), "hooked forward differs from the plain one"
    observations = observer.observations()

    # 2. routing equals an independent numpy re-computation
    layers, inputs = capture_block_inputs(model, adapter, tokens)
    assert len(layers) == len(observations) > 0
    for layer, obs in zip(layers, observations):
        selected, weights = ref_route(layer.block, inputs[layer.position])
        order = np.argsort(selected, axis=-1)
        selected = np.take_along_axis(np.asarray(selected), order, -1)
        weights = np.take_along_axis(np.asarray(weights), order, -1)
        np.testing.assert_array_equal(
            obs.selected, selected, err_msg=f"layer {layer.index} selection"
        )
        np.testing.assert_allclose(
            obs.weights, weights, atol=atol, rtol=1e-4, err_msg=f"layer {layer.index} weights"
        )

    # 3. statistics equal a brute-force loop over tokens
    check_statistics(model, adapter, layers, inputs, observations)

    # 4. the layer-sequential runner observes what the whole forward observes
    check_runner(model, adapter, tokens, observations)
    return adapter, layers, observations


# Architectures whose forward hands more than the hidden state from one decoder layer to the
# next (a tuple of states): the runner refuses them in one line.
RUNNER_REFUSED = {"gemma4", "gemma4_text", "deepseek_v41", "hunyuan", "kimi_k3"}
RUNNER_CHECKED: set = set()


def runner_observations(model, adapter, tokens, needs=ALL_NEEDS, stream=False):
    """Every MoE layer's observations from ``runner.LayerRunner``, one layer at a time.
    ``stream``: as ``collect --stream`` does, every weight outside the decoder layers is
    dropped after the capture and each layer's after it ran (the caller restores them)."""
    from mlxfun.core.runner import LayerRunner, release, release_outside

    run = LayerRunner(model, adapter, [tokens])
    if stream:
        release_outside(model, run.path)
    by_index = {layer.index: layer for layer in run.moe_layers}
    result = []
    for index in range(run.stop + 1):
        moe = by_index.get(index)
        if moe is None:
            run.run(index)
        else:
            observer = Observer(model, adapter, needs, layers=[moe])
            with observer:
                run.run(index, on_batch=lambda batch, o=observer: result.extend(o.observations()))
        if stream:
            release(run.layers[index])
    run.close()
    return result


def check_runner(model, adapter, tokens, observations):
    model_type = getattr(getattr(model, "args", None), "model_type", adapter.name)
    if model_type in RUNNER_REFUSED:
        try:
            runner_observations(model, adapter, tokens)
        except MlxfunError as exc:
            assert "\n" not in str(exc) and "cannot run it one decoder layer" in str(exc)
            return
        raise AssertionError(f"{model_type}: the runner should refuse it")
    stepped = runner_observations(model, adapter, tokens)
    # --stream: no layer needs a weight outside itself (the weights are restored afterwards)
    weights = model.parameters()
    try:
        streamed = runner_observations(model, adapter, tokens, stream=True)
    finally:
        model.update(weights, strict=False)
    for name, run in (("runner", stepped), ("streamed runner", streamed)):
        assert len(run) == len(observations)
        for ours, theirs in zip(run, observations):
            assert ours.layer == theirs.layer
            for field in ("selected", "weights", "norms", "outputs", "logits"):
                np.testing.assert_array_equal(
                    getattr(ours, field), getattr(theirs, field), err_msg=f"{name}: {field}"
                )
    RUNNER_CHECKED.add(model_type)


def check_statistics(model, adapter, layers, inputs, observations):
    scorer_names = [
        "frequency",
        "weighted_frequency",
        "ean_sum",
        "ean_mean",
        "reap",
        "max_activation",
    ]
    scorers = [plugins.get_scorer(n) for n in scorer_names]
    num_experts = max(layer.num_experts for layer in layers)
    collector = StatsCollector(scorers, len(layers), num_experts)
    collector.update(observations)
    scores = collector.scores()
    for layer, obs in zip(layers, observations):
        x = mx.array(inputs[layer.position].astype(np.float32))
        every = np.array(adapter.all_expert_outputs(layer, x).astype(mx.float32), dtype=np.float64)
        expected = {n: np.zeros(num_experts) for n in scorer_names}
        count = np.zeros(num_experts)
        reap_sum = np.zeros(num_experts)
        for t in range(obs.num_tokens):
            for slot in range(obs.selected.shape[1]):
                e = obs.selected[t, slot]
                norm = np.linalg.norm(every[t, e])
                count[e] += 1
                expected["weighted_frequency"][e] += obs.weights[t, slot]
                expected["ean_sum"][e] += norm
                reap_sum[e] += obs.weights[t, slot] * norm
                expected["max_activation"][e] = max(expected["max_activation"][e], norm)
        expected["frequency"] = count
        safe = np.maximum(count, 1)
        expected["ean_mean"] = np.where(count > 0, expected["ean_sum"] / safe, 0.0)
        expected["reap"] = np.where(count > 0, reap_sum / safe, 0.0)
        for name in scorer_names:
            np.testing.assert_allclose(
                scores[name][layer.position, : layer.num_experts],
                expected[name],
                rtol=2e-4,
                atol=1e-5,
                err_msg=f"{name} at layer {layer.index}",
            )


def parameter_names(model) -> list[str]:
    return [name for name, _ in tree_flatten(model.parameters())]
