"""Reference checks for the first two adapters; the pattern every architecture test follows."""

import numpy as np
import pytest

from .harness import build_tiny, check_architecture, dequantized

QWEN3_MOE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=8,
    num_experts_per_tok=2,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    moe_intermediate_size=32,
    rms_norm_eps=1e-6,
    vocab_size=256,
    rope_theta=10000.0,
    head_dim=16,
    tie_word_embeddings=False,
    max_position_embeddings=512,
    norm_topk_prob=True,
)

MIXTRAL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    rms_norm_eps=1e-6,
    vocab_size=256,
    rope_theta=10000.0,
)


def softmax(z):
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def qwen3_reference(block, x):
    probs = softmax(x @ dequantized(block.gate).T)
    selected = np.argsort(-probs, axis=-1, kind="stable")[:, : block.top_k]
    weights = np.take_along_axis(probs, selected, -1)
    if block.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return selected, weights


def mixtral_reference(block, x):
    logits = x @ dequantized(block.gate).T
    selected = np.argsort(-logits, axis=-1, kind="stable")[:, : block.num_experts_per_tok]
    return selected, softmax(np.take_along_axis(logits, selected, -1))


@pytest.mark.parametrize("bits", [None, 4])
def test_qwen3_moe(bits):
    check_architecture("qwen3_moe", build_tiny("qwen3_moe", QWEN3_MOE, bits=bits), qwen3_reference)


@pytest.mark.parametrize("bits", [None, 4])
def test_mixtral(bits):
    check_architecture("mixtral", build_tiny("mixtral", MIXTRAL, bits=bits), mixtral_reference)


def test_strided_moe_layers_are_found():
    args = dict(QWEN3_MOE, num_hidden_layers=4, decoder_sparse_step=2)
    model = build_tiny("qwen3_moe", args)
    _, layers, _ = check_architecture("qwen3_moe", model, qwen3_reference)
    assert [layer.index for layer in layers] == [1, 3]
