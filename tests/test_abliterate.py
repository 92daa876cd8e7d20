"""Abliteration on tiny seeded models: the direction against a numpy mean of residuals read
without hooks, the weight edit against numpy (every residual writer's output free of d,
unrouted experts included), the weight edit against the run-time hook ablation (same logits),
quantized writers, and refusals of bad input."""

import mlx.core as mx
import numpy as np
import pytest
from mlxfun.core.adapter import get_path
from mlxfun.core.errors import MlxfunError
from mlxfun.core.testing.tiny_models import build_tiny_model
from mlxfun.methods import residual
from mlxfun.methods.abliterate import (
    candidate_directions,
    choose,
    mean_kl,
    residual_means,
    split_prompts,
)
from mlxfun.methods.residual import ablation, orthogonalize, residual_writers

BASE = dict(
    hidden_size=64,
    vocab_size=256,
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    rope_theta=10000.0,
)
MOE = dict(
    num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, num_experts_per_tok=2
)
ARCHS = {
    "llama": dict(
        BASE,
        num_hidden_layers=3,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
    ),
    "qwen3_moe": dict(
        BASE,
        **MOE,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        norm_topk_prob=True,
    ),
    "glm4_moe": dict(
        BASE,
        **MOE,
        n_group=4,
        topk_group=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        n_shared_experts=1,
        n_routed_experts=8,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        rope_scaling=None,
        use_qk_norm=True,
        attention_bias=False,
        partial_rotary_factor=0.5,
    ),
    "deepseek_v3": dict(
        BASE,
        **MOE,
        n_group=4,
        topk_group=2,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        moe_layer_freq=1,
    ),
    "mixtral": dict(
        BASE,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
    "qwen2_moe": dict(
        BASE,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    ),
}
TOKENS = mx.array(np.random.default_rng(1).integers(0, 256, (2, 12)))


def build(model_type, bits=None, seed=0):
    return build_tiny_model(model_type, ARCHS[model_type], seed=seed, bits=bits)


def random_direction(hidden, seed=3):
    d = np.random.default_rng(seed).normal(size=hidden)
    return d / np.linalg.norm(d)


def dense_weight(module):
    if "scales" in module:
        return residual._dequantized(module)
    return module.weight


def writer_outputs(writer, rng):
    """The writer's outputs (..., hidden) on random inputs; stacked experts: every expert."""
    module = writer.module
    if writer.kind == "embed":
        return module(mx.arange(256))
    weight = dense_weight(module)
    inputs = mx.array(rng.normal(size=(5, weight.shape[-1])).astype(np.float32))
    if writer.kind == "expert":
        experts = weight.shape[0]
        indices = mx.broadcast_to(mx.arange(experts), (5, experts))
        return module(inputs[:, None, None, :], indices)  # (5, E, 1, hidden) or (5, E, hidden)
    return module(inputs)


def max_component(outputs, d):
    """The largest |out . d| / |out| over all output vectors (float64)."""
    out = np.array(outputs.astype(mx.float32), dtype=np.float64).reshape(-1, len(d))
    norms = np.maximum(np.linalg.norm(out, axis=1), 1e-30)
    return float(np.max(np.abs(out @ d) / norms))


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_every_writer_output_is_free_of_the_direction(model_type):
    model = build(model_type)
    d = random_direction(64)
    rng = np.random.default_rng(0)
    before = {w.path: max_component(writer_outputs(w, rng), d) for w in residual_writers(model)}
    assert min(before.values()) > 1e-3  # the check can fail: writers do write along d
    weights = {
        w.path: np.array(dense_weight(w.module), np.float64) for w in residual_writers(model)
    }
    summary = orthogonalize(model, d)
    writers = residual_writers(model)
    kinds = {w.kind for w in writers}
    assert {"embed", "attn"} <= kinds and ("mlp" in kinds or "expert" in kinds)
    if model_type not in ("llama",):
        assert "expert" in kinds
    for writer in writers:
        assert max_component(writer_outputs(writer, rng), d) <= 1e-5, writer.path
        # the edit is exactly the numpy projection W - d d^T W (embedding: E - E d d^T)
        w = weights[writer.path]
        if writer.kind == "embed":
            expected = w - np.outer(w @ d, d)
        else:
            expected = w - np.einsum("h,...hn->...n", d, w)[..., None, :] * d[:, None]
        got = np.array(dense_weight(writer.module), np.float64)
        assert np.abs(got - expected).max() <= 1e-5 * max(np.abs(w).max(), 1)
    assert summary["writers"]["embed"] == 1
    assert summary["untied_embeddings"] == (model_type == "llama")


def test_attention_and_mlp_blocks_write_nothing_along_d():
    """The blocks as a whole (routing, shared experts, scaling) add nothing along d."""
    model = build("glm4_moe")
    d = random_direction(64, seed=5)
    orthogonalize(model, d)
    x = mx.array(np.random.default_rng(2).normal(size=(1, 7, 64)).astype(np.float32))
    for layer in model.model.layers:
        assert max_component(layer.mlp(x), d) <= 1e-5
        assert max_component(layer.self_attn(x, mask="causal"), d) <= 1e-5


def test_unrouted_experts_are_edited():
    """An expert that no token routes to (a -1e9 router bias) is edited too."""
    model = build("qwen3_moe")
    block = model.model.layers[0].mlp
    bias = np.zeros(8, np.float32)
    bias[3] = -1e9
    block.gate.bias = mx.array(bias)
    x = mx.array(np.random.default_rng(4).normal(size=(1, 40, 64)).astype(np.float32))
    chosen = mx.argpartition(-block.gate(x), kth=1, axis=-1)[..., :2]
    assert 3 not in set(np.array(chosen).reshape(-1).tolist())
    d = random_direction(64)
    orthogonalize(model, d)
    down = block.switch_mlp.down_proj
    h = mx.array(np.random.default_rng(5).normal(size=(5, 1, 1, 32)).astype(np.float32))
    assert max_component(down(h, mx.full((5, 1), 3)), d) <= 1e-5


def test_skip_experts_leaves_the_experts_alone():
    model = build("glm4_moe")
    expert = np.array(model.model.layers[1].mlp.switch_mlp.down_proj.weight)
    shared = np.array(model.model.layers[1].mlp.shared_experts.down_proj.weight)
    summary = orthogonalize(model, random_direction(64), skip_experts=True)
    assert "expert" not in summary["writers"]
    assert np.array_equal(np.array(model.model.layers[1].mlp.switch_mlp.down_proj.weight), expert)
    assert not np.allclose(
        np.array(model.model.layers[1].mlp.shared_experts.down_proj.weight), shared
    )


@pytest.mark.parametrize("model_type", list(ARCHS))
@pytest.mark.parametrize(("scale", "skip"), [(1.0, False), (0.5, False), (1.0, True)])
def test_weight_edit_equals_hook_ablation(model_type, scale, skip):
    d = random_direction(64, seed=7)
    hooked = build(model_type)
    with ablation(hooked, d, scale, skip):
        ablated = hooked(TOKENS)
    plain = hooked(TOKENS)
    edited = build(model_type)
    orthogonalize(edited, d, scale, skip)
    logits = edited(TOKENS)
    mx.eval(ablated, plain, logits)
    a, e, p = (np.array(v, np.float64) for v in (ablated, logits, plain))
    assert np.abs(a - p).max() > 1e-3  # the ablation changes the logits
    assert np.abs(a - e).max() <= 1e-4 * max(np.abs(a).max(), 1)


def test_hooks_leave_the_model_as_it_was():
    model = build("glm4_moe")
    before = np.array(model(TOKENS))
    with ablation(model, random_direction(64)):
        model(TOKENS)
    assert np.array_equal(np.array(model(TOKENS)), before)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "llama"])
def test_quantized_writers_are_requantized(model_type):
    model = build(model_type, bits=4)
    d = random_direction(64)
    rng = np.random.default_rng(0)
    writers = residual_writers(model)
    quant = [w for w in writers if "scales" in w.module]
    assert quant and any(w.kind == "expert" for w in quant) or model_type == "llama"
    before = {w.path: max_component(writer_outputs(w, rng), d) for w in quant}
    bits = {w.path: (w.module.bits, w.module.group_size) for w in quant}
    exact = {}
    for w in quant:
        weight = np.array(dense_weight(w.module), np.float64)
        if w.kind == "embed":
            exact[w.path] = weight - np.outer(weight @ d, d)
        else:
            exact[w.path] = (
                weight - np.einsum("h,...hn->...n", d, weight)[..., None, :] * d[:, None]
            )
    summary = orthogonalize(model, d)
    error = summary["requantization_error"]
    for w in residual_writers(model):
        if w.path not in bits:
            continue
        assert "scales" in w.module and (w.module.bits, w.module.group_size) == bits[w.path]
        got = np.array(dense_weight(w.module), np.float64)
        relative = np.linalg.norm(got - exact[w.path]) / np.linalg.norm(exact[w.path])
        assert relative <= error["max"] + 1e-6
        # 4-bit rounding leaves some of d, far less than the unedited weight wrote
        assert max_component(writer_outputs(w, rng), d) < 0.5 * before[w.path]
    assert 0 < error["mean"] <= error["max"] < 0.2


def test_residual_means_equal_a_forward_without_hooks():
    """The mean residual entering each layer, against the layers called one by one."""
    model = build("qwen3_moe")

    class Tok:
        chat_template = None

        def encode(self, text, add_special_tokens=False):
            return list(text.encode())

    prompts = ["abc def", "hello there!", "xyz"]
    means = residual_means(model, Tok(), prompts, position=-2)
    expected = np.zeros_like(means)
    for prompt in prompts:
        h = model.model.embed_tokens(mx.array([list(prompt.encode())]))
        for i, layer in enumerate(model.model.layers):
            expected[i] += np.array(h[0, -2], np.float64) / len(prompts)
            h = layer(h, "causal", None)
    assert np.abs(means - expected).max() <= 1e-5 * np.abs(expected).max()


def test_candidate_directions_and_choice():
    harmful = np.array([[1.0, 1.0], [3.0, 0.0], [0.0, 2.0]])
    harmless = np.array([[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
    directions, relative = candidate_directions(harmful, harmless)
    assert np.array_equal(directions[0], [0, 0]) and relative[0] == 0
    assert np.allclose(directions[1], [1, 0]) and np.allclose(directions[2], [0, 1])
    rows = [
        {"layer": 0, "refusal_rate": None, "kl": None},
        {"layer": 1, "refusal_rate": 0.0, "kl": 0.5},
        {"layer": 2, "refusal_rate": 0.2, "kl": 0.05},
        {"layer": 3, "refusal_rate": 0.2, "kl": 0.01},
    ]
    assert choose(rows, 0.1) == (rows[3], True)
    assert choose(rows, 1.0) == (rows[1], True)
    assert choose(rows, 0.001) == (rows[1], False)
    p = np.log(np.array([0.5, 0.5]))
    q = np.log(np.array([0.9, 0.1]))
    assert mean_kl([p], [q]) == pytest.approx(0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1))


def test_bad_input_is_one_line():
    with pytest.raises(MlxfunError, match="gemma3_text: abliteration does not know"):
        residual.writers_for("gemma3_text")
    with pytest.raises(MlxfunError, match="has 3 prompts; a direction needs at least 6"):
        split_prompts(["a", "b", "c"], 4, 0, "--harmful")
    with pytest.raises(MlxfunError, match="zero"):
        residual.unit(np.zeros(4))


def test_intervention_is_registered():
    from mlxfun.core import plugins

    intervention = plugins.get_intervention("abliterate")
    model = build("qwen3_moe")
    d = random_direction(64)
    intervention.apply(model, None, direction=d)
    layer = get_path(model, "model.layers.0.self_attn.o_proj")
    assert max_component(layer(mx.ones((1, 64))), d) <= 1e-5
