"""The main job end to end on the bundled demo MoE (README's first command runs this).

1. inspect the model, 2. collect routing statistics on the mixed calibration set,
3. prune 25% of the experts per layer by REAP, 4. evaluate perplexity before and after on the
code and prose evaluation sets, 5. smoke-test generation, 6. print a summary table.

    python scripts/demo.py [--ratio 0.25] [--scorer reap] [--out out/demo] [--max-tokens 4096]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "demo" / "model"
DATA = ROOT / "demo" / "data"


def mlxfun(*args: str, capture: bool = False) -> str:
    command = [sys.executable, "-m", "mlxfun.cli", *args]
    print(f"\n$ mlxfun {' '.join(args)}", flush=True)
    result = subprocess.run(command, text=True, stdout=subprocess.PIPE if capture else None)
    if result.returncode != 0:
        sys.exit(f"demo: `mlxfun {args[0]}` failed (exit {result.returncode})")
    return result.stdout or ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ratio", default="0.25", help="share of experts to remove per layer")
    parser.add_argument("--scorer", default="reap")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    parser.add_argument("--max-tokens", default="4096", help="evaluation tokens per domain")
    opts = parser.parse_args()
    stats = opts.out / "stats.npz"
    pruned = opts.out / f"pruned-{opts.scorer}-{opts.ratio}"

    mlxfun("inspect", str(MODEL))
    mlxfun(
        "collect",
        "--model",
        str(MODEL),
        "--dataset",
        str(DATA / "calib_mixed.jsonl"),
        "--output",
        str(stats),
    )
    mlxfun(
        "prune",
        "--model", str(MODEL),
        "--stats", str(stats),
        "--scorer", opts.scorer,
        "--selector", "bottom",
        "--ratio", opts.ratio,
        "--output", str(pruned),
        "--force",
    )  # fmt: skip
    results = {}
    for domain in ("code", "prose"):
        out = mlxfun(
            "eval",
            "--model", str(MODEL),
            "--model", str(pruned),
            "--dataset", str(DATA / f"eval_{domain}.jsonl"),
            "--max-tokens", opts.max_tokens,
            "--json",
            capture=True,
        )  # fmt: skip
        results[domain] = json.loads(out)
        print(out)
    mlxfun(
        "smoke-test", str(pruned), "--prompt", "def fibonacci(n):", "--prompt", "The king said unto"
    )

    print("\n== Summary: demo MoE, 16 experts per layer, top-2 ==")
    print(
        f"pruned {float(opts.ratio):.0%} of experts per layer by {opts.scorer} (calibration: mixed code + prose)\n"
    )
    print(f"{'domain':8} {'ppl before':>11} {'ppl after':>10} {'change':>8} {'greedy overlap':>15}")
    for domain, report in results.items():
        before, after = report["models"][0], report["models"][1]
        change = after["perplexity"] / before["perplexity"] - 1
        overlap = after.get("overlap")
        overlap_text = f"{overlap:.0%}" if isinstance(overlap, float) else "-"
        print(
            f"{domain:8} {before['perplexity']:11.2f} {after['perplexity']:10.2f} {change:+8.1%} {overlap_text:>15}"
        )
    print(f"\npruned model: {pruned} (loads with stock mlx_lm.load)")


if __name__ == "__main__":
    main()
