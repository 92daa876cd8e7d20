"""A plugin that raises while a command runs: one line naming the plugin, its kind, its
distribution and the exception, exit status 1, nothing written; ``--debug`` or
``MLXFUN_DEBUG=1`` shows the traceback; a plugin's own ``MlxfunError`` stays its message.

The raising plugins are a test distribution on ``PYTHONPATH`` (``tests/core/fake_dists``), run
through the installed ``mlxfun`` console script, exactly as a user would meet them."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from mlxfun.cli.app import main
from mlxfun.core import testing
from mlxfun.core.hookspecs import hookimpl
from mlxfun.core.types import Selection

from .core.fake_dists import write_dist
from .core.test_core_plugins import BottomSelector

RAISING = """
from mlxfun.core.adapter import MoEAdapter
from mlxfun.core.errors import MlxfunError
from mlxfun.core.hookspecs import hookimpl


class BoomScorer:
    name = "boom_scorer"
    description = "raises in update"
    needs = frozenset({"selected"})

    def init(self, num_layers, num_experts):
        import numpy as np

        return {"n": np.zeros((num_layers, num_experts))}

    def update(self, acc, obs):
        raise ValueError(f"cannot count layer {obs.layer}")

    def finalize(self, acc):
        return acc["n"]


class BoomSelector:
    name = "boom_selector"
    description = "treats top_k as an int"

    def select(self, scores, n=1, top_k=1, **options):
        return scores.shape[1] - top_k


class CleanSelector:
    name = "clean_selector"
    description = "refuses cleanly"

    def select(self, scores, **options):
        raise MlxfunError("clean_selector needs --ratio; pass --ratio 0.25")


def route(block, logits):
    raise RuntimeError("route exploded")


@hookimpl
def register_scorers(register):
    register(BoomScorer())


@hookimpl
def register_selectors(register):
    register(BoomSelector())
    register(CleanSelector())


@hookimpl
def register_adapters(register):
    register(
        MoEAdapter(
            name="boom_moe",
            model_types=("boom_moe",),
            description="routes by raising",
            route=route,
            model_module="mlx_lm.models.qwen3_moe",
            num_experts_keys=("num_experts",),
        )
    )
"""
PLUGINS = "mlxfun-adapters,mlxfun-methods,mlxfun-boom-test"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The raising plugins, a tiny Qwen3-MoE checkpoint with its stats, a boom_moe checkpoint
    and calibration text."""
    root = tmp_path_factory.mktemp("failures")
    write_dist(root / "site", "mlxfun-boom-test", "mlxfun_boom_test", RAISING)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i} " * 4}) + "\n" for i in range(3)))
    qwen = testing.save_tiny_checkpoint(root / "qwen", "qwen3_moe")
    testing.save_tiny_checkpoint(root / "boom", "boom_moe", module="qwen3_moe")
    collect = ["collect", "--model", str(qwen), "--dataset", str(data), "--scorers", "frequency"]
    assert main([*collect, "-o", str(root / "stats.npz")]) == 0
    return root


def run_cli(site: Path, *args, **environ):
    """The installed ``mlxfun`` console script with the raising plugins installed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXFUN_")}
    env.update(MLXFUN_LOAD_PLUGINS=PLUGINS, PYTHONPATH=str(site / "site"), **environ)
    script = Path(sysconfig.get_path("scripts")) / "mlxfun"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mlxfun.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=300)


def one_error_line(result) -> str:
    """The command failed with status 1 and exactly one ``error:`` line, no traceback."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def nothing_beside(output: Path) -> None:
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")]


def test_a_scorer_raising_during_collect(site):
    output = site / "boom.npz"
    args = ["--model", str(site / "qwen"), "--dataset", str(site / "data.jsonl")]
    result = run_cli(site, "collect", *args, "--scorers", "boom_scorer", "-o", str(output))
    assert one_error_line(result) == (
        "error: scorer plugin 'boom_scorer' (mlxfun-boom-test 1.0) failed: ValueError: cannot "
        "count layer 0 (--debug or MLXFUN_DEBUG=1 shows the traceback)"
    )
    nothing_beside(output)


def test_an_adapter_route_raising_during_collect(site):
    output = site / "boom-route.npz"
    args = ["--model", str(site / "boom"), "--dataset", str(site / "data.jsonl")]
    result = run_cli(site, "collect", *args, "--scorers", "frequency", "-o", str(output))
    line = one_error_line(result)
    assert line.startswith(
        "error: adapter plugin 'boom_moe' (mlxfun-boom-test 1.0) failed: RuntimeError: route "
        "exploded"
    )
    nothing_beside(output)


def test_a_selector_raising_during_prune_and_the_traceback_on_request(site):
    output = site / "pruned"
    args = ["prune", "--model", str(site / "qwen"), "--stats", str(site / "stats.npz")]
    args += ["--scorer", "frequency", "--selector", "boom_selector", "--n", "2", "-o", str(output)]
    line = one_error_line(run_cli(site, *args))
    assert line.startswith(
        "error: selector plugin 'boom_selector' (mlxfun-boom-test 1.0) failed: TypeError: "
        "unsupported operand type(s) for -: 'int' and 'list'"
    )
    nothing_beside(output)
    for result in (run_cli(site, "--debug", *args), run_cli(site, *args, MLXFUN_DEBUG="1")):
        assert result.returncode == 1
        assert "Traceback (most recent call last)" in result.stderr
        assert "in select" in result.stderr
        assert result.stderr.rstrip().endswith("'int' and 'list'")  # no --debug hint with it
        nothing_beside(output)


def test_a_plugins_own_mlxfun_error_stays_its_message(site):
    output = site / "clean"
    args = ["prune", "--model", str(site / "qwen"), "--stats", str(site / "stats.npz")]
    args += ["--scorer", "frequency", "--selector", "clean_selector", "--n", "2", "-o", str(output)]
    assert one_error_line(run_cli(site, *args)) == (
        "error: clean_selector needs --ratio; pass --ratio 0.25"
    )
    nothing_beside(output)


def test_a_selector_passing_the_kit_works_in_prune_through_the_cli(site, capsys):
    """example_bottom (the example plugin's selector, written from the documented types)
    passes the kit, and mlxfun prune removes what an independent computation says."""
    from mlxfun.core import plugins
    from mlxfun.core.stats import load_stats

    testing.check_selector(plugins.get_selector("example_bottom"))
    output = site / "example-pruned"
    args = ["prune", "--model", str(site / "qwen"), "--stats", str(site / "stats.npz")]
    args += ["--scorer", "frequency", "--selector", "example_bottom", "--n", "2"]
    args += ["--protect", "0:0", "--target", "1:7", "-o", str(output), "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    scores = load_stats(site / "stats.npz").score("frequency")
    expected = {}
    for layer, (protect, target) in enumerate(((0, None), (None, 7))):
        free = [e for e in range(8) if e not in (protect, target)]
        order = sorted(free, key=lambda e: (scores[layer, e], e))
        gone = ([target] if target is not None else []) + order
        expected[str(layer)] = sorted(set(range(8)) - set(gone[:2]))
    assert summary["keep"] == expected
    model, adapter = testing.commands.load_and_run(output)
    assert [layer.num_experts for layer in adapter.moe_layers(model)] == [6, 6]


class IntTopK(BottomSelector):
    """Written from the old docs: top_k an int."""

    name = "int_top_k"

    def select(self, scores, n=1, top_k=1, **options):
        n = min(n, scores.shape[1] - top_k)
        keep = {layer: list(range(n, scores.shape[1])) for layer in range(scores.shape[0])}
        removed = {layer: list(range(n)) for layer in range(scores.shape[0])}
        return Selection(keep, removed, [scores.shape[1]] * scores.shape[0])


class IntTopKPlugin:
    @hookimpl
    def register_selectors(self, register):
        register(IntTopK())


def test_a_selector_treating_top_k_as_an_int_fails_the_kit_not_prune(site, capsys):
    with pytest.raises(AssertionError, match="top_k is a list\\[int\\] with one value per MoE"):
        testing.check_selector(IntTopK())
    with testing.registered_plugin(IntTopKPlugin(), "int-top-k", "mlxfun-int-top-k", "0.1"):
        args = ["prune", "--model", str(site / "qwen"), "--stats", str(site / "stats.npz")]
        args += ["--scorer", "frequency", "--selector", "int_top_k", "--n", "2"]
        assert main([*args, "-o", str(site / "int-top-k")]) == 1
    err = capsys.readouterr().err
    assert "error: selector plugin 'int_top_k' (mlxfun-int-top-k 0.1) failed: TypeError" in err
    assert "Traceback" not in err
    nothing_beside(site / "int-top-k")


class RaisingPrune:
    name = "prune"
    description = "a prune compressor that fails"

    def compress(self, request):
        return np.zeros(2)[request.n + 5]


class RaisingPrunePlugin:
    @hookimpl
    def register_compressors(self, register):
        register(RaisingPrune())


def test_a_compressor_raising(site, capsys):
    with testing.fresh_plugin_state(MLXFUN_LOAD_PLUGINS="mlxfun-adapters"):
        with testing.registered_plugin(RaisingPrunePlugin(), "raising-prune", "mlxfun-rp", "2"):
            args = ["prune", "--model", str(site / "qwen"), "--stats", str(site / "stats.npz")]
            assert main([*args, "--n", "1", "-o", str(site / "rp")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        "error: compressor plugin 'prune' (mlxfun-rp 2) failed: IndexError: index 6 is out of "
        "bounds"
    )
    assert err.count("\n") == 1
    nothing_beside(site / "rp")
