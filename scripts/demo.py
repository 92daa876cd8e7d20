"""The main job end to end on the bundled demo MoE (README's first command, `tox -e demo`).

1. inspect the model, 2. collect routing statistics on the mixed code + prose calibration set,
3. prune 25% of the experts of every layer by REAP, 4. evaluate perplexity before and after on
the held-out code and prose evaluation sets, 5. smoke-test generation, 6. print a summary.
Every step is an ordinary `mlxfun` command, printed before it runs, so it can be copied.

    python scripts/demo.py [--ratio 0.25] [--scorer reap] [--selector bottom] [--tokens 256]
                           [--out out/demo]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "demo" / "model"
DATA = ROOT / "demo" / "data"
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def mlxfun(*args: str, capture: bool = False) -> str:
    shown = " ".join(str(a).replace(str(ROOT) + "/", "") for a in args)
    print(f"$ mlxfun {shown}", flush=True)
    command = [sys.executable, "-m", "mlxfun.cli", *map(str, args)]
    result = subprocess.run(command, text=True, stdout=subprocess.PIPE if capture else None)
    if result.returncode != 0:
        sys.exit(f"demo: `mlxfun {args[0]}` failed (exit {result.returncode})")
    return result.stdout or ""


def size_mib(model_dir: Path) -> float:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ratio", default="0.25", help="share of each layer's experts to remove")
    parser.add_argument("--scorer", default="reap")
    parser.add_argument("--selector", default="bottom", help="bottom, strided or model-wide")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    parser.add_argument(
        "--tokens", default="256", help="tokens of each calibration and evaluation sample"
    )
    opts = parser.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)
    stats = opts.out / "stats.npz"
    pruned = opts.out / f"{opts.selector}-{opts.scorer}-{opts.ratio}"
    started = time.perf_counter()

    print("mlxfun demo: a 16-expert, top-2 Qwen3-MoE trained on Python code and English prose")
    if sys.platform == "linux" and "openblas" not in os.environ.get("LD_PRELOAD", ""):
        hint = f"LD_PRELOAD={OPENBLAS}" if OPENBLAS.exists() else "README's 'Faster on Linux'"
        print(f"(tip: this runs several times faster with OpenBLAS; see {hint})")

    step("1/5  What is in the model")
    mlxfun("inspect", MODEL)

    step("2/5  Routing statistics on the calibration set (code + prose, held out from training)")
    calib = DATA / "calib_mixed.jsonl"
    mlxfun(
        "collect", "--model", MODEL, "--dataset", calib, "--output", stats,
        "--max-tokens", opts.tokens, "--seed", "0",
    )  # fmt: skip

    step(f"3/5  Remove {float(opts.ratio):.0%} of the experts by {opts.scorer} ({opts.selector})")
    mlxfun(
        "prune",
        "--model", MODEL,
        "--stats", stats,
        "--scorer", opts.scorer,
        "--selector", opts.selector,
        "--ratio", opts.ratio,
        "--output", pruned,
        "--force",
    )  # fmt: skip

    step("4/5  Perplexity before and after, on held-out evaluation text")
    results = {}
    for domain in ("code", "prose"):
        dataset = DATA / f"eval_{domain}.jsonl"
        out = mlxfun(
            "eval", "--model", MODEL, "--model", pruned, "--dataset", dataset,
            "--max-tokens", opts.tokens, "--json", capture=True,
        )  # fmt: skip
        results[domain] = json.loads(out)

    step("5/5  Does the pruned model still generate?")
    mlxfun(
        "smoke-test",
        pruned,
        "--raw",
        "--prompt",
        "def parse_args(argv):",
        "--prompt",
        "And God said",
    )

    print(f"\n=== Summary ({time.perf_counter() - started:.0f} s)")
    print(
        f"{float(opts.ratio):.0%} of the experts of every layer removed by {opts.scorer} "
        f"({opts.selector}); weights {size_mib(MODEL):.2f} MiB -> {size_mib(pruned):.2f} MiB\n"
    )
    header = (
        "domain",
        "eval tokens",
        "ppl before",
        "ppl after",
        "change",
        "top-1 agree",
        "greedy agree",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for domain, report in results.items():
        before, after = report["models"]
        change = after["perplexity"] / before["perplexity"] - 1
        print(
            f"| {domain} | {report['tokens']} | {before['perplexity']:.1f} | "
            f"{after['perplexity']:.1f} | {change:+.1%} | {after['top1_agreement']:.1%} | "
            f"{after['greedy_agreement']:.1%} |"
        )
    print(
        "\n(top-1 agree: next-token argmax equal to the original model's; greedy agree: tokens of"
        " 16-token greedy continuations equal to the original's)"
    )
    print(f"\npruned model: {pruned.relative_to(ROOT) if pruned.is_relative_to(ROOT) else pruned}")
    print("load it with stock mlx-lm:  python -c \"import mlx_lm; mlx_lm.load('<that dir>')\"")


if __name__ == "__main__":
    main()
