"""Start-up time of ``mlxfun --help`` and ``mlxfun plugins``, and which heavy libraries they import.

    python benchmarks/cli_startup.py [--runs 7] [--json]

Each command runs ``--runs`` times in a fresh subprocess (the installed ``mlxfun`` console
script, as a user runs it); the figure is the median wall time. A second subprocess runs the
same commands through ``mlxfun.cli.app.main`` and reports whether mlx, mlx_lm, scipy or
transformers ended up in ``sys.modules``; if one did, ``python -X importtime`` names the import
chain that brought it in. Target: median < 0.5 s, and no mlx import. MLXFUN_* variables of the
calling shell are not passed on.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HEAVY = ("mlx", "mlx_lm", "scipy", "transformers")
TARGET_S = 0.5
COMMANDS = {"mlxfun --help": ["--help"], "mlxfun plugins": ["plugins"]}


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("MLXFUN_")}


def mlxfun_command() -> list[str]:
    script = Path(sysconfig.get_path("scripts")) / "mlxfun"
    if script.exists():
        return [str(script)]
    found = shutil.which("mlxfun")
    return [found] if found else [sys.executable, "-m", "mlxfun.cli"]


def wall_times(command: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=clean_env())
        times.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    return times


def snippet(argv: list[str]) -> str:
    return (
        "import contextlib, io, json, sys\n"
        "from mlxfun.cli.app import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):  # stderr stays: -X importtime\n"
        f"    main({argv!r})\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )


def heavy_imports(argv: list[str]) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", snippet(argv)], capture_output=True, text=True, env=clean_env()
    )
    if result.returncode != 0:
        raise SystemExit(f"main({argv}) failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def import_chain(argv: list[str], module: str) -> list[str]:
    """The chain of imports (outermost first) that first imported ``module``."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", snippet(argv)],
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    # Lines look like "import time:  self |  cumulative |   <indent>name"; a module is printed
    # after its children, one indent level (two spaces) deeper than its parent.
    entries = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        name_part = line.rsplit("|", 1)[1]
        stripped = name_part.lstrip(" ")
        if stripped == "package" or not stripped:
            continue
        entries.append(((len(name_part) - len(stripped) - 1) // 2, stripped.strip()))
    matches = [i for i, (_, name) in enumerate(entries) if name == module]
    matches = matches or [i for i, (_, n) in enumerate(entries) if n.startswith(module + ".")]
    if matches:
        level, name = entries[matches[0]]
        chain, wanted = [name], level - 1
        for parent_level, parent in entries[matches[0] + 1 :]:
            if parent_level == wanted:
                chain.append(parent)
                wanted -= 1
            if wanted < 0:
                break
        return chain[::-1]
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    options = parser.parse_args()

    command = mlxfun_command()
    wall_times(command + ["--help"], 1)  # warm the file cache and bytecode
    results = []
    for label, argv in COMMANDS.items():
        times = wall_times(command + argv, options.runs)
        heavy = heavy_imports(argv)
        results.append(
            {
                "command": label,
                "median_s": round(statistics.median(times), 3),
                "min_s": round(min(times), 3),
                "max_s": round(max(times), 3),
                "runs": options.runs,
                "heavy_imports": heavy,
                "import_chains": {m: import_chain(argv, m) for m in heavy},
            }
        )
    ok = all(r["median_s"] < TARGET_S and "mlx" not in r["heavy_imports"] for r in results)
    if options.json:
        print(json.dumps({"results": results, "target_s": TARGET_S, "ok": ok}, indent=2))
        return 0 if ok else 1
    print(f"{' '.join(command)}  ({options.runs} runs each, fresh subprocesses)")
    for r in results:
        heavy = ", ".join(r["heavy_imports"]) or "none"
        print(
            f"{r['command']:16} median {r['median_s']:.3f} s  (min {r['min_s']:.3f}, "
            f"max {r['max_s']:.3f})  heavy imports: {heavy}"
        )
        for module, chain in r["import_chains"].items():
            print(f"    {module} imported via: {' -> '.join(chain) or '?'}")
    verdict = "OK" if ok else "NOT OK"
    print(f"target: median < {TARGET_S} s and mlx not imported: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
