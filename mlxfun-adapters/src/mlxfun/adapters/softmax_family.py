"""Adapters for routers that pick by softmax or raw logits (router families A and B)."""

from mlxfun.core.adapter import MoEAdapter

from .routing import softmax_topk, topk_softmax

ADAPTERS = [
    MoEAdapter(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        description="Qwen3-MoE: softmax over all experts, top-k, optional renormalisation",
        router_family="B: softmax-all, top-k, renorm",
        route=softmax_topk(),
        num_experts_keys=("num_experts",),
    ),
    MoEAdapter(
        name="mixtral",
        model_types=("mixtral",),
        description="Mixtral: top-k of router logits, softmax over the k",
        router_family="A: top-k logits, softmax over k",
        route=topk_softmax(),
        num_experts_keys=("num_local_experts",),
    ),
]
