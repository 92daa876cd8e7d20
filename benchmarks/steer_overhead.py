"""Generation tokens/s with and without steering, measured in one run.

    python benchmarks/steer_overhead.py [--model demo/model] [--tokens 64] [--repeats 5]

Greedy generation (``mlx_lm.stream_generate``) of up to ``--tokens`` tokens from a fixed
prompt, alternately plain and inside ``steering(model, spec)`` (so machine noise hits both
alike), on the demo model (qwen3_moe: the bias is a call hook on every router Linear); time per
generated token. Two specs: ``neutral`` (a 0.0 bias on every MoE layer: every hook runs, the
routing and the answer stay the same: the mechanism's own cost, the target's measure) and
``mask+force`` (2 experts masked and 1 forced per layer: other experts compute, so its time also
shows what that costs). Prints the medians and steered/plain time (target <= 1.05), and checks
that generation after steering is bit-identical to the first plain run.
"""

import argparse
import statistics
import time
from pathlib import Path

from mlx_lm.generate import stream_generate
from mlxfun.core.models import load_model
from mlxfun.methods.steer import adapter_of, steering

DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo" / "model"
PROMPT = "def fibonacci(n):\n    "
# Same routing, every hook in place: the mechanism's own cost (the answer must not change).
NEUTRAL = {"rules": [{"layer": "all", "experts": [0], "mode": "bias", "bias": 0.0}]}
# A real steering: other experts run, so the time also reflects which experts compute.
MASK_FORCE = {
    "rules": [
        {"layer": "all", "experts": [0, 1], "mode": "mask"},
        {"layer": "all", "experts": [2], "mode": "force"},
    ]
}


def generate_timed(model, tokenizer, tokens: int) -> tuple[float, str]:
    """Seconds per generated token (the end-of-text token may stop a run early) and the text."""
    pieces = []
    start = time.perf_counter()
    for response in stream_generate(model, tokenizer, PROMPT, max_tokens=tokens):
        pieces.append(response.text)
    return (time.perf_counter() - start) / len(pieces), "".join(pieces)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, tokenizer, config = load_model(args.model)
    adapter = adapter_of(model, config)
    generate_timed(model, tokenizer, 8)  # warm-up
    _, reference = generate_timed(model, tokenizer, args.tokens)
    print(f"model {args.model}, {args.tokens} tokens, {args.repeats} repeats (medians)")
    for name, spec in (("neutral", NEUTRAL), ("mask+force", MASK_FORCE)):
        plain, steered, ratios = [], [], []
        for i in range(args.repeats):
            pair = {}
            # ABBA order, so that a drift in machine load hits both alike
            for steer in (False, True) if i % 2 == 0 else (True, False):
                if steer:
                    with steering(model, spec, adapter, config):
                        pair[steer], steered_text = generate_timed(model, tokenizer, args.tokens)
                else:
                    pair[steer], text = generate_timed(model, tokenizer, args.tokens)
                    assert text == reference, "plain generation changed between runs"
            plain.append(pair[False])
            steered.append(pair[True])
            ratios.append(pair[True] / pair[False])
        p, s = statistics.median(plain), statistics.median(steered)
        print(
            f"{name:<11} plain {1 / p:7.1f} tokens/s, steered {1 / s:7.1f} tokens/s, "
            f"steered/plain time (median of paired ratios) {statistics.median(ratios):.3f} "
            f"(target <= 1.05); answer changed: {steered_text != reference}"
        )
    _, after = generate_timed(model, tokenizer, args.tokens)
    print(f"after steering, generation bit-identical to before: {after == reference}")


if __name__ == "__main__":
    main()
