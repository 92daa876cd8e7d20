"""Start-up hygiene: ``mlxfun --help`` and ``mlxfun plugins`` import neither MLX nor numpy
(numpy alone costs ~0.1-0.25 s of every start), nor does the plugin machinery (core types, hook
specs, the built-in packages' ``plugin`` modules, the adapters); the built-in and example plugins
import numpy inside the functions that compute. ``mlxfun prune`` never imports mlx-lm's loaders
and so transformers (~3 s)."""

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("mlx", "mlx.core", "mlx_lm", "numpy", "scipy", "transformers")


def imported_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; which heavy modules are then in ``sys.modules``."""
    snippet = (
        "import contextlib, io, json, sys\n"
        f"{code}\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXFUN_")}
    result = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def cli(argv) -> str:
    return (
        "from mlxfun.cli.app import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    code = main({argv!r})\n"
        "assert code in (0, None), code\n"
    )


def test_help_imports_neither_mlx_nor_numpy():
    assert imported_after(cli(["--help"])) == []


def test_plugins_imports_neither_mlx_nor_numpy():
    assert imported_after(cli(["plugins"])) == []


def test_plugin_machinery_does_not_import_numpy():
    code = (
        "import mlxfun.core, mlxfun.core.types, mlxfun.core.hookspecs, mlxfun.core.plugins\n"
        "import mlxfun.adapters.plugin, mlxfun.adapters.catalog, mlxfun.methods.plugin\n"
    )
    assert imported_after(code) == []


def test_registering_every_plugin_imports_neither_mlx_nor_numpy():
    # every built-in and the example plugin's objects, as `mlxfun plugins` lists them
    code = (
        "from mlxfun.core import plugins\n"
        "found = {(p.kind, p.name) for p in plugins.all_plugins() if p.error is None}\n"
        "assert {('scorer', 'reap'), ('selector', 'model-wide'), ('compressor', 'prune'),\n"
        "        ('compressor', 'ream'), ('scorer', 'token_share')} <= found, found\n"
    )
    assert imported_after(code) == []


@pytest.mark.parametrize("model_type", ["qwen3_moe", "example_moe"])
@pytest.mark.parametrize("selector", ["bottom", "model-wide"])
def test_prune_does_not_import_transformers(tmp_path, selector, model_type):
    """Also for a plugin's architecture (the example plugin's example_moe.py, copied into the
    output by --model-file): its model module is imported without mlx-lm's loaders too."""
    from mlxfun.core.testing import save_tiny_checkpoint

    from .adapters.test_examples import QWEN3_MOE
    from .test_prune import write_stats

    model = save_tiny_checkpoint(tmp_path / "m", model_type, QWEN3_MOE)
    stats = write_stats(model, tmp_path / "s.npz")
    out = tmp_path / "out"
    # model-wide removes 3 experts of 2 layers' experts: the counts differ (non-uniform output)
    argv = ["prune", "--model", str(model), "--stats", str(stats), "--n", "3", "-o", str(out)]
    argv += ["--model-file"] if model_type == "example_moe" else []
    heavy = imported_after(cli([*argv, "--selector", selector]))
    assert "transformers" not in heavy and "mlx_lm" not in heavy, heavy
    assert (out / "config.json").is_file()
    assert ("model_file" in json.loads((out / "config.json").read_text())) == (
        selector == "model-wide" or model_type == "example_moe"
    )
    # the output is itself pruned without transformers
    stats = write_stats(out, tmp_path / "s2.npz")
    argv = ["prune", "--model", str(out), "--stats", str(stats), "--n", "1", "--dry-run"]
    heavy = imported_after(cli(argv))
    assert "transformers" not in heavy and "mlx_lm" not in heavy, heavy
