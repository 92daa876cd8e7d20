"""Which part of a chat MoE's MoE blocks its refusals need (the "Expert scans" section of
benchmarks/RESULTS.md): the refusal rate on held-out harmful and harmless prompts with the routed
experts' output scaled (x0.5, removed) or the shared expert removed, in every MoE block.

    python benchmarks/chat_moe_parts.py [--model demo/chat-model] [--prompts 30] [--answer-tokens 12]

For MoE blocks built like glm4_moe / deepseek_v3 (``gate``, ``switch_mlp``, ``shared_experts``);
the routing itself is never changed, only what the block adds to the residual stream.
"""

import argparse
import sys
from pathlib import Path

from mlxfun.core.hooks import call_hooks
from mlxfun.core.models import load_model
from mlxfun.methods.refusal import refusal_rate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scans import DEMO_DATA, ROOT, _records  # noqa: E402

VARIANTS = [
    ("as trained (routed + shared expert)", 1.0, 1.0),
    ("routed experts x0.5", 0.5, 1.0),
    ("routed experts removed, shared expert kept", 0.0, 1.0),
    ("shared expert removed, routed experts kept", 1.0, 0.0),
    ("both removed", 0.0, 0.0),
]


def scaled_block(routed: float, shared: float):
    """A call hook computing the block as mlx-lm does, with each part's output scaled."""

    def wrapper(block, call, x):
        inds, scores = block.gate(x)
        y = (block.switch_mlp(x, inds) * scores[..., None]).sum(axis=-2)
        return (routed * y + shared * block.shared_experts(x)).astype(x.dtype)

    return wrapper


def moe_blocks(model) -> list:
    blocks = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "switch_mlp")]
    if not blocks or not all(hasattr(b, "shared_experts") and hasattr(b, "gate") for b in blocks):
        raise SystemExit(
            "this model's MoE blocks have no shared expert (glm4_moe / deepseek_v3 style)"
        )
    return blocks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "demo" / "chat-model")
    parser.add_argument("--data", type=Path, default=DEMO_DATA)
    parser.add_argument("--prompts", type=int, default=30, help="held-out prompts per set")
    parser.add_argument("--answer-tokens", type=int, default=12)
    args = parser.parse_args()
    model, tokenizer, _ = load_model(args.model)
    blocks = moe_blocks(model)
    sets = {
        name: [
            next(m["content"] for m in s.messages if m["role"] == "user")
            for s in _records(args.data / f"{name}_eval.jsonl", args.prompts)
        ]
        for name in ("harmful", "harmless")
    }
    print("| MoE output | harmful refused | harmless refused |\n|---|---:|---:|")
    for label, routed, shared in VARIANTS:
        with call_hooks([(block, scaled_block(routed, shared)) for block in blocks]):
            rates = [
                refusal_rate(model, tokenizer, prompts, max_tokens=args.answer_tokens).rate
                for prompts in sets.values()
            ]
        print(f"| {label} | {rates[0]:.3f} | {rates[1]:.3f} |")


if __name__ == "__main__":
    main()
