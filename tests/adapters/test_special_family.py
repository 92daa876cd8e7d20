"""Architectures with special routing or experts (llama4, gemma4, deepseek_v41, dbrx,
longcat_flash(_ngram)) on tiny seeded mlx-lm models, float32 and 4-bit, against numpy routings
written from the weights and the test's config; and the reason muse_spark is refused.

Beyond the harness (hooks change nothing, routing equals the reference, statistics equal a
brute-force loop) each architecture checks what its adapter documents: llama4's raw outputs are
the experts on their sigmoid-scaled input with gate weight 1; gemma4's router sees the
post-attention stream (not the decoder layer's input) and its weights rebuild the experts' sum;
deepseek_v41 finds only the Experts wrapper's SwitchGLU (not the attention's SwitchLinear);
dbrx's raw outputs are each listed expert on its own token, in the block's call order;
longcat_flash's zero experts are selected, output the block's input and are counted.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map_with_path
from mlxfun.core import plugins, testing
from mlxfun.core.errors import MlxfunError
from mlxfun.core.hooks import call_hooks
from mlxfun.core.observe import Observer

from .harness import ALL_NEEDS, build_tiny, capture_block_inputs, check_architecture, dequantized

BITS = [None, 4]
TOKENS = mx.array(np.random.default_rng(1).integers(0, 256, (2, 24)))

LLAMA4_TEXT = dict(
    model_type="llama4_text",
    attention_bias=False,
    attention_chunk_size=16,
    head_dim=16,
    hidden_size=64,
    interleave_moe_layer_step=2,
    intermediate_size=32,
    intermediate_size_mlp=96,
    max_position_embeddings=512,
    num_attention_heads=4,
    num_experts_per_tok=1,
    num_hidden_layers=4,  # layer 3 holds the global-attention cache mlx-lm reads
    num_key_value_heads=2,
    num_local_experts=8,
    rms_norm_eps=1e-5,
    rope_scaling=None,
    rope_theta=10000.0,
    use_qk_norm=True,
    vocab_size=256,
)
LLAMA4 = dict(text_config=LLAMA4_TEXT)

GEMMA4_TEXT = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=96,
    num_attention_heads=4,
    head_dim=16,
    global_head_dim=32,
    num_key_value_heads=2,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    vocab_size=256,
    vocab_size_per_layer_input=256,
    num_kv_shared_layers=0,
    hidden_size_per_layer_input=0,
    sliding_window=8,
    sliding_window_pattern=2,
    rms_norm_eps=1e-6,
    enable_moe_block=True,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=32,
)
GEMMA4 = dict(text_config=GEMMA4_TEXT, vocab_size=256)

DEEPSEEK_V41 = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    head_dim=32,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    o_groups=2,
    o_lora_rank=16,
    moe_intermediate_size=32,
    n_routed_experts=8,
    num_experts_per_tok=2,
    rms_norm_eps=1e-6,
    sliding_window=8,
    hc_mult=2,
    hc_sinkhorn_iters=3,
    swiglu_limit=10.0,
)
DEEPSEEK_V41_CASES = {
    "sqrtsoftplus": dict(DEEPSEEK_V41),  # mlx-lm's default scoring, routed_scaling_factor 1.5
    "sigmoid-temp": dict(
        DEEPSEEK_V41, scoring_func="sigmoid", gate_temp=0.7, routed_scaling_factor=2.5
    ),
    "softmax-no-renorm": dict(
        DEEPSEEK_V41, scoring_func="softmax", norm_topk_prob=False, num_experts_per_tok=3
    ),
}
DEEPSEEK_V41_DEFAULTS = dict(
    scoring_func="sqrtsoftplus", gate_temp=1.0, norm_topk_prob=True, routed_scaling_factor=1.5
)

LONGCAT = dict(
    attention_method="MLA",
    zero_expert_type="identity",
    hidden_size=64,
    ffn_hidden_size=96,
    moe_topk=2,
    expert_ffn_hidden_size=32,
    n_routed_experts=8,
    zero_expert_num=4,
    num_layers=2,
    vocab_size=256,
    max_position_embeddings=512,
    num_attention_heads=4,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    routed_scaling_factor=1.5,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    mla_scale_q_lora=True,
    mla_scale_kv_lora=True,
    attention_bias=False,
    norm_topk_prob=True,
    router_bias=True,
)
LONGCAT_NGRAM = dict(LONGCAT, ngram_vocab_size_ratio=2, emb_neighbor_num=3, emb_split_num=2)
LONGCAT_CASES = [("longcat_flash", LONGCAT), ("longcat_flash_ngram", LONGCAT_NGRAM)]

DBRX = dict(
    vocab_size=256,
    d_model=64,
    n_layers=2,
    n_heads=4,
    ffn_config=dict(ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2),
    attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
)


# ---------------------------------------------------------------------------------------------
# numpy helpers and references (weights read from the model, hyper-parameters from the config)


def softmax(z):
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def top_k(scores, k):
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def switch_weights(experts):
    return {name: dequantized(experts[name]) for name in ("gate_proj", "up_proj", "down_proj")}


def glu_expert(weights, e, x, activation):
    """One stacked GLU expert on rows x: down(activation(gate x) * up x)."""
    hidden = activation(x @ weights["gate_proj"][e].T) * (x @ weights["up_proj"][e].T)
    return hidden @ weights["down_proj"][e].T


def silu(z):
    return z * sigmoid(z)


def gelu_approx(z):
    return 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3)))


def llama4_reference(block, x):
    logits = x @ dequantized(block.router).T
    selected = top_k(logits, LLAMA4_TEXT["num_experts_per_tok"])
    return selected, np.ones(selected.shape)  # the sigmoid score scales the input, not the output


def gemma4_reference(router, h):
    """RMS-normalise h with weight scale / sqrt(H), project, top-k logits, softmax over the k,
    times per_expert_scale of the chosen experts."""
    cfg = GEMMA4_TEXT
    scale = np.array(router.scale, dtype=np.float64)
    per_expert = np.array(router.per_expert_scale, dtype=np.float64)
    rms = np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + cfg["rms_norm_eps"])
    logits = (h / rms * scale * cfg["hidden_size"] ** -0.5) @ dequantized(router.proj).T
    selected = top_k(logits, cfg["top_k_experts"])
    weights = softmax(np.take_along_axis(logits, selected, -1)) * per_expert[selected]
    return selected, weights


def dbrx_reference(block, x):
    """Softmax over all experts, top-k, the k scores divided by their sum."""
    gates = softmax(x @ dequantized(block.router.layer).T)
    selected = top_k(gates, DBRX["ffn_config"]["moe_top_k"])
    weights = np.take_along_axis(gates, selected, -1)
    return selected, weights / weights.sum(-1, keepdims=True)


def dbrx_expert(expert, x):
    """One dbrx MLP on rows x: w2(silu(w1 x) * v1 x)."""
    return (silu(x @ dequantized(expert.w1).T) * (x @ dequantized(expert.v1).T)) @ dequantized(
        expert.w2
    ).T


def longcat_reference(block, x):
    """Softmax over the stored and zero experts (classifier with its bias), plus the correction
    bias for the selection only, top-k, renormalised, times routed_scaling_factor."""
    router = block.router
    logits = x @ dequantized(router.classifier).T + np.array(router.classifier.bias)
    scores = softmax(logits)
    bias = np.array(router.e_score_correction_bias, dtype=np.float64)
    selected = top_k(scores + bias, LONGCAT["moe_topk"])
    weights = np.take_along_axis(scores, selected, -1)
    return selected, weights / weights.sum(-1, keepdims=True) * LONGCAT["routed_scaling_factor"]


def deepseek_v41_reference(cfg):
    cfg = {**DEEPSEEK_V41_DEFAULTS, **cfg}

    def reference(block, x):
        logits = x @ np.array(block.gate.weight, dtype=np.float64).T / cfg["gate_temp"]
        scores = {
            "sigmoid": sigmoid,
            "softmax": softmax,
            "sqrtsoftplus": lambda z: np.sqrt(np.logaddexp(0.0, z)),
        }[cfg["scoring_func"]](logits)
        bias = np.array(block.gate.e_score_correction_bias, dtype=np.float64)
        selected = top_k(scores + bias, cfg["num_experts_per_tok"])
        weights = np.take_along_axis(scores, selected, -1)
        if cfg["norm_topk_prob"] and cfg["num_experts_per_tok"] > 1:
            weights = weights / weights.sum(-1, keepdims=True)
        return selected, weights * cfg["routed_scaling_factor"]

    return reference


# ---------------------------------------------------------------------------------------------
# builders


def build_gemma4(model_type, args, bits=None):
    """build_tiny re-draws the constant per_expert_scale around 0; real checkpoints hold
    positive scales, so draw those from [0.5, 1.5]."""
    model = build_tiny(model_type, args, bits=bits)
    rng = np.random.default_rng(7)

    def positive(path, value):
        if path.endswith("router.per_expert_scale"):
            return mx.array(rng.uniform(0.5, 1.5, value.shape).astype(np.float32))
        return value

    model.update(tree_map_with_path(positive, model.parameters()))
    mx.eval(model.parameters())
    return model


def build_dbrx(model_type="dbrx", args=DBRX, bits=None):
    """In eval mode, as mlx_lm.load leaves a model: dbrx's block then calls its experts one
    token at a time (the path the adapter observes)."""
    model = build_tiny(model_type, args, bits=bits)
    model.eval()
    return model


def build_longcat(model_type="longcat_flash", args=LONGCAT, bits=None):
    """build_tiny re-draws the zero correction bias with std 0.3, which swamps the softmax
    scores (1/12 on average) and decides the selection alone; std 0.02 lets both the scores and
    the bias matter, and every layer picks zero and stored experts."""
    model = build_tiny(model_type, args, bits=bits)
    rng = np.random.default_rng(3)

    def small(path, value):
        if path.endswith("e_score_correction_bias"):
            return mx.array(rng.normal(0.0, 0.02, value.shape).astype(np.float32))
        return value

    model.update(tree_map_with_path(small, model.parameters()))
    mx.eval(model.parameters())
    return model


def to_bfloat16(model):
    """bf16 everything mlx-lm's cast_predicate lets it cast (experts stay 4-bit)."""
    keep = getattr(model, "cast_predicate", lambda path: True)

    def cast(path, value):
        if value.dtype == mx.float32 and keep(path):
            return value.astype(mx.bfloat16)
        return value

    model.update(tree_map_with_path(cast, model.parameters()))
    return model


# ---------------------------------------------------------------------------------------------
# llama4


@pytest.mark.parametrize("bits", BITS)
def test_llama4(bits):
    model = build_tiny("llama4", LLAMA4, bits=bits)
    adapter, layers, _ = check_architecture("llama4", model, llama4_reference)
    assert adapter.name == "llama4"
    assert [layer.index for layer in layers] == [1, 3]  # interleave_moe_layer_step 2
    # gate weight 1: the block's output is the raw expert output plus the shared expert
    testing.check_adapter(adapter, model, "llama4")


@pytest.mark.parametrize("bits", BITS)
def test_llama4_raw_outputs_are_the_experts_on_their_scaled_input(bits):
    """f_j = expert_j(sigmoid(z_j) * x) in numpy, for the observed top-1 expert and (through
    all_expert_outputs) for every expert on every token."""
    model = build_tiny("llama4", LLAMA4, bits=bits)
    adapter = plugins.adapter_for_config({"model_type": "llama4"})
    with Observer(model, adapter, ALL_NEEDS) as observer:
        model(TOKENS)
    observations = observer.observations()
    layers, inputs = capture_block_inputs(model, adapter, TOKENS)
    for layer, obs in zip(layers, observations):
        x = inputs[layer.position]
        scores = sigmoid(x @ dequantized(layer.block.router).T)
        weights = switch_weights(layer.experts)
        every = np.stack(
            [
                glu_expert(weights, e, x * scores[:, e : e + 1], silu)
                for e in range(layer.num_experts)
            ],
            1,
        )
        chosen = np.take_along_axis(every, obs.selected[..., None], 1)
        np.testing.assert_allclose(obs.outputs, chosen, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(obs.norms, np.linalg.norm(chosen, axis=-1), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(obs.weights, 1.0)
        ours = adapter.all_expert_outputs(layer, mx.array(x.astype(np.float32)))
        np.testing.assert_allclose(np.array(ours), every, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# gemma4


GEMMA4_CASES = [("gemma4_text", GEMMA4_TEXT), ("gemma4", GEMMA4)]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("model_type,args", GEMMA4_CASES, ids=[c[0] for c in GEMMA4_CASES])
def test_gemma4(model_type, args, bits):
    model = build_gemma4(model_type, args, bits)
    adapter, layers, observations = check_architecture(model_type, model, gemma4_reference)
    assert adapter.name == "gemma4"
    prefix = "language_model.model" if model_type == "gemma4" else "model"
    assert [layer.path for layer in layers] == [f"{prefix}.layers.{i}.router" for i in range(2)]
    # the block is the router (its input is the router's); the Experts module returns the
    # sum of weight * raw output, which is what post_feedforward_layernorm_2 normalises
    testing.check_adapter(adapter, model, model_type, check_weights=False)
    sums = {}

    def recorder(position):
        def wrapper(module, call, x, indices, weights):
            out = call(x, indices, weights)
            sums[position] = np.array(out, dtype=np.float64).reshape(-1, out.shape[-1])
            return out

        return wrapper

    with call_hooks([(layer.decoder.experts, recorder(layer.position)) for layer in layers]):
        mx.eval(model(TOKENS))
    for layer, obs in zip(layers, observations):
        rebuilt = np.einsum(
            "tk,tkh->th", obs.weights.astype(np.float64), obs.outputs.astype(np.float64)
        )
        np.testing.assert_allclose(sums[layer.position], rebuilt, rtol=1e-4, atol=1e-5)


def test_gemma4_router_input_is_not_the_decoder_input():
    """Routing the decoder layer's input (the pre-attention stream) would select differently:
    the adapter must read the post-attention h that the router receives."""
    model = build_gemma4("gemma4_text", GEMMA4_TEXT)
    adapter = plugins.adapter_for_config({"model_type": "gemma4_text"})
    layers, router_inputs = capture_block_inputs(model, adapter, TOKENS)
    decoder_inputs = {}

    def recorder(position):
        def wrapper(module, call, x, *args, **kwargs):
            decoder_inputs[position] = np.array(x, dtype=np.float64).reshape(-1, x.shape[-1])
            return call(x, *args, **kwargs)

        return wrapper

    with call_hooks([(layer.decoder, recorder(layer.position)) for layer in layers]):
        mx.eval(model(TOKENS))
    differs = [
        not np.array_equal(
            gemma4_reference(layer.block, router_inputs[layer.position])[0],
            gemma4_reference(layer.block, decoder_inputs[layer.position])[0],
        )
        for layer in layers
    ]
    assert any(differs)


@pytest.mark.parametrize("bits", BITS)
def test_gemma4_raw_outputs_are_geglu_experts_on_the_second_pre_norm(bits):
    model = build_gemma4("gemma4_text", GEMMA4_TEXT, bits)
    adapter = plugins.adapter_for_config({"model_type": "gemma4_text"})
    with Observer(model, adapter, ALL_NEEDS) as observer:
        model(TOKENS)
    observations = observer.observations()
    layers, inputs = capture_block_inputs(model, adapter, TOKENS)
    for layer, obs in zip(layers, observations):
        h = inputs[layer.position]
        norm_weight = np.array(layer.decoder.pre_feedforward_layernorm_2.weight, dtype=np.float64)
        xe = (
            h
            / np.sqrt(np.mean(h * h, -1, keepdims=True) + GEMMA4_TEXT["rms_norm_eps"])
            * norm_weight
        )
        weights = switch_weights(layer.experts)
        every = np.stack(
            [glu_expert(weights, e, xe, gelu_approx) for e in range(layer.num_experts)], 1
        )
        chosen = np.take_along_axis(every, obs.selected[..., None], 1)
        np.testing.assert_allclose(obs.outputs, chosen, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# deepseek_v41


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", list(DEEPSEEK_V41_CASES))
def test_deepseek_v41(case, bits):
    cfg = DEEPSEEK_V41_CASES[case]
    model = build_tiny("deepseek_v41", cfg, bits=bits)
    adapter, layers, _ = check_architecture("deepseek_v41", model, deepseek_v41_reference(cfg))
    assert adapter.name == "deepseek_v41"
    assert [layer.path for layer in layers] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    # every block's output is sum(weight * raw output) + the ungated shared expert
    testing.check_adapter(adapter, model, "deepseek_v41")


def test_deepseek_v41_attention_switch_linear_is_not_an_expert():
    model = build_tiny("deepseek_v41", DEEPSEEK_V41)
    adapter = plugins.adapter_for_config({"model_type": "deepseek_v41"})
    switch = [path for path, m in model.named_modules() if type(m).__name__ == "SwitchLinear"]
    assert "model.layers.0.self_attn.o_a_proj" in switch
    experts = {id(layer.experts) for layer in adapter.moe_layers(model)}
    assert experts == {id(layer.mlp.experts.switch_mlp) for layer in model.layers}


# ---------------------------------------------------------------------------------------------
# bfloat16 with 4-bit experts (how these models run): the dtype casts inside the routers


BF16_CASES = [
    ("llama4", LLAMA4, build_tiny),
    ("gemma4_text", GEMMA4_TEXT, build_gemma4),
    ("deepseek_v41", DEEPSEEK_V41, build_tiny),
    ("dbrx", DBRX, build_dbrx),
    ("longcat_flash", LONGCAT, build_longcat),
]


@pytest.mark.parametrize("model_type,args,build", BF16_CASES, ids=[c[0] for c in BF16_CASES])
def test_bfloat16_selection_is_the_blocks(model_type, args, build):
    """bf16 activations and routers, 4-bit experts: the adapter selects what every block
    selected (the observer raises otherwise) and the forward is unchanged by observing."""
    model = to_bfloat16(build(model_type, args, bits=4))
    adapter = plugins.adapter_for_config({"model_type": model_type})
    tokens = mx.array(np.random.default_rng(5).integers(0, 256, (4, 64)))
    plain = model(tokens)
    with Observer(model, adapter, {"selected", "weights", "norms"}) as observer:
        hooked = model(tokens)
    assert mx.array_equal(plain, hooked).item()
    for layer, obs in zip(observer.layers, observer.observations()):
        assert obs.selected.shape == (256, layer.top_k)
        assert np.isfinite(obs.weights).all() and (obs.weights > 0).all()
        assert np.isfinite(obs.norms).all()


# ---------------------------------------------------------------------------------------------
# dbrx


@pytest.mark.parametrize("bits", BITS)
def test_dbrx(bits):
    model = build_dbrx(bits=bits)
    adapter, layers, _ = check_architecture("dbrx", model, dbrx_reference)
    assert adapter.name == "dbrx"
    assert [layer.path for layer in layers] == [f"transformer.blocks.{i}.ffn" for i in range(2)]
    for layer in layers:
        assert layer.experts is layer.block.experts
        assert (layer.num_experts, layer.top_k, layer.zero_experts) == (8, 2, 0)
    # every block's output is sum(weight * raw output), the weights in the input's dtype
    testing.check_adapter(adapter, model, "dbrx")


@pytest.mark.parametrize("bits", BITS)
def test_dbrx_raw_outputs_are_each_expert_on_its_token(bits):
    """The per-expert hooks put every call in its (token, slot): the observed outputs equal
    numpy's MLP of the selected expert on that token, and all_expert_outputs (batched) too."""
    model = build_dbrx(bits=bits)
    adapter = plugins.adapter_for_config({"model_type": "dbrx"})
    with Observer(model, adapter, ALL_NEEDS) as observer:
        model(TOKENS)
    observations = observer.observations()
    layers, inputs = capture_block_inputs(model, adapter, TOKENS)
    for layer, obs in zip(layers, observations):
        x = inputs[layer.position]
        every = np.stack([dbrx_expert(expert, x) for expert in layer.experts], 1)
        chosen = np.take_along_axis(every, obs.selected[..., None], 1)
        np.testing.assert_allclose(obs.outputs, chosen, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(obs.norms, np.linalg.norm(chosen, axis=-1), rtol=1e-4, atol=1e-5)
        ours = adapter.all_expert_outputs(layer, mx.array(x.astype(np.float32)))
        np.testing.assert_allclose(np.array(ours), every, rtol=1e-4, atol=1e-5)


def test_dbrx_in_training_mode_is_refused():
    """In training mode the block runs each expert once on all its tokens: the calls cannot be
    matched to (token, slot), so observing says how to fix it instead of guessing."""
    model = build_tiny("dbrx", DBRX)
    assert model.training
    adapter = plugins.adapter_for_config({"model_type": "dbrx"})
    with pytest.raises(MlxfunError, match=r"model\.eval\(\)"):
        with Observer(model, adapter):
            model(TOKENS)
    assert [type(m).__name__ for m in model.transformer.blocks[0].ffn.experts] == ["MLP"] * 8


# ---------------------------------------------------------------------------------------------
# longcat_flash(_ngram)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("model_type,args", LONGCAT_CASES, ids=[c[0] for c in LONGCAT_CASES])
def test_longcat(model_type, args, bits):
    model = build_longcat(model_type, args, bits)
    adapter, layers, observations = check_architecture(
        model_type, model, longcat_reference, tokens=TOKENS
    )
    assert adapter.name == "longcat_flash"
    assert [layer.path for layer in layers] == [f"model.layers.{i}.mlp" for i in range(2)]
    stored, zero = LONGCAT["n_routed_experts"], LONGCAT["zero_expert_num"]
    for layer, obs in zip(layers, observations):
        assert (layer.num_experts, layer.zero_experts) == (stored + zero, zero)
        picked_zero = obs.selected >= stored
        assert picked_zero.any() and (~picked_zero).any(), "pick both kinds in every layer"
        assert obs.logits.shape[1] == stored + zero
    # the block's output is sum(weight * raw output) with raw output x for a zero expert
    testing.check_adapter(adapter, model, model_type)


@pytest.mark.parametrize("bits", BITS)
def test_longcat_raw_outputs_are_swiglu_experts_or_the_input(bits):
    model = build_longcat(bits=bits)
    adapter = plugins.adapter_for_config({"model_type": "longcat_flash"})
    with Observer(model, adapter, ALL_NEEDS) as observer:
        model(TOKENS)
    observations = observer.observations()
    layers, inputs = capture_block_inputs(model, adapter, TOKENS)
    stored, zero = LONGCAT["n_routed_experts"], LONGCAT["zero_expert_num"]
    for layer, obs in zip(layers, observations):
        x = inputs[layer.position]
        weights = switch_weights(layer.experts)
        every = np.stack([glu_expert(weights, e, x, silu) for e in range(stored)] + [x] * zero, 1)
        chosen = np.take_along_axis(every, obs.selected[..., None], 1)
        np.testing.assert_allclose(obs.outputs, chosen, rtol=1e-4, atol=1e-5)
        ours = adapter.all_expert_outputs(layer, mx.array(x.astype(np.float32)))
        np.testing.assert_allclose(np.array(ours), every, rtol=1e-4, atol=1e-5)


def test_longcat_with_mlx_lm_quantization():
    """mlx_lm.convert's quantization of longcat: 4-bit experts, an 8-bit (group 64) router."""
    from mlx_lm.utils import quantize_model

    model = build_longcat()
    model, _ = quantize_model(model, {}, 32, 4, quant_predicate=model.quant_predicate)
    classifier = model.model.layers[0].mlp.router.classifier
    assert (classifier.bits, classifier.group_size) == (8, 64)
    assert model.model.layers[0].mlp.switch_mlp.up_proj.bits == 4
    adapter, _, _ = check_architecture("longcat_flash", model, longcat_reference)
    testing.check_adapter(adapter, model, "longcat_flash")


def test_longcat_zero_expert_slots_reach_the_experts_as_expert_0():
    """Why the observer takes longcat's selection from the router's output: in a zero-expert
    slot the block passes expert 0 to the SwitchGLU, so the indices the experts call receives
    cannot tell a zero expert from a real choice of expert 0. (If mlx-lm stops doing this, the
    default experts hook would do.) The router's output is the numpy reference's selection."""
    model = build_longcat()
    stored = LONGCAT["n_routed_experts"]
    block = model.model.layers[0].mlp
    seen = {}

    def router_hook(module, call, x):
        out = call(x)
        seen["x"], seen["router"] = x, out
        return out

    def experts_hook(module, call, x, indices):
        seen["experts"] = indices
        return call(x, indices)

    with call_hooks([(block.router, router_hook), (block.switch_mlp, experts_hook)]):
        mx.eval(model(TOKENS))
    routed = np.array(seen["router"][0])
    passed = np.array(seen["experts"])
    zero = routed >= stored
    assert zero.any() and (~zero).any()
    np.testing.assert_array_equal(passed[zero], 0)
    np.testing.assert_array_equal(passed[~zero], routed[~zero])
    x = np.array(seen["x"], dtype=np.float64).reshape(-1, LONGCAT["hidden_size"])
    selected, _ = longcat_reference(block, x)
    np.testing.assert_array_equal(
        np.sort(routed.reshape(-1, LONGCAT["moe_topk"]), -1), np.sort(selected, -1)
    )


# ---------------------------------------------------------------------------------------------
# declarations


def test_config_matching():
    def name(config):
        return plugins.adapter_for_config(config).name

    assert name({"model_type": "llama4", "text_config": LLAMA4_TEXT}) == "llama4"
    assert name({"model_type": "gemma4_text", **GEMMA4_TEXT}) == "gemma4"
    assert name({"model_type": "gemma4", "text_config": GEMMA4_TEXT}) == "gemma4"
    assert name({"model_type": "gemma4_unified", "text_config": GEMMA4_TEXT}) == "gemma4"
    assert name({"model_type": "deepseek_v41", **DEEPSEEK_V41}) == "deepseek_v41"
    assert name({"model_type": "deepseek_v41_text"}) == "deepseek_v41"
    assert name({"model_type": "deepseek_v41_text", "text_config": DEEPSEEK_V41}) == "deepseek_v41"
    assert name({"model_type": "dbrx", **DBRX}) == "dbrx"
    assert name({"model_type": "longcat_flash", **LONGCAT}) == "longcat_flash"
    assert name({"model_type": "longcat_flash_ngram", **LONGCAT_NGRAM}) == "longcat_flash"


@pytest.mark.parametrize(
    "config,reason",
    [
        (
            {"model_type": "gemma4_text", **dict(GEMMA4_TEXT, enable_moe_block=False)},
            "dense Gemma 4",
        ),
        ({"model_type": "gemma4", "text_config": {"hidden_size": 64}}, "dense Gemma 4"),
        ({"model_type": "muse_spark"}, "metal_kernel"),
    ],
)
def test_refused_configs_give_the_reason(config, reason):
    with pytest.raises(MlxfunError, match=f"not supported: .*{reason}"):
        plugins.adapter_for_config(config)


def test_declarations():
    from mlxfun.adapters.special_family import ADAPTERS

    for adapter in ADAPTERS:
        assert adapter.router_family and adapter.description and adapter.num_experts_keys
    by_name = {adapter.name: adapter for adapter in ADAPTERS}
    assert by_name["llama4"].num_experts_keys == ("text_config.num_local_experts",)
    assert set(by_name["gemma4"].num_experts_keys) == {"text_config.num_experts", "num_experts"}
    assert set(by_name["deepseek_v41"].unsupported) == {"muse_spark"}
    assert by_name["dbrx"].num_experts_keys == ("ffn_config.moe_num_experts",)
    assert by_name["longcat_flash"].num_experts_keys == ("n_routed_experts",)
