"""Start-up time of ``mlxfun --help`` and ``mlxfun plugins``, and which heavy libraries they import.

    python benchmarks/cli_startup.py [--runs 9] [--json]

Each command runs ``--runs`` times in a fresh subprocess (the installed ``mlxfun`` console
script, as a user runs it), interleaved with two baselines, ``python -c pass`` and ``python -c
"import typer"``, so that load on a shared machine hits all alike; the figures are median wall
and CPU (user + system) times, the ratios of the medians to the baselines, and the load average
before and after. A second subprocess runs the same commands through ``mlxfun.cli.app.main``
and reports whether numpy, mlx, mlx_lm, scipy or transformers ended up in ``sys.modules``; if one
did, ``python -X importtime`` names the import chain that brought it in. Target: median < 0.5 s,
and no mlx import. MLXFUN_* variables and PYTHONDONTWRITEBYTECODE of the calling shell are
not passed on (see ``clean_env``).
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

HEAVY = ("numpy", "mlx", "mlx_lm", "scipy", "transformers")
TARGET_S = 0.5
COMMANDS = {"mlxfun --help": ["--help"], "mlxfun plugins": ["plugins"]}
BASELINES = {"python -c pass": "pass", "python -c 'import typer'": "import typer"}


def clean_env() -> dict:
    """This environment without MLXFUN_* settings and without PYTHONDONTWRITEBYTECODE: an
    installed package has its bytecode compiled, but an editable (development) install only
    gets it when Python may write it; without it every run compiles mlxfun's modules again
    (~0.04 s of CPU for ``mlxfun prune``)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MLXFUN_") and k != "PYTHONDONTWRITEBYTECODE"
    }


def mlxfun_command() -> list[str]:
    script = Path(sysconfig.get_path("scripts")) / "mlxfun"
    if script.exists():
        return [str(script)]
    found = shutil.which("mlxfun")
    return [found] if found else [sys.executable, "-m", "mlxfun.cli"]


def timed(command: list[str]) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of ``command`` in a fresh child process."""
    start = time.perf_counter()
    child = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clean_env()
    )
    errors = child.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - start
    child.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{errors}")
    return elapsed, usage.ru_utime + usage.ru_stime


def interleaved_times(commands: dict[str, list[str]], runs: int) -> dict[str, list[tuple]]:
    """Every command once per round, ``runs`` rounds: load changes hit them all alike."""
    times = {label: [] for label in commands}
    for _ in range(runs):
        for label, command in commands.items():
            times[label].append(timed(command))
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
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    options = parser.parse_args()

    command = mlxfun_command()
    commands = {label: command + argv for label, argv in COMMANDS.items()}
    commands.update({label: [sys.executable, "-c", code] for label, code in BASELINES.items()})
    interleaved_times(commands, 1)  # warm the file cache and bytecode
    load_before = os.getloadavg()
    times = interleaved_times(commands, options.runs)
    load_after = os.getloadavg()
    medians = {
        label: (statistics.median(t[0] for t in runs), statistics.median(t[1] for t in runs))
        for label, runs in times.items()
    }
    baselines = {label: medians[label][0] for label in BASELINES}
    results = []
    for label, runs in times.items():
        walls = [t[0] for t in runs]
        result = {
            "command": label,
            "median_s": round(medians[label][0], 3),
            "min_s": round(min(walls), 3),
            "max_s": round(max(walls), 3),
            "median_cpu_s": round(medians[label][1], 3),
            "runs": options.runs,
            "ratio_to": {b: round(medians[label][0] / s, 2) for b, s in baselines.items()},
        }
        if label in COMMANDS:
            heavy = heavy_imports(COMMANDS[label])
            result["heavy_imports"] = heavy
            result["import_chains"] = {m: import_chain(COMMANDS[label], m) for m in heavy}
        results.append(result)
    checked = [r for r in results if r["command"] in COMMANDS]
    ok = all(r["median_s"] < TARGET_S and "mlx" not in r["heavy_imports"] for r in checked)
    load = {
        "before": [round(x, 2) for x in load_before],
        "after": [round(x, 2) for x in load_after],
    }
    cores = os.cpu_count()
    if options.json:
        summary = {"results": results, "target_s": TARGET_S, "ok": ok, "load": load, "cores": cores}
        print(json.dumps(summary, indent=2))
        return 0 if ok else 1
    print(f"{' '.join(command)}  ({options.runs} interleaved runs each, fresh subprocesses)")
    print(
        f"load average (1, 5, 15 min) before {load['before']}, after {load['after']}; {cores} cores"
    )
    names = list(BASELINES)
    for r in results:
        ratios = ", ".join(f"{r['ratio_to'][b]:.2f}x {b}" for b in names if b != r["command"])
        print(
            f"{r['command']:26} median {r['median_s']:.3f} s (min {r['min_s']:.3f}, max "
            f"{r['max_s']:.3f}), CPU {r['median_cpu_s']:.3f} s; {ratios}"
        )
        if "heavy_imports" in r:
            print(f"{'':26} heavy imports: {', '.join(r['heavy_imports']) or 'none'}")
        for module, chain in r.get("import_chains", {}).items():
            print(f"    {module} imported via: {' -> '.join(chain) or '?'}")
    verdict = "OK" if ok else "NOT OK"
    print(f"target: median < {TARGET_S} s and mlx not imported: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
