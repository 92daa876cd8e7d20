"""Tokens/s of a plain mlx-lm forward vs ``collect`` on the same tokens, measured in one run.

    python benchmarks/collect_overhead.py [--model demo/model] [--repeats 3] [--batch 4] [--seq 256]
    python benchmarks/collect_overhead.py --synthetic [--layers 8] [--experts 32] [--hidden 512]

Model: the demo model (``demo/model``, qwen3_moe hidden 256, 4 layers, 16 experts top-2, vocab
4096, tied embeddings), or with ``--synthetic`` a seeded mid-size qwen3_moe (hidden 512, 8
layers, 32 experts top-4). Seeded random tokens, batch 4 x 256. Plain and observed passes
alternate so machine noise hits both alike; the ratio is median(collect time) / median(plain
time). ``collect`` runs on the layer runner: decoder layers up to the last MoE layer, no LM head,
no KV cache. Target on the demo model: <= 0.9. On Linux, preload OpenBLAS for realistic speed
(see benchmarks/README.md); the ratio is what matters.
"""

import argparse
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models import qwen3_moe
from mlxfun.core import plugins
from mlxfun.core.collect import collect_stats
from mlxfun.core.models import load_model
from mlxfun.core.observe import Observer
from mlxfun.core.stats import StatsCollector

DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo" / "model"


def build(layers: int, experts: int, hidden: int):
    args = qwen3_moe.ModelArgs(
        model_type="qwen3_moe",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=hidden * 2,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_experts=experts,
        num_experts_per_tok=4,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=hidden // 2,
        rms_norm_eps=1e-6,
        vocab_size=8192,
        rope_theta=10000.0,
        head_dim=hidden // 8,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        norm_topk_prob=True,
    )
    mx.random.seed(0)
    model = qwen3_moe.Model(args)
    mx.eval(model.parameters())
    return model


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--synthetic", action="store_true", help="the seeded mid-size model")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    opts = parser.parse_args()

    if opts.synthetic:
        model, vocab = build(opts.layers, opts.experts, opts.hidden), 8192
        label = f"synthetic qwen3_moe hidden {opts.hidden}, {opts.layers} layers, {opts.experts} experts top-4"
    else:
        model, _, config = load_model(opts.model)
        vocab = config["vocab_size"]
        label = (
            f"{opts.model}: {config['model_type']} hidden {config['hidden_size']}, "
            f"{config['num_hidden_layers']} layers, {config['num_experts']} experts "
            f"top-{config['num_experts_per_tok']}, vocab {vocab}"
        )
    adapter = plugins.adapter_for_config({"model_type": "qwen3_moe"})
    scorers = [plugins.get_scorer(n) for n in plugins.plugin_names("scorer")]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (opts.batch, opts.seq))
    sequences = [list(row) for row in tokens]
    n_tokens = tokens.size

    def plain():
        mx.eval(model(mx.array(tokens)))

    def observed():
        collect_stats(model, adapter, sequences, scorers, batch_size=opts.batch, progress=False)

    layers = adapter.moe_layers(model)

    def hooked_full():
        # The same observation, but the logits are evaluated too: the pure cost of the hooks.
        collector = StatsCollector(scorers, len(layers), layers[0].num_experts)
        with Observer(model, adapter, collector.needs) as observer:
            mx.eval(model(mx.array(tokens)))
            collector.update(observer.observations())

    hidden = model.model(mx.array(tokens))
    mx.eval(hidden)
    head = model.lm_head if hasattr(model, "lm_head") else model.model.embed_tokens.as_linear

    def head_only():
        # What collect skips: the LM head on the final hidden states.
        mx.eval(head(hidden))

    runs = {"plain": plain, "collect": observed, "hooked": hooked_full, "head": head_only}
    for fn in runs.values():  # warm up kernels and caches
        fn()
    times = {name: [] for name in runs}
    order = list(runs)
    for round_ in range(opts.repeats):
        # Rotate the order each round so that load drifts and caches hit every variant alike.
        shift = round_ % len(order)
        for name in order[shift:] + order[:shift]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}

    def paired(name):
        ratios = sorted(a / b for a, b in zip(times[name], times["plain"]))
        return statistics.median(ratios), ratios[0], ratios[-1]

    print(f"model: {label}; batch {opts.batch}x{opts.seq}; {opts.repeats} rounds")
    print(f"scorers: {', '.join(s.name for s in scorers)}")
    for name, what in (
        ("plain", "plain forward"),
        ("collect", "mlxfun collect"),
        ("hooked", "hooked forward with logits"),
    ):
        print(f"{what:27s}: {n_tokens / med[name]:9.1f} tokens/s")
    c, c_lo, c_hi = paired("collect")
    f, f_lo, f_hi = paired("hooked")
    h, h_lo, h_hi = paired("head")
    print(
        f"ratio collect/plain time: {c:.3f} (range {c_lo:.3f}-{c_hi:.3f} over rounds; target "
        "<= 0.9 on the demo model: collect runs no LM head, no layer after the last MoE layer, "
        "no KV cache)"
    )
    print(
        f"ratio hooked-with-logits/plain time: {f:.3f} (range {f_lo:.3f}-{f_hi:.3f}; the hooks' own cost)"
    )
    print(
        f"LM head alone / plain time: {h:.3f} (range {h_lo:.3f}-{h_hi:.3f}); so the best collect "
        f"can do, skipping only the head, is about {1 - h:.3f}"
    )


if __name__ == "__main__":
    main()
