"""Neuron-level pruning on the bundled demo MoE (the "Neuron pruning" section of RESULTS.md).

1. `mlxfun sparsify` with every built-in neuron scorer at 50% unstructured and 2:4, on the
   experts only (the demo has no dense MLP) and with the attention projections too: perplexity
   on the held-out code and prose sets.
2. Structured: `mlxfun prune-neurons` (25% and 50% of every expert's neurons) against REAP
   expert pruning (`mlxfun collect` + `mlxfun prune --n 4 / 8`, the same expert bytes).
3. Memory (`--memory`): peak RSS of a plain forward over the calibration batches against the
   statistics collection (one decoder layer's inputs held at a time), each in a fresh process.

    python benchmarks/sparsify.py [--samples 32] [--tokens 128] [--methods wanda,...] [--memory]

Calibration: demo/data/calib_mixed.jsonl (seeded subsample); evaluation: eval_code.jsonl and
eval_prose.jsonl (the first --samples samples of each, --tokens tokens each).
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from mlxfun.core.datasets import load_samples, tokenize_samples
from mlxfun.core.models import load_model
from mlxfun.methods.evaluate import _nll
from mlxfun.methods.prune_neurons import PruneNeuronsRequest, prune_neurons
from mlxfun.methods.sparsify import SparsifyRequest, sparsify

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "demo" / "model"
DATA = ROOT / "demo" / "data"
CALIB = DATA / "calib_mixed.jsonl"
METHODS = [
    "magnitude",
    "wanda",
    "wanda_idf",
    "wanda_spiky",
    "wanda_select",
    "neuronrank_tfidf",
    "neuronrank_tfidf:topic",
    "neuronrank_fisher",
]


def eval_sequences(tokenizer, samples: int, tokens: int) -> dict:
    return {
        domain: [
            s
            for s in tokenize_samples(
                load_samples([DATA / f"eval_{domain}.jsonl"])[:samples], tokenizer, tokens
            )
            if len(s) >= 2
        ]
        for domain in ("code", "prose")
    }


def perplexities(model_dir, sequences) -> dict:
    model, _, _ = load_model(model_dir)
    result = {}
    for domain, seqs in sequences.items():
        nll, _ = _nll(model, seqs, 8)
        result[domain] = float(np.exp(np.concatenate(nll).mean()))
    return result


def common(args) -> dict:
    return dict(
        model=MODEL,
        dataset=[CALIB],
        max_samples=args.samples,
        max_tokens=args.tokens,
        batch_size=8,
        seed=0,
    )


def quality(args, work: Path) -> None:
    _, tokenizer, _ = load_model(MODEL)
    sequences = eval_sequences(tokenizer, args.samples, args.tokens)
    dense = perplexities(MODEL, sequences)
    print(f"dense: code {dense['code']:.1f}, prose {dense['prose']:.1f}\n")
    print("| pattern | scope | method | code ppl | prose ppl | seconds |")
    print("|---|---|---|---:|---:|---:|")
    for pattern in ("unstructured", "2:4"):
        for attention in (False, True):
            scope = "experts + attention" if attention else "experts"
            for spec in args.methods.split(","):
                method, _, mode = spec.partition(":")
                out = work / f"{method}-{mode}-{pattern.replace(':', 'of')}-{attention}"
                start = time.perf_counter()
                sparsify(
                    SparsifyRequest(
                        **common(args),
                        output=out,
                        method=method,
                        tfidf_mode=mode or "doc",
                        sparsity=0.5,
                        pattern=pattern,
                        attention=attention,
                    )
                )
                seconds = time.perf_counter() - start
                ppl = perplexities(out, sequences)
                print(
                    f"| {pattern} | {scope} | {spec} | {ppl['code']:.1f} | "
                    f"{ppl['prose']:.1f} | {seconds:.1f} |",
                    flush=True,
                )
    print()
    if not args.no_structured:
        structured(args, work, sequences)


def structured(args, work: Path, sequences) -> None:
    stats = work / "stats.npz"
    mlxfun = [sys.executable, "-m", "mlxfun.cli"]
    subprocess.run(
        mlxfun
        + ["collect", "--model", MODEL, "--dataset", CALIB, "-o", stats]
        + ["--max-samples", str(args.samples), "--max-tokens", str(args.tokens), "--json"],
        check=True,
        capture_output=True,
    )
    print("| removal | expert bytes removed | weight bytes after | code ppl | prose ppl |")
    print("|---|---:|---:|---:|---:|")
    for ratio, n in ((0.25, 4), (0.5, 8)):
        for method in ("magnitude", "wanda", "wanda_select"):
            out = work / f"neurons-{method}-{ratio}"
            summary = prune_neurons(
                PruneNeuronsRequest(**common(args), output=out, method=method, ratio=ratio)
            )
            ppl = perplexities(out, sequences)
            print(
                f"| prune-neurons {method} {ratio:.0%} of neurons | "
                f"{summary['bytes_before'] - summary['bytes_after']} | {summary['bytes_after']} "
                f"| {ppl['code']:.1f} | {ppl['prose']:.1f} |",
                flush=True,
            )
        out = work / f"experts-{n}"
        subprocess.run(
            mlxfun + ["prune", "--model", MODEL, "--stats", stats, "--n", str(n), "-o", out],
            check=True,
            capture_output=True,
        )
        after = sum(p.stat().st_size for p in out.glob("model*.safetensors"))
        before = sum(p.stat().st_size for p in MODEL.glob("model*.safetensors"))
        ppl = perplexities(out, sequences)
        print(
            f"| REAP expert pruning {n} of 16 experts | ~{before - after} | ~{after} | "
            f"{ppl['code']:.1f} | {ppl['prose']:.1f} |",
            flush=True,
        )


CHILD = """
import resource, sys
import mlx.core as mx
from mlxfun.core.models import load_model
from mlxfun.methods.sparsify import SparsifyRequest, load_calibration
from mlxfun.methods.linear_inputs import run_layers, layer_targets
model, tokenizer, _ = load_model(sys.argv[1])
request = SparsifyRequest(model=sys.argv[1], dataset=[sys.argv[2]], max_samples=int(sys.argv[4]),
                          max_tokens=int(sys.argv[5]), batch_size=8)
calibration = load_calibration(request, tokenizer)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[3] == "forward":
    for tokens, _ in calibration.batches:
        mx.eval(model(mx.array(tokens)))
else:
    run_layers(model, calibration, lambda i, l, p: layer_targets(l, p, attention=True),
               lambda i, t, s: None, sequential=sys.argv[3] == "sequential")
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, calibration.tokens)
"""


def memory(args) -> None:
    print("| pass | peak RSS (MB) | above load + calibration (MB) |")
    print("|---|---:|---:|")
    rows = {}
    for mode in ("forward", "stats", "sequential"):
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(MODEL), str(CALIB), mode]
            + [str(args.samples), str(args.tokens)],
            capture_output=True,
            text=True,
            check=True,
        )
        base, peak, tokens = (int(v) for v in done.stdout.split())
        rows[mode] = peak
        print(f"| {mode} ({tokens} tokens) | {peak / 1024:.0f} | {(peak - base) / 1024:.0f} |")
    print(f"\nstats / forward peak RSS: {rows['stats'] / rows['forward']:.2f}")
    print(f"sequential / forward peak RSS: {rows['sequential'] / rows['forward']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--memory", action="store_true", help="only the memory comparison")
    parser.add_argument("--methods", default=",".join(METHODS), help="method[:topic],...")
    parser.add_argument("--no-structured", action="store_true", help="skip prune-neurons/REAP")
    args = parser.parse_args()
    if args.memory:
        memory(args)
        return
    with tempfile.TemporaryDirectory() as work:
        quality(args, Path(work))


if __name__ == "__main__":
    main()
