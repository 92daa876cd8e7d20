"""Usage errors (a missing or unknown option, a bad option value, an unknown command) print
Click's usage message and exit with status 2, never a traceback, whichever Typer is installed
(Typer >= 0.26 raises its own vendored Click's exceptions, not the ``click`` package's; the
wording of some messages differs between Click versions). Run through the installed ``mlxfun``
console script, as a user runs it."""

import os
import shutil
import subprocess
import sys

import pytest

MLXFUN = shutil.which("mlxfun", path=os.path.dirname(sys.executable)) or shutil.which("mlxfun")


def run_mlxfun(*argv) -> subprocess.CompletedProcess:
    assert MLXFUN, "the mlxfun console script is not installed next to this Python"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXFUN_")}
    return subprocess.run(
        [MLXFUN, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "argv,usage,error",
    [
        (["prune"], "Usage: mlxfun prune [OPTIONS]", "Error: Missing option '--model'"),
        (
            ["prune", "--nonsense"],
            "Usage: mlxfun prune [OPTIONS]",
            "Error: No such option",
        ),
        (
            ["frobnicate"],
            "Usage: mlxfun [OPTIONS] COMMAND [ARGS]...",
            "Error: No such command 'frobnicate'",
        ),
        (
            ["prune", "--model", "m", "--stats", "s.npz", "--n", "abc", "--dry-run"],
            "Usage: mlxfun prune [OPTIONS]",
            "Error: Invalid value for '--n'",
        ),
    ],
)
def test_usage_errors_print_the_usage_and_exit_2(argv, usage, error):
    result = run_mlxfun(*argv)
    # (the deliberately broken plugin of the test environment warns when it is skipped)
    lines = [x for x in result.stderr.splitlines() if not x.startswith("mlxfun: warning: skipped")]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0] == usage, result.stderr
    assert lines[1].startswith("Try 'mlxfun") and lines[1].endswith(" --help' for help."), lines
    assert lines[-1].startswith(error), lines
    assert all(arg in lines[-1] for arg in argv if arg.startswith("--n")), lines  # the culprit
    assert len(lines) == 4 and result.stdout == "", result.stderr


def test_version_exits_0():
    result = run_mlxfun("--version")
    assert result.returncode == 0 and result.stdout.startswith("mlxfun "), result.stderr
