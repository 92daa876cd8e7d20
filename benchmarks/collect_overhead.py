"""Tokens/s of a plain mlx-lm forward vs ``collect`` on the same tokens, measured in one run.

    python benchmarks/collect_overhead.py [--repeats 3] [--layers 8] [--experts 32]

Model: a seeded mid-size qwen3_moe (hidden 512, 8 layers, 32 experts top-4), batch 4 x 256.
Plain and observed passes alternate so machine noise hits both alike; the ratio is
median(collect time) / median(plain time). Target: <= 1.10. On Linux, preload OpenBLAS for
realistic speed (see benchmarks/README.md); the ratio is what matters.
"""

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np
from mlx_lm.models import qwen3_moe
from mlxfun.core import plugins
from mlxfun.core.collect import collect_stats
from mlxfun.core.observe import Observer
from mlxfun.core.stats import StatsCollector


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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    opts = parser.parse_args()

    model = build(opts.layers, opts.experts, opts.hidden)
    adapter = plugins.adapter_for_config({"model_type": "qwen3_moe"})
    scorers = [plugins.get_scorer(n) for n in plugins.plugin_names("scorer")]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 8192, (opts.batch, opts.seq))
    sequences = [list(row) for row in tokens]
    n_tokens = tokens.size

    def plain():
        mx.eval(model(mx.array(tokens)))

    def observed():
        collect_stats(model, adapter, sequences, scorers, batch_size=opts.batch, progress=False)

    layers = adapter.moe_layers(model)

    def hooked_full():
        # The same observation, but the logits are evaluated too: the pure cost of the hooks.
        collector = StatsCollector(scorers, len(layers), opts.experts)
        with Observer(model, adapter, collector.needs) as observer:
            mx.eval(model(mx.array(tokens)))
            collector.update(observer.observations())

    plain()  # warm up kernels and caches
    observed()
    hooked_full()
    plain_times, collect_times, full_times = [], [], []
    for _ in range(opts.repeats):
        for fn, times in (
            (plain, plain_times),
            (observed, collect_times),
            (hooked_full, full_times),
        ):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    p, c = statistics.median(plain_times), statistics.median(collect_times)
    f = statistics.median(full_times)
    print(
        f"model: qwen3_moe hidden {opts.hidden}, {opts.layers} layers, {opts.experts} experts top-4; batch {opts.batch}x{opts.seq}"
    )
    print(f"scorers: {', '.join(s.name for s in scorers)}")
    print(f"plain forward : {n_tokens / p:9.1f} tokens/s (median of {opts.repeats})")
    print(f"mlxfun collect: {n_tokens / c:9.1f} tokens/s (median of {opts.repeats})")
    print(f"hooked forward with logits: {n_tokens / f:9.1f} tokens/s (median of {opts.repeats})")
    print(
        f"ratio collect/plain time: {c / p:.3f} (target <= 1.10; collect skips the unused LM head)"
    )
    print(f"ratio hooked-with-logits/plain time: {f / p:.3f} (the hooks' own overhead)")


if __name__ == "__main__":
    main()
