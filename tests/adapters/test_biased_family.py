"""Router family C (sigmoid or softmax scores, a selection-only correction bias, group-limited
selection, renormalisation, routed scaling): each architecture on a tiny seeded mlx-lm model,
float32 and 4-bit, against a numpy routing written from the weights and the test's config.

The tiny configs use 8 experts in 4 groups of 2 with the best 2 groups kept (n_group > 1), and
build_tiny re-draws the zero-initialised correction biases, so the bias and the group limit both
change the selection. The numpy references read weights from the block (dequantised) and
hyper-parameters from the config, never from the adapter or mlx-lm's routing code.

Besides the model forward (harness checks: hooks change nothing, routing equals the reference,
statistics equal a brute-force loop), every MoE block is also fed 256 random tokens directly, so
the group limit and negative biased scores are exercised on many more tokens.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map_with_path
from mlxfun.core import plugins
from mlxfun.core.errors import MlxfunError
from mlxfun.core.observe import Observer

from .harness import (
    ALL_NEEDS,
    build_tiny,
    capture_block_inputs,
    check_runner,
    check_statistics,
    dequantized,
)

BITS = [None, 4]
TOKENS = mx.array(np.random.default_rng(1).integers(0, 256, (2, 24)))

BASE = dict(
    hidden_size=64,
    vocab_size=256,
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
GROUPS = dict(n_group=4, topk_group=2)  # 8 experts in 4 groups of 2; the best 2 groups compete
MLA = dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
MOE = dict(
    num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, num_experts_per_tok=2
)

DEEPSEEK_V3 = dict(
    BASE,
    **MLA,
    **GROUPS,
    **MOE,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    rope_theta=10000.0,
)
DEEPSEEK_V32 = dict(DEEPSEEK_V3, index_head_dim=16, index_n_heads=2, index_topk=8)
GLM_MOE_DSA = {
    **{k: v for k, v in DEEPSEEK_V32.items() if k != "rope_theta"},
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "attention_bias": False,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
}
DEEPSEEK_V2 = {
    **{k: v for k, v in DEEPSEEK_V3.items() if k != "norm_topk_prob"},
    "topk_method": "group_limited_greedy",
    "rope_scaling": {
        "type": "yarn",
        "factor": 1.0,
        "original_max_position_embeddings": 512,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
}
GLM4_MOE = dict(
    BASE,
    **GROUPS,
    **MOE,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    n_shared_experts=1,
    n_routed_experts=8,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    first_k_dense_replace=1,
    rope_theta=10000.0,
    rope_scaling=None,
    use_qk_norm=True,
    attention_bias=False,
    partial_rotary_factor=0.5,
)
SOLAR_OPEN = {k: v for k, v in GLM4_MOE.items() if k not in ("use_qk_norm", "attention_bias")}
GLM4_MOE_LITE = dict(DEEPSEEK_V3, routed_scaling_factor=1.8)
KIMI_VL = dict(text_config=dict(DEEPSEEK_V3))
KIMI_K25 = dict(text_config=dict(DEEPSEEK_V3, model_type="kimi_k2"))
DOTS1 = dict(
    BASE,
    **GROUPS,
    **MOE,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    n_shared_experts=1,
    n_routed_experts=8,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    first_k_dense_replace=1,
    rope_theta=10000.0,
)
EXAONE_MOE = dict(
    BASE,
    **GROUPS,
    **MOE,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_shared_experts=1,
    sliding_window=8,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    is_moe_layer=[False, True, True],
)
MIMO_V2_FLASH = dict(
    BASE,
    **GROUPS,
    **MOE,
    hybrid_layer_pattern=[0, 1, 0],
    moe_layer_freq=[0, 1, 1],
    add_swa_attention_sink_bias=True,
    add_full_attention_sink_bias=False,
    sliding_window_size=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    n_shared_experts=None,
    n_routed_experts=8,
    routed_scaling_factor=None,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    norm_topk_prob=True,
    layernorm_epsilon=1e-6,
    rope_theta=10000.0,
    swa_rope_theta=10000.0,
    swa_num_attention_heads=4,
    swa_num_key_value_heads=2,
    head_dim=16,
    v_head_dim=16,
    swa_head_dim=16,
    swa_v_head_dim=16,
    partial_rotary_factor=1,
)
NEMOTRON_H = dict(
    BASE,
    **GROUPS,
    hybrid_override_pattern=["M", "E", "*", "E"],
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    attention_bias=False,
    mamba_num_heads=4,
    mamba_head_dim=16,
    mamba_proj_bias=False,
    ssm_state_size=16,
    conv_kernel=4,
    n_groups=2,
    mlp_bias=False,
    layer_norm_epsilon=1e-6,
    use_bias=False,
    use_conv_bias=True,
    moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=48,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
)
NEMOTRON_H_LATENT = dict(NEMOTRON_H, moe_latent_size=32)
KIMI_LINEAR = dict(
    BASE,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=96,
    head_dim=16,
    rope_theta=10000.0,
    linear_attn_config={
        "num_heads": 4,
        "head_dim": 16,
        "short_conv_kernel_size": 4,
        "kda_layers": [1, 2],
    },
    model_max_length=512,
    num_experts=8,
    moe_intermediate_size=32,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    mla_use_nope=True,
    num_experts_per_token=2,
    num_shared_experts=1,
    moe_router_activation_func="sigmoid",
    moe_renormalize=True,
    routed_scaling_factor=2.5,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    num_expert_group=4,
    topk_group=2,
)
KIMI_K3_TEXT = {
    **{k: v for k, v in KIMI_LINEAR.items() if k != "model_max_length"},
    "model_type": "kimi_linear",
    "q_lora_rank": None,
    "hidden_act": "situ",
}
KIMI_K3 = dict(text_config=KIMI_K3_TEXT)
KIMI_K3_LATENT = dict(
    text_config=dict(KIMI_K3_TEXT, routed_expert_hidden_size=32, latent_moe_use_norm=True)
)
BAILING_MOE = dict(
    BASE,
    **GROUPS,
    **MOE,
    num_experts=8,
    num_shared_experts=1,
    norm_topk_prob=True,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    first_k_dense_replace=1,
    moe_router_enable_expert_bias=True,
    routed_scaling_factor=2.5,
    score_function="sigmoid",
    use_qk_norm=True,
)
BAILING_MOE_LINEAR = dict(BAILING_MOE, layer_group_size=2, group_norm_size=1, head_dim=16)
BAILING_HYBRID = dict(
    BASE,
    **GROUPS,
    **MOE,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts=8,
    num_shared_experts=1,
    first_k_dense_replace=1,
    layer_group_size=2,
    group_norm_size=1,
    rope_theta=10000.0,
    routed_scaling_factor=2.5,
    head_dim=16,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
)
BAILING_MOE_V3 = dict(
    BASE,
    **GROUPS,
    **MOE,
    moe_shared_expert_intermediate_size=32,
    num_attention_heads=4,
    num_experts=8,
    num_shared_experts=1,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    layer_group_size=2,
    head_dim=16,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    rope_theta=10000.0,
)
AFMOE = dict(
    BASE,
    **GROUPS,
    **MOE,
    layer_types=["full_attention", "sliding_attention", "full_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_shared_experts=1,
    num_dense_layers=1,
    route_norm=True,
    route_scale=2.5,
    score_func="sigmoid",
    sliding_window=8,
    mup_enabled=True,
)
MISTRAL4 = dict(
    BASE,
    **MLA,
    **GROUPS,
    **MOE,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    first_k_dense_replace=1,
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 1.0,
        "original_max_position_embeddings": 512,
        "llama_4_scaling_beta": 0.1,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
)
MISTRAL3 = dict(text_config=dict(MISTRAL4, model_type="mistral4"))


# ---------------------------------------------------------------------------------------------
# numpy reference routing


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def softmax(z):
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def vector(array):
    return np.array(array.astype(mx.float32), dtype=np.float64)


def family_c(
    logits,
    k,
    *,
    bias=None,
    n_group=1,
    topk_group=1,
    scale=1.0,
    norm=True,
    score="sigmoid",
    group_score="top2",
    dropped=0.0,
):
    """Independent family-C routing in float64: ``(selected, weights, clear)``.

    Scores by sigmoid or softmax; the choice adds the bias; with groups, the
    ``n_group - topk_group`` groups with the lowest group score (sum of the two best choice
    scores, or the best) get the choice score ``dropped`` (0 in most blocks, -inf in
    bailing_hybrid and bailing_moe_v3); the k best choices are selected; the weights are the
    un-biased scores, divided by their sum when ``norm`` (and k > 1), times ``scale``.
    ``clear`` marks tokens whose selection does not hinge on a near-tie (within 1e-5), which
    float32 and float64 may break differently (ties between zeroed experts included).
    """
    scores = sigmoid(logits) if score == "sigmoid" else softmax(logits)
    choice = scores if bias is None else scores + bias
    tokens, experts = choice.shape
    clear = np.ones(tokens, dtype=bool)
    if n_group > 1 and topk_group < n_group:
        grouped = choice.reshape(tokens, n_group, experts // n_group)
        if group_score == "top2":
            group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
        else:
            group_scores = grouped.max(-1)
        order = np.sort(group_scores, axis=-1)
        drop = n_group - topk_group
        clear &= order[:, drop] - order[:, drop - 1] > 1e-5
        kept = group_scores >= order[:, [drop]]
        choice = np.where(np.repeat(kept, experts // n_group, axis=-1), choice, dropped)
    ranked = np.sort(choice, axis=-1)[:, ::-1]
    clear &= ranked[:, k - 1] - ranked[:, k] > 1e-5
    selected = np.argsort(-choice, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(scores, selected, -1)
    if norm and k > 1:
        weights = weights / weights.sum(-1, keepdims=True)
    return selected, weights * scale, clear


def attr(obj, path):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def raw_router(path):
    """Logits from a raw (E, H) weight array on the block."""

    def logits(block, x):
        return x @ vector(attr(block, path)).T

    return logits


def linear_router(path):
    """Logits from an nn.Linear / QuantizedLinear router (dequantised)."""

    def logits(block, x):
        return x @ dequantized(attr(block, path)).T

    return logits


def bias_at(path):
    def bias(block):
        return vector(attr(block, path))

    return bias


def reference(logits, bias, k, **options):
    def ref(block, x):
        return family_c(logits(block, x), k, bias=None if bias is None else bias(block), **options)

    return ref


def moe_gate_reference(cfg, experts_key="n_routed_experts"):
    """deepseek_v3-style MoEGate: raw weight + e_score_correction_bias, noaux_tc."""
    scale = cfg["routed_scaling_factor"]
    return reference(
        raw_router("gate.weight"),
        bias_at("gate.e_score_correction_bias"),
        cfg["num_experts_per_tok"],
        n_group=cfg["n_group"],
        topk_group=cfg["topk_group"],
        scale=1.0 if scale is None else scale,
        norm=cfg["norm_topk_prob"],
    )


def kimi_reference(cfg):
    return reference(
        linear_router("gate"),
        bias_at("e_score_correction_bias"),
        cfg["num_experts_per_token"],
        n_group=cfg["num_expert_group"],
        topk_group=cfg["topk_group"],
        scale=cfg["routed_scaling_factor"],
        norm=cfg["moe_renormalize"],
        score=cfg["moe_router_activation_func"],
    )


def bailing_reference(cfg, dropped=0.0):
    return reference(
        linear_router("gate.gate_proj"),
        bias_at("gate.expert_bias"),
        cfg["num_experts_per_tok"],
        n_group=cfg["n_group"],
        topk_group=cfg["topk_group"],
        scale=cfg["routed_scaling_factor"],
        norm=cfg.get("norm_topk_prob", True),
        score=cfg.get("score_function", "sigmoid"),
        dropped=dropped,
    )


def bailing_v3_reference(cfg):
    return reference(
        raw_router("gate.weight"),
        bias_at("gate.expert_bias"),
        cfg["num_experts_per_tok"],
        n_group=cfg["n_group"],
        topk_group=cfg["topk_group"],
        scale=cfg["routed_scaling_factor"],
        norm=True,
        dropped=-np.inf,
    )


def afmoe_reference(cfg):
    return reference(
        linear_router("router.gate"),
        bias_at("expert_bias"),
        cfg["num_experts_per_tok"],
        n_group=cfg["n_group"],
        topk_group=cfg["topk_group"],
        scale=cfg["route_scale"],
        norm=cfg["route_norm"],
        score=cfg["score_func"],
    )


def mistral4_reference(cfg):
    """Softmax over all experts, groups by top-2 sum (zeroed), renormalised even for k = 1."""
    k = cfg["num_experts_per_tok"]

    def ref(block, x):
        selected, weights, clear = family_c(
            x @ dequantized(block.gate).T,
            k,
            n_group=cfg["n_group"],
            topk_group=cfg["topk_group"],
            scale=1.0,
            norm=False,
            score="softmax",
        )
        if cfg["norm_topk_prob"]:
            weights = weights / weights.sum(-1, keepdims=True)
        return selected, weights * cfg["routed_scaling_factor"], clear

    return ref


def deepseek_v2_reference(cfg):
    grouped = cfg["topk_method"] == "group_limited_greedy"
    return reference(
        raw_router("gate.weight"),
        None,
        cfg["num_experts_per_tok"],
        n_group=cfg["n_group"] if grouped else 1,
        topk_group=cfg["topk_group"] if grouped else 1,
        scale=cfg["routed_scaling_factor"],
        norm=False,
        score="softmax",
        group_score="max",
    )


# ---------------------------------------------------------------------------------------------
# checks


def compare(observations, layers, inputs, ref_route, where):
    """Observed routing against the numpy reference on every clear token."""
    for layer, obs in zip(layers, observations):
        selected, weights, clear = ref_route(layer.block, inputs[layer.position])
        assert clear.mean() > 0.9, f"{where}: too many near-ties at layer {layer.index}"
        order = np.argsort(selected, axis=-1)
        selected = np.take_along_axis(selected, order, -1)[clear]
        weights = np.take_along_axis(weights, order, -1)[clear]
        np.testing.assert_array_equal(
            obs.selected[clear], selected, err_msg=f"{where}: layer {layer.index} selection"
        )
        np.testing.assert_allclose(
            obs.weights[clear],
            weights,
            atol=1e-5,
            rtol=1e-4,
            err_msg=f"{where}: layer {layer.index} weights",
        )


def check(config, model, ref_route, expected_adapter, tokens=TOKENS, direct_tokens=256):
    """The harness's checks for a full config (adapter lookup included), then every MoE block
    fed ``direct_tokens`` random inputs. Returns the adapter and its MoE layers."""
    adapter = plugins.adapter_for_config(config)
    assert adapter.name == expected_adapter

    # 1. hooks do not change the output
    plain = model(tokens)
    with Observer(model, adapter, ALL_NEEDS) as observer:
        hooked = model(tokens)
    mx.eval(plain, hooked)
    assert mx.array_equal(plain, hooked).item(), "hooked forward differs from the plain one"
    observations = observer.observations()

    # 2. routing equals the numpy reference; 3. statistics equal a brute-force loop
    layers, inputs = capture_block_inputs(model, adapter, tokens)
    assert len(layers) == len(observations) > 0
    compare(observations, layers, inputs, ref_route, "forward")
    check_statistics(model, adapter, layers, inputs, observations)
    check_runner(model, adapter, tokens, observations)

    # 4. many more tokens straight into each block (the observer also checks that the
    # adapter's selection is the block's on every one of them)
    hidden = inputs[0].shape[-1]
    x = mx.array(
        np.random.default_rng(2).normal(size=(1, direct_tokens, hidden)).astype(np.float32)
    )
    with Observer(model, adapter, {"selected", "weights", "outputs"}) as observer:
        outputs = [layer.block(x) for layer in observer.layers]
        mx.eval(outputs)
    observations = observer.observations()
    direct = {layer.position: np.array(x[0], dtype=np.float64) for layer in layers}
    compare(observations, layers, direct, ref_route, "direct")

    # 5. the reported weights are the ones the block multiplies: its output is the weighted sum
    # of the observed expert outputs plus the shared experts (non-latent blocks)
    for layer, obs, out in zip(layers, observations, outputs):
        if adapter.expert_input_attr and hasattr(layer.block, adapter.expert_input_attr):
            continue
        expected = np.einsum("tk,tkh->th", obs.weights, obs.outputs)
        shared = getattr(layer.block, "shared_experts", None)
        if shared is not None and shared_used(layer.block):
            expected = expected + np.array(shared(x)[0])
        np.testing.assert_allclose(
            np.array(out[0]), expected, atol=1e-4, rtol=1e-4, err_msg=f"layer {layer.index} sum"
        )
    return adapter, layers


def shared_used(block):
    """Whether the block adds its shared experts (dots1 builds them but may not add them)."""
    n_shared = getattr(block, "n_shared_experts", 1)
    return n_shared is not None


def build(model_type, cfg, bits, bias_scale=1.0):
    """build_tiny; ``bias_scale`` shrinks the re-drawn correction biases (softmax scores are
    ~1/8 here, so a bias of the sigmoid routers' size would decide every selection alone)."""
    model = build_tiny(model_type, cfg, bits=bits)
    if bias_scale != 1.0:
        for _, module in model.named_modules():
            for name in ("e_score_correction_bias", "expert_bias"):
                if isinstance(getattr(module, name, None), mx.array):
                    setattr(module, name, getattr(module, name) * bias_scale)
    return model


# ---------------------------------------------------------------------------------------------
# deepseek_v3-style MoEGate (raw weight + e_score_correction_bias, compiled group_expert_select)

MOE_GATE_CASES = [
    ("deepseek_v3", DEEPSEEK_V3, "deepseek_v3"),
    ("deepseek_v32", DEEPSEEK_V32, "deepseek_v32"),
    ("glm_moe_dsa", GLM_MOE_DSA, "deepseek_v32"),
    ("glm4_moe", GLM4_MOE, "glm4_moe"),
    ("solar_open", SOLAR_OPEN, "glm4_moe"),
    ("glm4_moe_lite", GLM4_MOE_LITE, "glm4_moe_lite"),
    ("dots1", DOTS1, "dots1"),
    ("mimo_v2_flash", MIMO_V2_FLASH, "mimo_v2_flash"),
    ("nemotron_h", NEMOTRON_H, "nemotron_h"),
]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("model_type,cfg,name", MOE_GATE_CASES, ids=[c[0] for c in MOE_GATE_CASES])
def test_moe_gate_architectures(model_type, cfg, name, bits):
    model = build(model_type, cfg, bits)
    _, layers = check({"model_type": model_type, **cfg}, model, moe_gate_reference(cfg), name)
    assert len(layers) == 2


@pytest.mark.parametrize("bits", BITS)
def test_exaone_moe(bits):
    model = build("exaone_moe", EXAONE_MOE, bits)
    cfg = dict(EXAONE_MOE, routed_scaling_factor=2.5, norm_topk_prob=True)  # ModelArgs defaults
    _, layers = check(
        {"model_type": "exaone_moe", **EXAONE_MOE}, model, moe_gate_reference(cfg), "exaone_moe"
    )
    assert [layer.index for layer in layers] == [1, 2]


@pytest.mark.parametrize("model_type", ["kimi_vl", "kimi_k25"])
def test_kimi_vision_wrappers(model_type):
    cfg = KIMI_VL if model_type == "kimi_vl" else KIMI_K25
    model = build(model_type, cfg, None)
    _, layers = check(
        {"model_type": model_type, **cfg}, model, moe_gate_reference(cfg["text_config"]), "kimi_vl"
    )
    assert layers[0].path == "language_model.model.layers.1.mlp"


@pytest.mark.parametrize("alias", ["kimi_k2", "joyai_llm_flash"])
def test_deepseek_v3_aliases(alias):
    model = build("deepseek_v3", DEEPSEEK_V3, None)
    check(
        {"model_type": alias, **DEEPSEEK_V3}, model, moe_gate_reference(DEEPSEEK_V3), "deepseek_v3"
    )


def test_nemotron_h_moe_layers_follow_the_pattern():
    adapter = plugins.adapter_for_config({"model_type": "nemotron_h"})
    layers = adapter.moe_layers(
        build("nemotron_h", dict(NEMOTRON_H, hybrid_override_pattern=list("E-M*E")), None)
    )
    assert [(layer.index, layer.path) for layer in layers] == [
        (0, "backbone.layers.0.mixer"),
        (4, "backbone.layers.4.mixer"),
    ]


@pytest.mark.parametrize("bits", BITS)
def test_nemotron_h_latent(bits):
    """Latent MoE: the experts run on fc1_latent_proj(x); outputs and norms are latent."""
    model = build("nemotron_h", NEMOTRON_H_LATENT, bits)
    adapter, layers = check(
        {"model_type": "nemotron_h", **NEMOTRON_H_LATENT},
        model,
        moe_gate_reference(NEMOTRON_H_LATENT),
        "nemotron_h",
    )
    x = mx.zeros((3, 64))
    assert adapter.all_expert_outputs(layers[0], x).shape == (3, 8, 32)


# ---------------------------------------------------------------------------------------------
# kimi_linear / kimi_k3: Linear gate, correction bias on the block


@pytest.mark.parametrize("bits", BITS)
def test_kimi_linear(bits):
    model = build("kimi_linear", KIMI_LINEAR, bits)
    check(
        {"model_type": "kimi_linear", **KIMI_LINEAR},
        model,
        kimi_reference(KIMI_LINEAR),
        "kimi_linear",
    )


def test_kimi_linear_softmax_router():
    cfg = dict(KIMI_LINEAR, moe_router_activation_func="softmax")
    check(
        {"model_type": "kimi_linear", **cfg},
        build("kimi_linear", cfg, None, bias_scale=0.1),
        kimi_reference(cfg),
        "kimi_linear",
    )


@pytest.mark.parametrize("bits", BITS)
def test_kimi_k3(bits):
    model = build("kimi_k3", KIMI_K3, bits)
    check({"model_type": "kimi_k3", **KIMI_K3}, model, kimi_reference(KIMI_K3_TEXT), "kimi_k3")


def test_kimi_k3_latent():
    """Latent experts on routed_expert_down_proj(x), RMS-normed and up-projected after the sum."""
    model = build("kimi_k3", KIMI_K3_LATENT, None)
    cfg = KIMI_K3_LATENT["text_config"]
    adapter, layers = check(
        {"model_type": "kimi_k3", **KIMI_K3_LATENT}, model, kimi_reference(cfg), "kimi_k3"
    )
    assert adapter.all_expert_outputs(layers[0], mx.zeros((3, 64))).shape == (3, 8, 32)


# ---------------------------------------------------------------------------------------------
# bailing family


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("model_type", ["bailing_moe", "bailing_moe_linear"])
def test_bailing_moe(model_type, bits):
    cfg = BAILING_MOE if model_type == "bailing_moe" else BAILING_MOE_LINEAR
    check(
        {"model_type": model_type, **cfg},
        build(model_type, cfg, bits),
        bailing_reference(cfg),
        "bailing_moe",
    )


def test_bailing_moe_softmax_router():
    cfg = dict(BAILING_MOE, score_function="softmax")
    check(
        {"model_type": "bailing_moe", **cfg},
        build("bailing_moe", cfg, None, bias_scale=0.1),
        bailing_reference(cfg),
        "bailing_moe",
    )


@pytest.mark.parametrize("bits", BITS)
def test_bailing_hybrid(bits):
    model = build("bailing_hybrid", BAILING_HYBRID, bits)
    ref = bailing_reference(BAILING_HYBRID, dropped=-np.inf)
    check({"model_type": "bailing_hybrid", **BAILING_HYBRID}, model, ref, "bailing_hybrid")


@pytest.mark.parametrize("bits", BITS)
def test_bailing_moe_v3(bits):
    """Config model_type 'bailing_hybrid' + BailingMoeV3ForCausalLM loads bailing_moe_v3."""
    model = build("bailing_moe_v3", BAILING_MOE_V3, bits)
    config = {
        "model_type": "bailing_hybrid",
        "architectures": ["BailingMoeV3ForCausalLM"],
        **BAILING_MOE_V3,
    }
    check(config, model, bailing_v3_reference(BAILING_MOE_V3), "bailing_moe_v3")


def test_dropped_groups_are_minus_infinity_in_bailing_hybrid():
    """A kept expert whose biased score is negative still beats the dropped groups' experts in
    bailing_hybrid (-inf), where the zeroing blocks would pick a dropped expert instead."""
    model = build("bailing_hybrid", BAILING_HYBRID, None)
    adapter = plugins.adapter_for_config({"model_type": "bailing_hybrid"})
    block = adapter.moe_layers(model)[0].block
    # Group 0 (experts 0 and 1) always wins and expert 1 always beats the other kept group,
    # but expert 1's biased score sigmoid(z) - 0.5 is negative whenever its logit is.
    block.gate.expert_bias = mx.array([2.0, -0.5, -1.5, -1.5, -1.5, -1.5, -1.5, -1.5])
    x = mx.array(np.random.default_rng(3).normal(size=(1, 64, 64)).astype(np.float32))
    with Observer(model, adapter, {"selected", "weights"}) as observer:
        for layer in observer.layers:
            mx.eval(layer.block(x))
    assert (observer.observations()[0].selected == [0, 1]).all()
    logits = np.array(x[0], dtype=np.float64) @ dequantized(block.gate.gate_proj).T
    assert (logits[:, 1] < 0).sum() > 5


# ---------------------------------------------------------------------------------------------
# afmoe, mistral4 (+ mistral3), deepseek_v2


@pytest.mark.parametrize("bits", BITS)
def test_afmoe(bits):
    check(
        {"model_type": "afmoe", **AFMOE},
        build("afmoe", AFMOE, bits),
        afmoe_reference(AFMOE),
        "afmoe",
    )


def test_afmoe_softmax_router():
    cfg = dict(AFMOE, score_func="softmax")
    check(
        {"model_type": "afmoe", **cfg},
        build("afmoe", cfg, None, bias_scale=0.1),
        afmoe_reference(cfg),
        "afmoe",
    )


@pytest.mark.parametrize("bits", BITS)
def test_mistral4(bits):
    check(
        {"model_type": "mistral4", **MISTRAL4},
        build("mistral4", MISTRAL4, bits),
        mistral4_reference(MISTRAL4),
        "mistral4",
    )


def test_mistral3_wrapping_mistral4():
    model = build("mistral3", MISTRAL3, None)
    _, layers = check(
        {"model_type": "mistral3", **MISTRAL3}, model, mistral4_reference(MISTRAL4), "mistral4"
    )
    assert layers[0].path == "language_model.model.layers.1.mlp"


@pytest.mark.parametrize("bits", BITS)
def test_deepseek_v2(bits):
    model = build("deepseek_v2", DEEPSEEK_V2, bits)
    check(
        {"model_type": "deepseek_v2", **DEEPSEEK_V2},
        model,
        deepseek_v2_reference(DEEPSEEK_V2),
        "deepseek_v2",
    )


def test_deepseek_v2_greedy():
    cfg = dict(DEEPSEEK_V2, topk_method="greedy")
    model = build("deepseek_v2", cfg, None)
    check({"model_type": "deepseek_v2", **cfg}, model, deepseek_v2_reference(cfg), "deepseek_v2")


# ---------------------------------------------------------------------------------------------
# bfloat16 with 4-bit experts (how these models run): the dtype casts inside the routers

BF16_CASES = [
    *MOE_GATE_CASES,
    ("nemotron_h", NEMOTRON_H_LATENT, "nemotron_h"),
    ("exaone_moe", EXAONE_MOE, "exaone_moe"),
    ("kimi_vl", KIMI_VL, "kimi_vl"),
    ("kimi_linear", KIMI_LINEAR, "kimi_linear"),
    ("kimi_k3", KIMI_K3_LATENT, "kimi_k3"),
    ("bailing_moe", BAILING_MOE, "bailing_moe"),
    ("bailing_moe_linear", BAILING_MOE_LINEAR, "bailing_moe"),
    ("bailing_hybrid", BAILING_HYBRID, "bailing_hybrid"),
    ("bailing_moe_v3", BAILING_MOE_V3, "bailing_moe_v3"),
    ("afmoe", AFMOE, "afmoe"),
    ("mistral4", MISTRAL4, "mistral4"),
    ("deepseek_v2", DEEPSEEK_V2, "deepseek_v2"),
]


@pytest.mark.parametrize(
    "model_type,cfg,name", BF16_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(BF16_CASES)]
)
def test_bfloat16_selection_is_the_blocks(model_type, cfg, name):
    """bf16 activations and routers (correction biases stay float32, as mlx-lm's
    cast_predicate keeps them): on 512 tokens per block the adapter selects what the block
    selected (the observer raises otherwise) and its weights are finite and scaled."""
    model = build(model_type, cfg, 4)
    keep = getattr(model, "cast_predicate", lambda path: True)

    def cast(path, value):
        if value.dtype == mx.float32 and keep(path):
            return value.astype(mx.bfloat16)
        return value

    model.update(tree_map_with_path(cast, model.parameters()))
    adapter = plugins.adapter_for_config({"model_type": model_type, **cfg})
    assert adapter.name == name
    x = mx.array(np.random.default_rng(4).normal(size=(1, 512, 64))).astype(mx.bfloat16)
    with Observer(model, adapter, {"selected", "weights"}) as observer:
        for layer in observer.layers:
            mx.eval(layer.block(x))
    for obs in observer.observations():
        assert obs.selected.shape == (512, 2)
        assert np.isfinite(obs.weights).all() and (obs.weights > 0).all()


# ---------------------------------------------------------------------------------------------
# declarations


def test_config_matching():
    def name(config):
        return plugins.adapter_for_config(config).name

    assert name({"model_type": "bailing_hybrid"}) == "bailing_hybrid"
    assert (
        name({"model_type": "bailing_hybrid", "architectures": ["BailingMoeV3ForCausalLM"]})
        == "bailing_moe_v3"
    )
    assert (
        name({"model_type": "bailing_hybrid", "architectures": ["BailingMoeV2_5ForCausalLM"]})
        == "bailing_hybrid"
    )
    assert name({"model_type": "mistral3", "text_config": {"model_type": "mistral4"}}) == "mistral4"
    for alias in ("kimi_k2", "joyai_llm_flash"):
        assert name({"model_type": alias}) == "deepseek_v3"
    with pytest.raises(MlxfunError, match="is not supported: only mistral3"):
        plugins.adapter_for_config(
            {"model_type": "mistral3", "text_config": {"model_type": "ministral3"}}
        )


FAMILY_C_TYPES = {
    "deepseek_v2",
    "deepseek_v3",
    "kimi_k2",
    "joyai_llm_flash",
    "deepseek_v32",
    "glm_moe_dsa",
    "glm4_moe",
    "glm4_moe_lite",
    "kimi_vl",
    "kimi_k25",
    "kimi_linear",
    "kimi_k3",
    "dots1",
    "exaone_moe",
    "mimo_v2_flash",
    "nemotron_h",
    "bailing_moe",
    "bailing_moe_linear",
    "bailing_hybrid",
    "bailing_moe_v3",
    "afmoe",
    "mistral4",
    "mistral3",
    "llava",
    "solar_open",
}


def test_declarations():
    from mlxfun.adapters import biased_family

    covered = {t for adapter in biased_family.ADAPTERS for t in adapter.model_types}
    assert covered == FAMILY_C_TYPES
    for adapter in biased_family.ADAPTERS:
        assert adapter.router_family.startswith("C:") and adapter.description, adapter.name
        assert "shared_experts" in adapter.shared_attrs, adapter.name
        assert "divisible by" in adapter.notes, adapter.name
        assert adapter.num_experts_keys, adapter.name


def test_every_config_key_that_counts_experts_is_declared():
    """The declared num_experts_keys are the config keys mlx-lm reads the expert count from."""
    cases = [
        ("deepseek_v3", DEEPSEEK_V3),
        ("exaone_moe", EXAONE_MOE),
        ("kimi_vl", KIMI_VL),
        ("kimi_linear", KIMI_LINEAR),
        ("kimi_k3", KIMI_K3),
        ("bailing_moe", BAILING_MOE),
        ("afmoe", AFMOE),
        ("mistral3", MISTRAL3),
        ("deepseek_v2", DEEPSEEK_V2),
    ]
    for model_type, cfg in cases:
        config = {"model_type": model_type, **cfg}
        adapter = plugins.adapter_for_config(config)
        present = []
        for key in adapter.num_experts_keys:
            node = config
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                present.append(node)
        assert present == [8], (model_type, adapter.num_experts_keys)
