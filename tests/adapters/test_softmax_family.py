"""Router families A, B and D (no groups) and phimoe: each architecture on a tiny seeded mlx-lm
model, float32 and 4-bit, against a numpy routing written from the weights and the config.

The references read weights from the block (dequantised) and hyper-parameters from the test's
config, never from the adapter or the block's routing code.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlxfun.core import plugins
from mlxfun.core.errors import MlxfunError
from mlxfun.core.hooks import call_hooks
from mlxfun.core.observe import Observer

from .harness import build_tiny, check_architecture, dequantized

BITS = [None, 4]

BASE = dict(
    hidden_size=64,
    vocab_size=256,
    rms_norm_eps=1e-6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
)


# ---------------------------------------------------------------------------------------------
# numpy building blocks


def softmax(z):
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def linear(module, x):
    y = x @ dequantized(module).T
    if "bias" in module:
        y = y + np.array(module["bias"].astype(mx.float32), dtype=np.float64)
    return y


def vector(array):
    return np.array(array.astype(mx.float32), dtype=np.float64)


def top(scores, k):
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def take(values, selected):
    return np.take_along_axis(values, selected, -1)


def topk_logits_softmax(router, k):
    """Family A: the k largest logits, softmax over them."""

    def ref(block, x):
        logits = linear(router(block), x)
        selected = top(logits, k)
        return selected, softmax(take(logits, selected))

    return ref


def softmax_all_topk(router, k, norm):
    """Family B: softmax over all experts, the k most probable, optionally renormalised."""

    def ref(block, x):
        probs = softmax(router(block, x))
        selected = top(probs, k)
        weights = take(probs, selected)
        if norm:
            weights = weights / weights.sum(-1, keepdims=True)
        return selected, weights

    return ref


def sigmoid_bias_topk(router, bias, k, norm, eps=0.0, scale=1.0):
    """Family D: sigmoid scores; selection by score + bias; weights from the scores."""

    def ref(block, x):
        scores = sigmoid(router(block, x))
        b = bias(block)
        selected = top(scores if b is None else scores + b, k)
        weights = take(scores, selected)
        if norm:
            weights = weights / (weights.sum(-1, keepdims=True) + eps)
        return selected, weights * scale

    return ref


def run(model_type, model, ref):
    return check_architecture(model_type, model, ref)


# ---------------------------------------------------------------------------------------------
# family A: top-k of the logits, softmax over the k

JAMBA = dict(
    BASE,
    intermediate_size=64,
    num_hidden_layers=4,
    attn_layer_offset=1,
    attn_layer_period=2,
    expert_layer_offset=1,
    expert_layer_period=2,
    mamba_d_conv=4,
    mamba_d_state=8,
    mamba_expand=2,
    num_experts=8,
    num_experts_per_tok=2,
)


@pytest.mark.parametrize("bits", BITS)
def test_jamba(bits):
    model = build_tiny("jamba", JAMBA, bits=bits)
    _, layers, _ = run("jamba", model, topk_logits_softmax(lambda b: b.router, 2))
    assert [layer.index for layer in layers] == [1, 3]  # (i + 1) % 2 == 0


PHIXTRAL = dict(
    num_vocab=256,
    model_dim=64,
    num_heads=4,
    num_layers=2,
    rotary_dim=8,
    num_experts_per_tok=2,
    num_local_experts=8,
)


@pytest.mark.parametrize("bits", BITS)
def test_phixtral(bits):
    model = build_tiny("phixtral", PHIXTRAL, bits=bits)
    run("phixtral", model, topk_logits_softmax(lambda b: b.gate, 2))


def test_phi_msft_alias():
    model = build_tiny("phixtral", dict(PHIXTRAL, model_type="phi-msft"))
    run("phi-msft", model, topk_logits_softmax(lambda b: b.gate, 2))


GRANITEMOE = dict(
    BASE,
    num_hidden_layers=2,
    intermediate_size=64,
    logits_scaling=1.0,
    attention_multiplier=0.25,
    embedding_multiplier=1.0,
    residual_multiplier=1.0,
    attention_bias=False,
    num_local_experts=8,
    num_experts_per_tok=2,
)


@pytest.mark.parametrize("bits", BITS)
def test_granitemoe(bits):
    model = build_tiny("granitemoe", GRANITEMOE, bits=bits)
    run("granitemoe", model, topk_logits_softmax(lambda b: b.router.layer, 2))


GRANITEMOEHYBRID = dict(
    BASE,
    num_hidden_layers=2,
    intermediate_size=64,
    attention_bias=False,
    embedding_multiplier=1.0,
    attention_multiplier=0.25,
    logits_scaling=1.0,
    residual_multiplier=1.0,
    layer_types=["mamba", "attention"],
    num_local_experts=8,
    num_experts_per_tok=2,
    shared_intermediate_size=32,
    mamba_n_heads=4,
    mamba_d_head=32,
    mamba_proj_bias=False,
    mamba_d_state=8,
    mamba_d_conv=4,
    mamba_n_groups=1,
    mamba_conv_bias=True,
)


@pytest.mark.parametrize("bits", BITS)
def test_granitemoehybrid(bits):
    model = build_tiny("granitemoehybrid", GRANITEMOEHYBRID, bits=bits)
    run("granitemoehybrid", model, topk_logits_softmax(lambda b: b.router.layer, 2))


GPT_OSS = dict(
    num_hidden_layers=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    vocab_size=256,
    hidden_size=64,
    intermediate_size=64,
    head_dim=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=8,
    layer_types=["sliding_attention", "full_attention"],
)


@pytest.mark.parametrize("bits", BITS)
def test_gpt_oss(bits):
    model = build_tiny("gpt_oss", GPT_OSS, bits=bits)
    assert "bias" in model.model.layers[0].mlp.router  # the biased router is exercised
    run("gpt_oss", model, topk_logits_softmax(lambda b: b.router, 2))


# ---------------------------------------------------------------------------------------------
# family B: softmax over all experts, top-k, optional renormalisation

QWEN2_MOE = dict(
    BASE,
    num_hidden_layers=2,
    intermediate_size=128,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=64,
)


@pytest.mark.parametrize("bits", BITS)
def test_qwen2_moe(bits):
    model = build_tiny("qwen2_moe", QWEN2_MOE, bits=bits)
    run("qwen2_moe", model, softmax_all_topk(lambda b, x: linear(b.gate, x), 2, norm=False))


QWEN3_NEXT = dict(
    BASE,
    num_hidden_layers=4,
    intermediate_size=128,
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    num_experts=8,
    num_experts_per_tok=2,
    decoder_sparse_step=1,
    shared_expert_intermediate_size=64,
    mlp_only_layers=[2],
    moe_intermediate_size=32,
    partial_rotary_factor=0.5,
    head_dim=16,
    norm_topk_prob=True,
    full_attention_interval=2,
)


@pytest.mark.parametrize("bits", BITS)
def test_qwen3_next(bits):
    model = build_tiny("qwen3_next", QWEN3_NEXT, bits=bits)
    _, layers, _ = run(
        "qwen3_next", model, softmax_all_topk(lambda b, x: linear(b.gate, x), 2, norm=True)
    )
    assert [layer.index for layer in layers] == [0, 1, 3]


def test_qwen3_next_without_renormalisation():
    model = build_tiny("qwen3_next", dict(QWEN3_NEXT, norm_topk_prob=False, num_hidden_layers=2))
    run("qwen3_next", model, softmax_all_topk(lambda b, x: linear(b.gate, x), 2, norm=False))


QWEN3_5_TEXT = dict(
    BASE,
    num_hidden_layers=2,
    intermediate_size=128,
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    num_experts=8,
    num_experts_per_tok=2,
    shared_expert_intermediate_size=64,
    moe_intermediate_size=32,
    head_dim=16,
    full_attention_interval=2,
    rope_parameters={
        "type": "default",
        "mrope_section": [2, 1, 1],
        "rope_theta": 10000,
        "partial_rotary_factor": 0.5,
    },
)


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_5_moe"])
@pytest.mark.parametrize("bits", BITS)
def test_qwen3_5(model_type, bits):
    model = build_tiny(model_type, dict(text_config=QWEN3_5_TEXT), bits=bits)
    # norm_topk_prob defaults to True in Qwen3.5
    _, layers, _ = run(
        model_type, model, softmax_all_topk(lambda b, x: linear(b.gate, x), 2, norm=True)
    )
    assert layers[0].path == "language_model.model.layers.0.mlp"


def test_qwen3_5_flat_config():
    model = build_tiny("qwen3_5_moe", dict(QWEN3_5_TEXT, norm_topk_prob=False))
    run("qwen3_5_moe", model, softmax_all_topk(lambda b, x: linear(b.gate, x), 2, norm=False))


def test_qwen3_5_dense_config_is_refused_with_the_reason():
    moe = {"model_type": "qwen3_5", "text_config": {"hidden_size": 64, "num_experts": 8}}
    assert plugins.adapter_for_config(moe).name == "qwen3_5"
    flat = {"model_type": "qwen3_5_moe", "hidden_size": 64, "num_experts": 8}
    assert plugins.adapter_for_config(flat).name == "qwen3_5"
    for dense in (
        {"model_type": "qwen3_5", "text_config": {"hidden_size": 64}},
        {"model_type": "qwen3_5", "text_config": {"hidden_size": 64, "num_experts": 0}},
    ):
        with pytest.raises(MlxfunError, match="no experts"):
            plugins.adapter_for_config(dense)


def hadamard(n):
    h = np.array([[1.0]])
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


@pytest.mark.parametrize("bits", BITS)
def test_prism_hadamard_qwen35(bits):
    """Qwen3.5 whose routers are 2-bit packs with a Hadamard rotation folded into the input."""
    text = dict(QWEN3_5_TEXT, hidden_size=512)  # packed widths are multiples of 512
    packed = [
        {"path": f"model.layers.{i}.mlp.gate", "embedding": False, "dtype": "float16", "block": 512}
        for i in range(2)
    ]
    args = dict(
        text_config=text,
        schema_version=1,
        tensor_namespace="mlx-lm-text",
        quantization={"bits": 2, "group_size": 128, "mode": "affine"},
        modules=packed,
    )
    model = build_tiny("prism_hadamard_qwen35", args, bits=bits)
    rng = np.random.default_rng(3)
    for layer in model.language_model.model.layers:
        gate = layer.mlp.gate
        gate.weight = mx.array(rng.integers(0, 2**32, gate.weight.shape, dtype=np.uint32))
        # float32 scales: with float16 ones quantized_matmul itself rounds to ~1e-3
        gate.scales = mx.array(rng.normal(0, 0.05, gate.scales.shape).astype(np.float32))
        gate.biases = mx.array(rng.normal(0, 0.05, gate.biases.shape).astype(np.float32))
        gate.signs = mx.array(rng.choice([-1.0, 1.0], 512).astype(np.float32))
    mx.eval(model.parameters())

    def router(block, x):
        gate = block.gate
        w = mx.dequantize(gate.weight, gate.scales, gate.biases, group_size=128, bits=2)
        rotated = (x * vector(gate.signs)) @ hadamard(512).T
        return rotated @ vector(w).T

    _, layers, _ = run("prism_hadamard_qwen35", model, softmax_all_topk(router, 2, norm=True))
    assert type(layers[0].block.gate).__name__ == "HadamardQuantizedLinear"


QWEN3_MOE_TEXT = dict(
    BASE,
    model_type="qwen3_moe",
    num_hidden_layers=2,
    intermediate_size=128,
    num_experts=8,
    num_experts_per_tok=2,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    moe_intermediate_size=32,
    head_dim=16,
    tie_word_embeddings=False,
    norm_topk_prob=True,
)


@pytest.mark.parametrize("bits", BITS)
def test_qwen3_vl_moe(bits):
    model = build_tiny("qwen3_vl_moe", dict(text_config=QWEN3_MOE_TEXT), bits=bits)
    run("qwen3_vl_moe", model, softmax_all_topk(lambda b, x: linear(b.gate, x), 2, norm=True))


OLMOE = dict(
    BASE,
    num_hidden_layers=2,
    intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
)


@pytest.mark.parametrize("bits", BITS)
def test_olmoe(bits):
    model = build_tiny("olmoe", OLMOE, bits=bits)
    run("olmoe", model, softmax_all_topk(lambda b, x: linear(b.gate, x), 2, norm=True))


def test_olmoe_without_renormalisation():
    model = build_tiny("olmoe", dict(OLMOE, norm_topk_prob=False))
    run("olmoe", model, softmax_all_topk(lambda b, x: linear(b.gate, x), 2, norm=False))


MELLUM = dict(
    BASE,
    num_hidden_layers=2,
    intermediate_size=128,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    head_dim=16,
    tie_word_embeddings=False,
    norm_topk_prob=True,
    sliding_window=8,
    layer_types=["sliding_attention", "full_attention"],
    rope_parameters={
        "sliding_attention": {"rope_theta": 10000.0},
        "full_attention": {"rope_theta": 10000.0},
    },
)


@pytest.mark.parametrize("bits", BITS)
def test_mellum(bits):
    model = build_tiny("mellum", MELLUM, bits=bits)
    run("mellum", model, softmax_all_topk(lambda b, x: linear(b.gate, x), 2, norm=True))


HUNYUAN = dict(
    BASE,
    num_hidden_layers=2,
    intermediate_size=32,
    attention_bias=False,
    moe_topk=2,
    num_experts=8,
    num_shared_expert=1,
    use_mixed_mlp_moe=True,
    use_qk_norm=True,
    use_cla=False,
    cla_share_factor=2,
    rope_scaling={"alpha": 1.0, "factor": 1.0, "type": "dynamic"},
)


@pytest.mark.parametrize("bits", BITS)
def test_hunyuan(bits):
    model = build_tiny("hunyuan", HUNYUAN, bits=bits)
    run("hunyuan", model, softmax_all_topk(lambda b, x: linear(b.gate.wg, x), 2, norm=False))


def test_hunyuan_per_layer_top_k():
    model = build_tiny("hunyuan", dict(HUNYUAN, moe_topk=[2, 3]))
    k_of = {id(layer.mlp): k for layer, k in zip(model.model.layers, [2, 3])}

    def ref(block, x):
        return softmax_all_topk(lambda b, x: linear(b.gate.wg, x), k_of[id(block)], norm=False)(
            block, x
        )

    _, _, observations = run("hunyuan", model, ref)
    assert [obs.selected.shape[1] for obs in observations] == [2, 3]


DEEPSEEK = dict(
    BASE,
    num_hidden_layers=3,
    intermediate_size=128,
    moe_intermediate_size=32,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    moe_layer_freq=1,
)


@pytest.mark.parametrize("bits", BITS)
def test_deepseek(bits):
    model = build_tiny("deepseek", DEEPSEEK, bits=bits)
    _, layers, _ = run(
        "deepseek", model, softmax_all_topk(lambda b, x: x @ vector(b.gate.weight).T, 2, norm=False)
    )
    assert [layer.index for layer in layers] == [1, 2]


ERNIE = dict(
    BASE,
    num_hidden_layers=3,
    intermediate_size=128,
    use_bias=False,
    tie_word_embeddings=False,
    moe_num_experts=8,
    moe_intermediate_size=32,
    moe_k=2,
    moe_num_shared_experts=1,
    moe_layer_start_index=1,
)


def ernie_reference(act):
    def ref(block, x):
        scores = act(linear(block.gate, x))
        selected = top(scores, 2)
        weights = take(scores, selected)
        return selected, weights / np.maximum(weights.sum(-1, keepdims=True), 1e-12)

    return ref


@pytest.mark.parametrize("bits", BITS)
def test_ernie4_5_moe(bits):
    model = build_tiny("ernie4_5_moe", ERNIE, bits=bits)
    _, layers, _ = run("ernie4_5_moe", model, ernie_reference(softmax))
    assert [layer.index for layer in layers] == [1, 2]


def test_ernie4_5_moe_sigmoid_gate():
    model = build_tiny("ernie4_5_moe", dict(ERNIE, moe_gate_act="sigmoid"))
    run("ernie4_5_moe", model, ernie_reference(sigmoid))


# ---------------------------------------------------------------------------------------------
# phimoe: sparsemixer

PHIMOE = dict(
    BASE,
    num_hidden_layers=2,
    intermediate_size=32,
    num_local_experts=8,
    num_experts_per_tok=2,
)


def sparsemixer_reference(k, jitter):
    """HF's sparsemixer at inference, written directly: per round pick the largest remaining
    logit m; its weight is the softmax of the remaining logits z_j with
    (m - z_j) / max(|z_j|, m) <= 2 * jitter, evaluated at the pick."""

    def ref(block, x):
        logits = linear(block.gate, x)
        selected = np.zeros((len(x), k), dtype=np.int64)
        weights = np.zeros((len(x), k))
        for t, z in enumerate(logits):
            remaining = np.ones(len(z), dtype=bool)
            for r in range(k):
                pick = int(np.argmax(np.where(remaining, z, -np.inf)))
                m = z[pick]
                band = remaining & ((m - z) / np.maximum(np.abs(z), m) <= 2 * jitter)
                weights[t, r] = np.exp(z[pick] - m) / np.exp(z[band] - m).sum()
                selected[t, r] = pick
                remaining[pick] = False
        return selected, weights

    return ref


@pytest.mark.parametrize("jitter", [0.01, 0.3])
@pytest.mark.parametrize("bits", BITS)
def test_phimoe(bits, jitter):
    model = build_tiny("phimoe", dict(PHIMOE, router_jitter_noise=jitter), bits=bits)
    _, _, observations = run("phimoe", model, sparsemixer_reference(2, jitter))
    if jitter == 0.3:  # a wide band really mixes several experts into each weight
        assert np.mean(observations[0].weights < 0.999) > 0.2


# ---------------------------------------------------------------------------------------------
# family D: sigmoid scores, a selection-only bias, top-k, renormalisation, scaling

MINIMAX = dict(
    BASE,
    intermediate_size=32,
    num_experts_per_tok=2,
    num_local_experts=8,
    shared_intermediate_size=32,
    num_hidden_layers=2,
    rotary_dim=8,
    head_dim=16,
)

minimax_reference = sigmoid_bias_topk(
    lambda b, x: linear(b.gate, x),
    lambda b: vector(b.e_score_correction_bias),
    2,
    norm=True,
    eps=1e-20,
)


@pytest.mark.parametrize("bits", BITS)
def test_minimax(bits):
    run("minimax", build_tiny("minimax", MINIMAX, bits=bits), minimax_reference)


def test_minimax_m2_alias():
    model = build_tiny("minimax", dict(MINIMAX, model_type="minimax_m2"))
    run("minimax_m2", model, minimax_reference)


def test_weights_keep_the_blocks_dtype():
    """The minimax block casts its weights to the input dtype; so does the adapter."""
    model = build_tiny("minimax", MINIMAX, bits=4)
    model.set_dtype(mx.bfloat16)
    adapter = plugins.adapter_for_config({"model_type": "minimax"})
    tokens = mx.array(np.random.default_rng(1).integers(0, 256, (2, 24)))
    with Observer(model, adapter) as observer:
        model(tokens)
    observations = observer.observations()  # the selections agree in bf16 too
    layer = adapter.moe_layers(model)[0]
    x = mx.random.normal((4, 64)).astype(mx.bfloat16)
    _, weights, _ = adapter.routing(layer.block, x)
    assert weights.dtype == mx.bfloat16
    assert len(observations) == 2


MINIMAX_M3_TEXT = dict(
    BASE,
    intermediate_size=32,
    dense_intermediate_size=64,
    shared_intermediate_size=32,
    num_hidden_layers=3,
    num_local_experts=8,
    num_experts_per_tok=2,
    head_dim=16,
    mlp_layer_types=["dense", "sparse", "sparse"],
    routed_scaling_factor=2.0,
)


@pytest.mark.parametrize("bits", BITS)
def test_minimax_m3_vl(bits):
    model = build_tiny("minimax_m3_vl", dict(text_config=MINIMAX_M3_TEXT), bits=bits)
    ref = sigmoid_bias_topk(
        lambda b, x: linear(b.gate, x),
        lambda b: vector(b.e_score_correction_bias),
        2,
        norm=True,
        eps=1e-20,
        scale=2.0,
    )
    _, layers, _ = run("minimax_m3_vl", model, ref)
    assert [layer.index for layer in layers] == [1, 2]


KLEAR = dict(
    BASE,
    num_hidden_layers=2,
    intermediate_size=128,
    attention_bias=False,
    mlp_only_layers=[],
    num_experts=8,
    num_experts_per_tok=2,
    decoder_sparse_step=1,
    n_shared_experts=1,
    moe_intermediate_size=32,
    norm_topk_prob=True,
)


def klear_reference(norm):
    routed = sigmoid_bias_topk(
        lambda b, x: linear(b.gate, x), lambda b: vector(b.expert_bias), 2, norm=norm
    )

    def ref(block, x):
        selected, weights = routed(block, x)
        coefficient = softmax(linear(block.coefficient, x))  # y = c0 * routed + c1 * shared
        return selected, weights * coefficient[:, :1]

    return ref


@pytest.mark.parametrize("bits", BITS)
def test_klear(bits):
    run("Klear", build_tiny("Klear", KLEAR, bits=bits), klear_reference(norm=True))


def test_klear_without_renormalisation():
    run(
        "Klear", build_tiny("Klear", dict(KLEAR, norm_topk_prob=False)), klear_reference(norm=False)
    )


LFM2_MOE = dict(
    BASE,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    use_expert_bias=True,
    num_dense_layers=1,
    norm_eps=1e-5,
    conv_bias=False,
    conv_L_cache=3,
    routed_scaling_factor=1.5,
    layer_types=["conv", "full_attention", "conv"],
)


@pytest.mark.parametrize("bits", BITS)
def test_lfm2_moe(bits):
    model = build_tiny("lfm2_moe", LFM2_MOE, bits=bits)
    ref = sigmoid_bias_topk(
        lambda b, x: linear(b.gate, x),
        lambda b: vector(b.expert_bias),
        2,
        norm=True,
        eps=1e-6,
        scale=1.5,
    )
    _, layers, _ = run("lfm2_moe", model, ref)
    assert [layer.index for layer in layers] == [1, 2]


def test_lfm2_moe_without_expert_bias():
    model = build_tiny("lfm2_moe", dict(LFM2_MOE, use_expert_bias=False, norm_topk_prob=False))
    ref = sigmoid_bias_topk(
        lambda b, x: linear(b.gate, x), lambda b: None, 2, norm=False, scale=1.5
    )
    run("lfm2_moe", model, ref)


LAGUNA = dict(
    BASE,
    num_hidden_layers=3,
    intermediate_size=128,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    moe_routed_scaling_factor=2.5,
    moe_router_logit_softcapping=3.0,
    sliding_window=8,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
)


def laguna_reference(softcap, score):
    def ref(block, x):
        logits = linear(block.gate.proj, x)
        if softcap > 0:
            logits = np.tanh(logits / softcap) * softcap
        scores = score(logits)
        selected = top(scores + vector(block.gate.e_score_correction_bias), 2)
        weights = take(scores, selected)
        return selected, weights / weights.sum(-1, keepdims=True) * 2.5

    return ref


@pytest.mark.parametrize("bits", BITS)
def test_laguna(bits):
    model = build_tiny("laguna", LAGUNA, bits=bits)
    _, layers, _ = run("laguna", model, laguna_reference(3.0, sigmoid))
    assert [layer.index for layer in layers] == [1, 2]


def test_laguna_sqrtsoftplus_without_softcap():
    args = dict(LAGUNA, moe_router_score_func="sqrtsoftplus", moe_router_logit_softcapping=0.0)
    model = build_tiny("laguna", args)
    run("laguna", model, laguna_reference(0.0, lambda z: np.sqrt(np.log1p(np.exp(z)))))


STEP3P5 = dict(
    hidden_size=64,
    num_hidden_layers=3,
    vocab_size=256,
    num_attention_heads=4,
    num_attention_groups=2,
    head_dim=16,
    intermediate_size=128,
    sliding_window=8,
    moe_num_experts=8,
    moe_top_k=2,
    moe_intermediate_size=32,
    share_expert_dim=32,
    moe_router_scaling_factor=3.0,
    norm_expert_weight=True,
)


@pytest.mark.parametrize("bits", BITS)
def test_step3p5(bits):
    model = build_tiny("step3p5", STEP3P5, bits=bits)
    ref = sigmoid_bias_topk(
        lambda b, x: linear(b.gate.gate, x),
        lambda b: vector(b.gate.router_bias),
        2,
        norm=True,
        eps=1e-20,
        scale=3.0,
    )
    _, layers, _ = run("step3p5", model, ref)
    assert [layer.index for layer in layers] == [1, 2]


def test_step3p5_clamped_experts_without_renormalisation():
    args = dict(
        STEP3P5, norm_expert_weight=False, moe_layers_enum="0,2", swiglu_limits=[0.5, 0.0, 0.5]
    )
    model = build_tiny("step3p5", args)
    ref = sigmoid_bias_topk(
        lambda b, x: linear(b.gate.gate, x),
        lambda b: vector(b.gate.router_bias),
        2,
        norm=False,
        scale=3.0,
    )
    _, layers, _ = run("step3p5", model, ref)
    assert [layer.index for layer in layers] == [0, 2]


# ---------------------------------------------------------------------------------------------
# declarations


@pytest.mark.parametrize(
    "moe, dense",
    [
        (
            {"model_type": "granitemoehybrid", "hidden_size": 64, "num_local_experts": 8},
            {"model_type": "granitemoehybrid", "hidden_size": 64, "num_local_experts": None},
        ),
        (
            {"model_type": "jamba", "hidden_size": 64, "num_experts": 2},
            {"model_type": "jamba", "hidden_size": 64, "num_experts": 1},
        ),
        (
            {"model_type": "hunyuan", "hidden_size": 64, "num_experts": 8},
            {"model_type": "hunyuan", "hidden_size": 64, "num_experts": 1},
        ),
        (
            {"model_type": "deepseek", "hidden_size": 64, "n_routed_experts": 8},
            {"model_type": "deepseek", "hidden_size": 64},
        ),
    ],
)
def test_dense_configs_of_moe_types_are_refused(moe, dense):
    assert plugins.adapter_for_config(moe).name == moe["model_type"]
    with pytest.raises(MlxfunError, match="dense model"):
        plugins.adapter_for_config(dense)


def test_granitemoehybrid_dense_model_is_refused():
    """The dense Granite 4.0-H really builds no MoE layer, which is why its config is refused."""
    args = dict(GRANITEMOEHYBRID, num_local_experts=None, num_experts_per_tok=None)
    model = build_tiny("granitemoehybrid", args)
    adapter = plugins.get_adapter("granitemoehybrid")
    assert adapter.moe_layers(model) == []


FAMILY = [
    "mixtral",
    "jamba",
    "phixtral",
    "granitemoe",
    "granitemoehybrid",
    "gpt_oss",
    "qwen3_moe",
    "qwen3_vl_moe",
    "qwen2_moe",
    "qwen3_next",
    "qwen3_5",
    "olmoe",
    "mellum",
    "hunyuan",
    "deepseek",
    "ernie4_5_moe",
    "phimoe",
    "minimax",
    "minimax_m3_vl",
    "Klear",
    "lfm2_moe",
    "laguna",
    "step3p5",
]


@pytest.mark.parametrize("name", FAMILY)
def test_declaration_is_complete(name):
    adapter = plugins.get_adapter(name)
    assert adapter.description and adapter.router_family
    assert adapter.num_experts_keys


# ---------------------------------------------------------------------------------------------
# every architecture: the weights rebuild the block's output, and bf16 selections match


def _gated_shared(block, x):
    return mx.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)


def _klear_shared(block, x):
    return mx.softmax(block.coefficient(x), axis=-1, precise=True)[..., 1:] * block.shared_experts(
        x
    )


# model type, mlx-lm module, tiny args, the block's output that is not routed (None: nothing)
ARCHITECTURES = [
    ("jamba", "jamba", JAMBA, None),
    ("phixtral", "phixtral", PHIXTRAL, None),
    ("granitemoe", "granitemoe", GRANITEMOE, None),
    ("granitemoehybrid", "granitemoehybrid", GRANITEMOEHYBRID, None),
    ("gpt_oss", "gpt_oss", GPT_OSS, None),
    ("qwen2_moe", "qwen2_moe", QWEN2_MOE, _gated_shared),
    ("qwen3_next", "qwen3_next", QWEN3_NEXT, _gated_shared),
    ("qwen3_5_moe", "qwen3_5_moe", dict(text_config=QWEN3_5_TEXT), _gated_shared),
    ("qwen3_vl_moe", "qwen3_vl_moe", dict(text_config=QWEN3_MOE_TEXT), None),
    ("olmoe", "olmoe", OLMOE, None),
    ("mellum", "mellum", MELLUM, None),
    ("hunyuan", "hunyuan", HUNYUAN, lambda b, x: b.shared_mlp(x)),
    ("deepseek", "deepseek", DEEPSEEK, lambda b, x: b.shared_experts(x)),
    ("ernie4_5_moe", "ernie4_5_moe", ERNIE, lambda b, x: b.shared_experts(x)),
    ("phimoe", "phimoe", dict(PHIMOE, router_jitter_noise=0.3), None),
    ("minimax", "minimax", MINIMAX, None),
    (
        "minimax_m3_vl",
        "minimax_m3_vl",
        dict(text_config=MINIMAX_M3_TEXT),
        lambda b, x: b.shared_experts(x),
    ),
    ("Klear", "Klear", KLEAR, _klear_shared),
    ("lfm2_moe", "lfm2_moe", LFM2_MOE, None),
    ("laguna", "laguna", LAGUNA, lambda b, x: b.shared_expert(x)),
    ("step3p5", "step3p5", STEP3P5, lambda b, x: b.share_expert(x)),
]

TOKENS = mx.array(np.random.default_rng(2).integers(0, 256, (2, 16)))


@pytest.mark.parametrize(
    "model_type, module, args, shared", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES]
)
def test_weights_rebuild_the_block_output(model_type, module, args, shared):
    """block(x) == sum_k w_k f_k(x) + the non-routed part: the reported weights are exactly the
    factors that multiply each expert's output (scaling and mixing coefficients included)."""
    model = build_tiny(module, args)
    adapter = plugins.adapter_for_config({"model_type": model_type})
    with Observer(model, adapter, frozenset({"selected", "weights", "outputs"})) as observer:
        model(TOKENS)
    observations = observer.observations()
    layers = adapter.moe_layers(model)
    seen = {}

    def hook(position):
        def wrapper(module, call, x, *a, **k):
            seen[position] = (x, call(x, *a, **k))
            return seen[position][1]

        return wrapper

    with call_hooks([(layer.block, hook(layer.position)) for layer in layers]):
        mx.eval(model(TOKENS))
    for layer, obs in zip(layers, observations):
        x, y = seen[layer.position]
        rest = np.zeros(y.shape) if shared is None else np.array(shared(layer.block, x))
        y = np.array(y, dtype=np.float64).reshape(-1, y.shape[-1])
        routed = np.einsum("tk,tkh->th", obs.weights, obs.outputs)
        np.testing.assert_allclose(routed + rest.reshape(y.shape), y, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "model_type, module, args, shared", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES]
)
def test_bfloat16_selection_matches_the_block(model_type, module, args, shared):
    """In bf16 the routers' float32 casts matter: the observer's check that the adapter selects
    what the block selected must still pass (4-bit experts: CPU gather_mm needs float32)."""
    model = build_tiny(module, args, bits=4)
    model.set_dtype(mx.bfloat16)
    adapter = plugins.adapter_for_config({"model_type": model_type})
    tokens = mx.array(np.random.default_rng(1).integers(0, 256, (4, 64)))
    with Observer(model, adapter) as observer:
        model(tokens)
    assert all(obs.num_tokens == 256 for obs in observer.observations())
