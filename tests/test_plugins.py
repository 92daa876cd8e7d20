"""The plugin system end to end, with real third-party plugins installed.

Needs the two test plugins installed next to mlxfun (tox and .ci/run install them):
    pip install ./tests/plugins/mlxfun-example-plugin ./tests/plugins/mlxfun-broken-plugin
``mlxfun-example-plugin`` registers the ``example_moe`` adapter and the ``token_share`` scorer;
``mlxfun-broken-plugin`` fails on import. The plugin manager's mechanics with plugins defined
inside the tests are in tests/core/test_core_plugins.py.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import mlx.core as mx
import numpy as np
import pluggy
import pytest
from mlx_lm.utils import load as mlx_lm_load
from mlxfun.cli.app import main
from mlxfun.core import plugins, testing
from mlxfun.core.errors import MlxfunError
from mlxfun.core.hookspecs import hookimpl
from mlxfun.core.models import load_model
from mlxfun.core.observe import Observer
from mlxfun.core.stats import StatsCollector, load_stats
from mlxfun.methods.prune import PruneRequest, prune

from .adapters.harness import build_tiny
from .adapters.test_examples import MIXTRAL, QWEN3_MOE
from .model_dirs import write_model_dir
from .test_prune import TOKENS, pruned_matches_masked, write_stats

EXAMPLE = {
    ("adapter", "example_moe"): "example_moe (example plugin): softmax over all experts, top-k, "
    "renormalised",
    ("scorer", "token_share"): "fraction of the layer's tokens routed to the expert (its load; "
    "sums to top-k)",
    ("selector", "example_bottom"): "each layer's n lowest-scoring experts (example plugin)",
}
BROKEN_ERROR = "RuntimeError: mlxfun-broken-plugin fails on import on purpose"


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(autouse=True)
def default_plugin_state():
    """Every test starts from the installed plugins under default settings, and leaves no
    in-process plugin or changed setting behind."""
    missing = [d for d in ("mlxfun-example-plugin", "mlxfun-broken-plugin") if not _installed(d)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed; run: pip install "
            + " ".join(f"./tests/plugins/{d}" for d in missing)
        )
    unset = dict.fromkeys(("MLXFUN_LOAD_PLUGINS", "MLXFUN_STRICT_PLUGINS", "MLXFUN_TRACE_PLUGINS"))
    with testing.fresh_plugin_state(**unset):
        yield


def run_cli(*args, **environ):
    """The installed ``mlxfun`` console script in a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXFUN_")}
    env.update(environ)
    script = Path(sysconfig.get_path("scripts")) / "mlxfun"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mlxfun.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=120)


def by_key(rows):
    return {(row["kind"], row["name"]): row for row in rows}


def check_listing(rows):
    listed = by_key(rows)
    for (kind, name), description in EXAMPLE.items():
        assert listed[kind, name] == {
            "kind": kind,
            "name": name,
            "distribution": "mlxfun-example-plugin",
            "version": "0.1.0",
            "description": description,
        }
    assert listed["plugin", "broken"] == {
        "kind": "plugin",
        "name": "broken",
        "distribution": "mlxfun-broken-plugin",
        "version": "0.1.0",
        "description": "",
        "error": BROKEN_ERROR,
    }
    # the built-ins are there too, and nothing else failed
    assert listed["adapter", "qwen3_moe"]["distribution"] == "mlxfun-adapters"
    assert listed["scorer", "reap"]["distribution"] == "mlxfun-methods"
    assert [row["name"] for row in rows if "error" in row] == ["broken"]


# ----- listing


def test_cli_lists_the_example_and_the_broken_plugin_in_a_subprocess():
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    check_listing(json.loads(result.stdout))
    assert (
        f"mlxfun: warning: skipped plugin 'broken' from mlxfun-broken-plugin: {BROKEN_ERROR}"
        in (result.stderr)
    )
    assert "Traceback" not in result.stderr


def test_cli_lists_the_example_and_the_broken_plugin_in_process(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    check_listing(rows)
    assert main(["plugins"]) == 0
    table = capsys.readouterr().out
    assert "token_share" in table and "mlxfun-example-plugin" in table
    assert "1 plugin(s) failed:" in table and BROKEN_ERROR in table
    assert main(["plugins", "--json", "--kind", "scorer"]) == 0
    scorers = json.loads(capsys.readouterr().out)
    assert {row["kind"] for row in scorers} == {"scorer"}
    assert "token_share" in {row["name"] for row in scorers}


# ----- the example plugin's objects work by name


def test_the_example_adapter_is_usable_by_name_and_by_config():
    adapter = plugins.get_adapter("example_moe")
    assert plugins.adapter_for_config({"model_type": "example_moe"}) is adapter
    model = build_tiny("qwen3_moe", QWEN3_MOE)  # example_moe blocks are Qwen3-MoE blocks
    observations = testing.check_adapter(adapter, model, "example_moe")
    tokens = mx.array(np.random.default_rng(0).integers(0, 256, (2, 12)))
    with Observer(model, plugins.get_adapter("qwen3_moe")) as observer:
        model(tokens)
    for ours, builtin in zip(observations, observer.observations()):
        np.testing.assert_array_equal(ours.selected, builtin.selected)
        np.testing.assert_allclose(ours.weights, builtin.weights, rtol=1e-6)


def test_the_example_scorer_runs_through_the_stats_collector():
    model = build_tiny("qwen3_moe", QWEN3_MOE, seed=3)
    adapter = plugins.get_adapter("qwen3_moe")
    scorers = [plugins.get_scorer("token_share"), plugins.get_scorer("frequency")]
    layers = adapter.moe_layers(model)
    collector = StatsCollector(scorers, len(layers), layers[0].num_experts)
    rng = np.random.default_rng(0)
    with Observer(model, adapter, collector.needs) as observer:
        for length in (9, 14):  # two batches of different shapes
            model(mx.array(rng.integers(0, 256, (2, length))))
            collector.update(observer.observations())
    scores = collector.scores()
    np.testing.assert_array_equal(collector.token_counts, [46, 46])
    np.testing.assert_allclose(scores["token_share"], scores["frequency"] / 46)
    np.testing.assert_allclose(scores["token_share"].sum(axis=1), [2.0, 2.0])


def test_collect_with_the_example_scorer_while_a_broken_plugin_is_installed(tmp_path, capsys):
    model_dir = write_model_dir(tmp_path / "qwen", "qwen3_moe", QWEN3_MOE)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i} " * 5}) + "\n" for i in range(4)))
    out = tmp_path / "stats.npz"
    args = ["collect", "--model", str(model_dir), "--dataset", str(data), "--output", str(out)]
    assert main([*args, "--scorers", "token_share,frequency,reap"]) == 0
    assert "skipped plugin 'broken'" in capsys.readouterr().err
    stats = load_stats(out)
    shares, counts = stats.score("token_share"), stats.score("frequency")
    np.testing.assert_allclose(shares, counts / stats.token_counts[:, None])
    assert main(["stats", "show", str(out), "--scorer", "token_share"]) == 0


def test_every_installed_scorer_and_selector_conforms():
    failures = []
    for kind, check in (("scorer", testing.check_scorer), ("selector", testing.check_selector)):
        for name in plugins.plugin_names(kind):
            try:
                check(plugins.get_plugin(kind, name))
            except AssertionError as exc:
                failures.append(str(exc))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("model_type, args", [("qwen3_moe", QWEN3_MOE), ("mixtral", MIXTRAL)])
def test_builtin_adapters_pass_the_conformance_kit(model_type, args):
    adapter = plugins.adapter_for_config({"model_type": model_type})
    testing.check_adapter(adapter, build_tiny(model_type, args), model_type)


# ----- errors


def test_unknown_names_give_an_error_listing_the_known_ones():
    with pytest.raises(MlxfunError, match="unknown scorer 'nope'; known scorers: .*reap.*") as exc:
        plugins.get_scorer("nope")
    assert "token_share" in str(exc.value)
    with pytest.raises(MlxfunError, match="unknown adapter 'nope'; known adapters: .*") as exc:
        plugins.get_adapter("nope")
    assert "example_moe" in str(exc.value) and "qwen3_moe" in str(exc.value)
    with pytest.raises(MlxfunError, match="unsupported architecture 'nope_moe'") as exc:
        plugins.adapter_for_config({"model_type": "nope_moe"})
    assert "example_moe" in str(exc.value)


def test_strict_mode_makes_the_broken_plugin_fatal_in_a_subprocess():
    result = run_cli("plugins", MLXFUN_STRICT_PLUGINS="1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: plugin 'broken' from mlxfun-broken-plugin: {BROKEN_ERROR}"
    ]


def test_strict_mode_makes_the_broken_plugin_fatal_in_process(capsys):
    with testing.fresh_plugin_state(MLXFUN_STRICT_PLUGINS="1"):
        assert main(["plugins"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"error: plugin 'broken' from mlxfun-broken-plugin: {BROKEN_ERROR}"
    ]


def test_strict_mode_raises_for_the_broken_plugin():
    with testing.fresh_plugin_state(MLXFUN_STRICT_PLUGINS="1"):
        with pytest.raises(
            MlxfunError, match=f"plugin 'broken' from mlxfun-broken-plugin: {BROKEN_ERROR}"
        ):
            plugins.registry()


def test_strict_mode_is_quiet_without_the_broken_plugin():
    only = "mlxfun-adapters,mlxfun-methods,mlxfun-example-plugin"
    result = run_cli("plugins", "--json", MLXFUN_STRICT_PLUGINS="1", MLXFUN_LOAD_PLUGINS=only)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert ("scorer", "token_share") in by_key(json.loads(result.stdout))


# ----- switches


def test_load_plugins_restricts_loading_in_a_subprocess():
    result = run_cli("plugins", "--json", MLXFUN_LOAD_PLUGINS="mlxfun-core,mlxfun-methods")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {row["distribution"] for row in rows} == {"mlxfun-methods"}
    assert "reap" in {row["name"] for row in rows} and result.stderr == ""


def test_load_plugins_restricts_loading_in_process(capsys):
    with testing.fresh_plugin_state(MLXFUN_LOAD_PLUGINS="mlxfun-core,mlxfun_example_plugin"):
        assert plugins.plugin_names("adapter") == ["example_moe"]
        assert plugins.plugin_names("scorer") == ["token_share"]
        assert plugins.failures() == []
    with testing.fresh_plugin_state(MLXFUN_LOAD_PLUGINS=""):
        assert main(["plugins", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == []
        with pytest.raises(MlxfunError, match="none \\(install mlxfun-adapters\\)"):
            plugins.adapter_for_config({"model_type": "qwen3_moe"})


def test_trace_prints_hook_calls():
    result = run_cli("plugins", MLXFUN_TRACE_PLUGINS="1")
    assert result.returncode == 0, result.stderr
    assert "register_commands [hook]" in result.stderr


def test_trace_prints_the_register_hooks():
    result = run_cli("plugins", MLXFUN_TRACE_PLUGINS="1")
    assert "register_adapters" in result.stderr and "register_scorers" in result.stderr


# ----- mistakes in plugins are reported


class Misspelled:
    @hookimpl
    def register_scorer(self, register):  # the hook is register_scorers
        raise AssertionError("never called")


class AnotherTokenShare:
    name = "token_share"
    description = "a second scorer with the example plugin's name"
    needs = frozenset()

    def init(self, num_layers, num_experts):
        return {}

    def update(self, acc, obs):
        pass

    def finalize(self, acc):
        return np.zeros((1, 1))


class Clashing:
    @hookimpl
    def register_scorers(self, register):
        register(AnotherTokenShare())


def test_a_misspelled_hook_is_reported_not_ignored(capsys):
    with pytest.raises(pluggy.PluginValidationError, match="unknown hook 'register_scorer'"):
        with testing.registered_plugin(Misspelled(), "misspelled"):
            pass
    assert main(["plugins", "--json"]) == 0  # and nothing is left behind
    check_listing(json.loads(capsys.readouterr().out))


def test_two_plugins_registering_the_same_scorer_name_are_reported(capsys):
    with testing.registered_plugin(Clashing(), "clashing", "mlxfun-clashing", "9.9"):
        assert main(["plugins", "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
    token_share = [row for row in rows if row["name"] == "token_share"]
    kept = [row for row in token_share if "error" not in row]
    [reported] = [row for row in token_share if "error" in row]
    assert len(kept) == 1 and reported["kind"] == "scorer"
    assert {kept[0]["distribution"], reported["distribution"]} == {
        "mlxfun-example-plugin",
        "mlxfun-clashing",
    }
    assert f"is already registered by {kept[0]['distribution']}; kept that one" in reported["error"]


class Hello:
    @hookimpl
    def register_commands(self, app):
        @app.command("hello")
        def hello(name: str = "world"):
            """Say hello (a plugin command)."""
            print(f"hello {name}")


def test_plugins_add_cli_commands(capsys):
    with testing.registered_plugin(Hello(), "hello"):
        assert main(["hello", "--name", "moe"]) == 0
        assert capsys.readouterr().out == "hello moe\n"
        assert main(["--help"]) == 0
        help_text = capsys.readouterr().out
    assert "Plugin commands" in help_text and "hello" in help_text


# ----- start-up stays light


def test_help_and_plugins_do_not_import_mlx_or_scipy():
    code = (
        "import sys\n"
        "from mlxfun.cli.app import main\n"
        "main(['plugins']); main(['--help'])\n"
        "heavy = [m for m in ('mlx', 'mlx_lm', 'scipy', 'transformers') if m in sys.modules]\n"
        "print('heavy:', heavy, file=sys.stderr)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXFUN_")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


# ----- the plugin-author guide shows the example package as it is


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "src/mlxfun_example_plugin/__init__.py",
        "src/mlxfun_example_plugin/adapter.py",
        "src/mlxfun_example_plugin/scorer.py",
        "src/mlxfun_example_plugin/selector.py",
        "tests/test_example_plugin.py",
    ],
)
def test_docs_show_the_example_plugin_in_full(path):
    root = Path(__file__).parent
    guide = (root.parent / "docs" / "plugins.md").read_text()
    source = (root / "plugins" / "mlxfun-example-plugin" / path).read_text().rstrip()
    assert f"`{path}`:\n\n```" in guide and f"\n{source}\n```" in guide, (
        f"docs/plugins.md does not show {path} as it is; paste the current file"
    )


# ----- a checkpoint of the example plugin's own architecture (example_moe.py)


def mlxfun_load(path):
    model, tokenizer, _ = load_model(path)
    return model, tokenizer


@pytest.mark.parametrize("model_file", [False, True], ids=["", "model-file"])
@pytest.mark.parametrize("selector,n", [("bottom", 2), ("model-wide", 5)])
def test_example_moe_prunes_exactly(tmp_path, selector, n, model_file):
    """Pruned example_moe logits equal the original's with the removed experts masked out of
    routing (tests/test_prune.py's oracle), both loaded from disk by mlxfun."""
    source = testing.save_tiny_checkpoint(tmp_path / "model", "example_moe", seed=4)
    stats = write_stats(source, tmp_path / "stats.npz")
    output = tmp_path / "pruned"
    request = PruneRequest(
        model=source, stats=stats, output=output, selector=selector, n=n, model_file=model_file
    )
    summary = prune(request)
    assert summary["uniform"] == (selector == "bottom")
    assert summary["model_file"] == (
        "example_moe.py" if model_file and summary["uniform"] else
        None if summary["uniform"] else "mlxfun_nonuniform.py"
    )  # fmt: skip
    assert (output / "example_moe.py").exists() == model_file
    provenance = pruned_matches_masked(
        source, output, plugins.get_adapter("example_moe"), load=mlxfun_load
    )
    assert provenance["experts_after"] != provenance["experts_before"]
    assert type(mlxfun_load(output)[0]).__module__ in (
        "mlxfun_example_plugin.example_moe",
        "mlxfun_nonuniform_model",
    )


def test_example_moe_merges_and_model_file_loads_in_stock_mlx_lm(tmp_path, capsys):
    source = testing.save_tiny_checkpoint(tmp_path / "model", "example_moe", seed=4)
    stats = write_stats(source, tmp_path / "stats.npz")
    dataset = tmp_path / "calib.txt"
    dataset.write_text("Experts are merged into the kept ones, weighted by saliency.\n" * 8)
    output = tmp_path / "merged"
    args = ["merge", "--model", source, "--stats", stats, "--dataset", dataset, "--n", "2"]
    assert main([*map(str, args), "--model-file", "-o", str(output)]) == 0
    assert "model_file example_moe.py: a copy of the plugin's model module" in (
        capsys.readouterr().out
    )
    ours, _ = mlxfun_load(output)
    stock, _ = mlx_lm_load(str(output), trust_remote_code=True)
    assert type(stock).__module__ == "custom_model"
    assert [layer.mlp.gate.weight.shape[0] for layer in ours.layers] == [6, 6]
    np.testing.assert_array_equal(np.array(stock(TOKENS)), np.array(ours(TOKENS)))


def test_model_file_is_refused_for_mlx_lm_architectures(tmp_path, capsys):
    source = write_model_dir(tmp_path / "qwen", "qwen3_moe", QWEN3_MOE)
    stats = write_stats(source, tmp_path / "stats.npz")
    args = ["prune", "--model", source, "--stats", stats, "--n", "2", "--model-file", "-o"]
    assert main([*map(str, args), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --model-file copies a plugin's model module, and model type")
    assert not (tmp_path / "out").exists()


# transformers reads config.json while loading the tokenizer, and warns that it does not know
# the model type; mlxfun's loader drops exactly that warning, stock mlx-lm's does not.
LOAD_TWICE = """
import sys
from mlxfun.core.models import load_model
load_model(sys.argv[1])
print("--- stock", file=sys.stderr, flush=True)
from mlx_lm.utils import load_tokenizer
from pathlib import Path
load_tokenizer(Path(sys.argv[1]))
"""


def test_loading_a_plugin_architecture_prints_no_transformers_warning(tmp_path):
    model = testing.save_tiny_checkpoint(tmp_path / "model", "example_moe")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXFUN_")}
    env["MLXFUN_LOAD_PLUGINS"] = "mlxfun-adapters,mlxfun-methods,mlxfun-example-plugin"
    result = subprocess.run(
        [sys.executable, "-c", LOAD_TWICE, str(model)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    ours, stock = result.stderr.split("--- stock\n")
    assert ours == ""
    assert "You are using a model of type `example_moe`" in stock  # what was dropped
