"""docs/plugins.md's "New architecture" section, followed literally: its package files written
out as shown, installed, and its shell steps run as they stand (save a tiny checkpoint of the
new model type, collect, prune, load; then --model-file and stock mlx-lm).

Installing: the test puts the package's ``src`` on PYTHONPATH beside the ``.dist-info`` that pip
would write (the name, version and entry points read from the section's pyproject.toml), so the
entry point is found exactly as for an installed distribution without building a wheel; the
section's own ``pip install`` line is the only one not run. A real fresh virtualenv with
``pip install ./mlxfun-acme`` was followed by hand (see the issue 19 closing report).
"""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

DOCS = Path(__file__).parent.parent / "docs" / "plugins.md"
TITLE = "## New architecture: a model type mlx-lm does not have"


def section() -> str:
    text = DOCS.read_text()
    start = text.index(TITLE)
    end = text.index("\n## ", start + len(TITLE))
    return text[start:end]


def package_files(text: str) -> dict[str, str]:
    """``path -> source`` of every file shown as `` `mlxfun-acme/PATH`: `` and a code block."""
    blocks = re.findall(r"`(mlxfun-acme/[^`]+)`:\n\n```\w*\n(.*?)\n```", text, re.DOTALL)
    return {path: source + "\n" for path, source in blocks}


def shell_steps(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", text, re.DOTALL)


def install(package: Path, site: Path) -> None:
    """The distribution's metadata with its entry points, as ``pip install`` writes it in
    ``site``."""
    project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    dist_info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    entry_points = "".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in points.items())
        for group, points in project["entry-points"].items()
    )
    (dist_info / "entry_points.txt").write_text(entry_points)


@pytest.mark.slow
def test_the_new_architecture_section_works_as_written(tmp_path):
    text = section()
    files = package_files(text)
    assert sorted(files) == [
        "mlxfun-acme/pyproject.toml",
        "mlxfun-acme/src/mlxfun_acme/__init__.py",
        "mlxfun-acme/src/mlxfun_acme/acme_moe.py",
        "mlxfun-acme/src/mlxfun_acme/adapter.py",
    ]
    for path, source in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(source)
    site = tmp_path / "site"
    install(tmp_path / "mlxfun-acme", site)

    steps = shell_steps(text)
    assert len(steps) == 2 and steps[0].startswith("pip install ./mlxfun-acme\n")
    script = "\n".join([steps[0].split("\n", 1)[1], steps[1]])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXFUN_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # importlib.metadata finds the .dist-info on sys.path, the package is imported from src
    env["PYTHONPATH"] = f"{site}{os.pathsep}{tmp_path / 'mlxfun-acme' / 'src'}"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "acme_moe" in result.stdout.split("\n")[0]  # mlxfun plugins lists the adapter
    assert "mlxfun_acme.acme_moe acme_moe 6\n" in result.stdout  # the documented output
    assert (tmp_path / "acme-standalone" / "acme_moe.py").read_text() == files[
        "mlxfun-acme/src/mlxfun_acme/acme_moe.py"
    ]
