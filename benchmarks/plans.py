"""Compression plans vs uniform REAP pruning and REAM merging on the demo MoE (the "Compression
plans" section of benchmarks/RESULTS.md).

Statistics: `mlxfun collect` on demo/data/calib_mixed.jsonl. Analysis: `mlxfun analyze` with the
same text (REAM similarity, threshold 0.6). Each plan (conservative, balanced, aggressive, and
`--target-size`) is applied with `mlxfun apply`; at the same final expert count the baselines are
`mlxfun prune` (REAP, `model-wide`: the plan's total removals) and `mlxfun merge` (REAM, same
selection, group size 0). Every expert of the demo has the same byte size, so the same count is
the same size. Evaluation: mlxfun.methods.evaluate on eval_code and eval_prose (perplexity, and
greedy agreement = token overlap of 16-token greedy continuations with the original model).

    python benchmarks/plans.py [--sizes 12MB] [--max-tokens 256] [--threshold 0.6]
                               [--strategies conservative,balanced,aggressive]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlxfun.methods.evaluate import evaluate

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "demo" / "model"
DATA = ROOT / "demo" / "data"
CALIB = DATA / "calib_mixed.jsonl"
DOMAINS = ["code", "prose"]


def mlxfun(*args) -> str:
    command = [sys.executable, "-m", "mlxfun.cli", *map(str, args)]
    result = subprocess.run(command, text=True, capture_output=True)
    if result.returncode != 0:
        sys.exit(f"plans: mlxfun {args[0]} failed:\n{result.stderr}")
    return result.stdout


def build(work: Path, sizes: list[str], threshold: float, strategies: list[str]) -> list[dict]:
    """Stats, analysis, the plans and their baselines; one row per compared model."""
    stats, analysis = work / "stats.npz", work / "analysis.json"
    mlxfun("collect", "--model", MODEL, "--dataset", CALIB, "-o", stats)
    mlxfun(
        "analyze", "--model", MODEL, "--stats", stats, "--dataset", CALIB,
        "--threshold", threshold, "-o", analysis,
    )  # fmt: skip
    plans = [("--strategy", s) for s in strategies]
    plans += [("--target-size", s) for s in sizes]
    rows = []
    for option, value in plans:
        name = value if option == "--strategy" else f"size {value}"
        plan_file = work / f"plan_{value}.json"
        mlxfun("plan", "--analysis", analysis, option, value, "-o", plan_file)
        plan = json.loads(plan_file.read_text())
        removed = plan["experts_before"] - plan["experts_after"]
        merges = sum(len(m["source_experts"]) for x in plan["layers"] for m in x["merges"])
        out = work / f"apply_{value}"
        start = time.perf_counter()
        mlxfun("apply", "--model", MODEL, "--plan", plan_file, "-o", out)
        seconds = time.perf_counter() - start
        common = {"plan": name, "experts": plan["experts_after"], "removed": removed}
        rows.append(
            dict(
                common,
                method=f"plan ({merges} merged, {removed - merges} pruned)",
                path=out,
                seconds=seconds,
                impact=sum(x["impact"] for x in plan["layers"]) / len(plan["layers"]),
                notes=plan["notes"],
                bytes=plan["bytes_after"],
            )
        )
        pruned, merged = work / f"prune_{value}", work / f"merge_{value}"
        select = ["--stats", stats, "--scorer", "reap", "--selector", "model-wide"]
        mlxfun("prune", "--model", MODEL, *select, "--n", removed, "-o", pruned)
        rows.append(dict(common, method="REAP prune (model-wide)", path=pruned))
        start = time.perf_counter()
        mlxfun(
            "merge", "--model", MODEL, *select, "--n", removed, "--group-size", 0,
            "--dataset", CALIB, "-o", merged,
        )  # fmt: skip
        rows.append(
            dict(
                common,
                method="REAM merge (model-wide, group size 0)",
                path=merged,
                seconds=time.perf_counter() - start,
            )
        )
    return rows


def measure(rows: list[dict], max_tokens: int) -> None:
    for domain in DOMAINS:
        result = evaluate(
            [MODEL, *[row["path"] for row in rows]],
            [DATA / f"eval_{domain}.jsonl"],
            max_tokens=max_tokens,
        )
        base, *models = result["models"]
        for row, got in zip(rows, models):
            row[domain] = got["perplexity"]
            row[f"{domain}_base"] = base["perplexity"]
            row[f"{domain}_overlap"] = got["greedy_agreement"]


def table(rows: list[dict]) -> str:
    lines = [
        "| plan | experts | method | code ppl | prose ppl | code overlap | prose overlap |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [row["plan"], str(row["experts"]), row["method"]]
        for domain in DOMAINS:
            change = row[domain] / row[f"{domain}_base"] - 1
            cells.append(f"{row[domain]:.1f} ({change:+.0%})")
        cells += [f"{row[f'{d}_overlap']:.0%}" for d in DOMAINS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="12MB", help="--target-size plans, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=256, help="evaluation tokens a sample")
    parser.add_argument("--threshold", type=float, default=0.6, help="analyze --threshold")
    parser.add_argument(
        "--strategies", default="conservative,balanced,aggressive", help="comma-separated"
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [s for s in args.sizes.split(",") if s]
        strategies = [s for s in args.strategies.split(",") if s]
        rows = build(Path(tmp), sizes, args.threshold, strategies)
        measure(rows, args.max_tokens)
    for row in rows:
        row["path"] = str(row["path"])
    first = rows[0]
    print(f"original: code {first['code_base']:.1f}, prose {first['prose_base']:.1f}\n")
    print(table(rows))
    for row in rows:
        if row.get("notes"):
            print(f"\n{row['plan']}: " + "; ".join(row["notes"]))
        if "impact" in row:
            print(
                f"{row['plan']}: estimated impact {row['impact']:.3f}, {row['bytes']} bytes, "
                f"apply {row['seconds']:.1f} s"
            )
    print(f"\n{(time.perf_counter() - started) / 60:.1f} minutes")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
