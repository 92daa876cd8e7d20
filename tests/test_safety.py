"""mlxfun never runs a model directory's Python and never deletes or modifies its inputs:
``model_file`` other than mlxfun's own non-uniform one is refused (and that one is built from
mlxfun's template, not from the file on disk); ``--output`` may not contain or lie inside an
input; ``--force`` replaces only a previous model output; stale temporary outputs are cleaned."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlxfun.cli.app import main
from mlxfun.core import plugins, slicing
from mlxfun.core.config import read_config
from mlxfun.core.errors import MlxfunError
from mlxfun.core.models import load_model
from mlxfun.core.outputs import atomic_output_dir, run_tag
from mlxfun.core.stats import model_fingerprint, save_stats

from .adapters.test_examples import QWEN3_MOE
from .model_dirs import write_model_dir


def write_stats(model_dir, path, seed=0):
    config = read_config(model_dir)
    adapter = plugins.adapter_for_config(config)
    plans = slicing.layer_plans(slicing.model_skeleton(model_dir)[0], adapter)
    scores = np.random.default_rng(seed).random((len(plans), max(p.num_experts for p in plans)))
    metadata = {
        "fingerprint": model_fingerprint(config, plans),
        "moe_layers": [p.index for p in plans],
    }
    save_stats(path, {"reap": scores}, {}, np.zeros(len(plans), dtype=np.int64), metadata)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    model = write_model_dir(root / "tiny", "qwen3_moe", QWEN3_MOE)
    return model, write_stats(model, root / "stats.npz")


def one_error_line(capsys, progress: str | None = None) -> str:
    """The one ``error: ...`` line on stderr (besides progress lines starting ``progress``)."""
    err = capsys.readouterr().err
    # (a deliberately broken plugin of the test environment may warn when it is skipped)
    skip = ("mlxfun: warning: skipped", *([progress] if progress else []))
    lines = [x for x in err.strip().splitlines() if not x.startswith(skip)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def tree(path: Path) -> dict:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


EVIL = """from pathlib import Path
Path(__file__).with_name("RAN").write_text("the model file ran")
print("EVIL CODE RAN")
"""


def evil_copy(source: Path, destination: Path, config_edit) -> Path:
    shutil.copytree(source, destination)
    config = json.loads((destination / "config.json").read_text())
    config_edit(config)
    (destination / "config.json").write_text(json.dumps(config))
    return destination


# ---------------------------------------------------------------------------------------------
# model_file: never executed


def test_foreign_model_file_is_refused_not_run(tiny, tmp_path, capsys):
    evil = evil_copy(tiny[0], tmp_path / "evil", lambda c: c.update(model_file="evil.py"))
    (evil / "evil.py").write_text(EVIL)
    for command in (["inspect", str(evil)], ["smoke-test", str(evil)]):
        assert main(command) == 1
        line = one_error_line(capsys)
        assert "evil.py" in line and "never runs" in line
    with pytest.raises(MlxfunError, match="never runs"):
        load_model(evil)
    assert not (evil / "RAN").exists()


def prune_cli(model, stats, output, *extra):
    return main(["prune", "--model", str(model), "--stats", str(stats), "-o", str(output), *extra])


def test_nonuniform_output_is_built_from_the_template_not_the_file(tiny, tmp_path, capsys):
    model, stats = tiny
    wide = tmp_path / "wide"
    assert prune_cli(model, stats, wide, "--selector", "model-wide", "--n", "3") == 0
    config = read_config(wide)
    assert config["model_file"] == "mlxfun_nonuniform.py"
    (wide / "mlxfun_nonuniform.py").write_text(EVIL + (wide / "mlxfun_nonuniform.py").read_text())
    loaded, _, _ = load_model(wide)
    counts = sorted(layer["num_experts"] for layer in config["mlxfun"]["nonuniform"]["layers"])
    assert counts[0] != counts[-1]
    assert main(["inspect", str(wide)]) == 0
    assert not (wide / "RAN").exists()
    assert "EVIL" not in capsys.readouterr().out


def test_nonuniform_base_module_cannot_inject_code(tiny, tmp_path, capsys):
    model, stats = tiny
    wide = tmp_path / "wide"
    assert prune_cli(model, stats, wide, "--selector", "model-wide", "--n", "3") == 0
    marker = tmp_path / "RAN"
    payload = f'x"\nopen({str(marker)!r}, "w").write("ran")\n#'

    def edit(config):
        config["mlxfun"]["nonuniform"]["base_module"] = payload

    bad = evil_copy(wide, tmp_path / "bad", edit)
    assert main(["inspect", str(bad)]) == 1
    assert "base_module" in one_error_line(capsys)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# --output and --force never destroy an input or anything but a previous model output


def hidden_siblings(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture
def parent(tiny, tmp_path):
    """``par/tiny`` (a model) and ``par/stats.npz`` (its stats), all inside ``par``."""
    par = tmp_path / "par"
    par.mkdir()
    shutil.copytree(tiny[0], par / "tiny")
    shutil.copy2(tiny[1], par / "stats.npz")
    return par


def test_force_refuses_an_output_that_contains_the_inputs(parent, capsys, monkeypatch):
    model, stats = parent / "tiny", parent / "stats.npz"
    before = tree(parent)
    assert prune_cli(model, stats, parent, "--n", "2", "--force") == 1
    assert "contains the input" in one_error_line(capsys)
    monkeypatch.chdir(parent)
    assert prune_cli("tiny", "stats.npz", ".", "--n", "2", "--force") == 1
    assert "contains the input" in one_error_line(capsys)
    assert tree(parent) == before and hidden_siblings(parent) == []


def test_stats_inside_the_output_is_refused_too(parent, tiny, capsys):
    (parent / "mlxfun.json").write_text("{}")  # looks like a model output
    before = tree(parent)
    assert prune_cli(tiny[0], parent / "stats.npz", parent, "--n", "2", "--force") == 1
    assert "contains the input" in one_error_line(capsys)
    assert prune_cli(tiny[0], parent / "stats.npz", parent / "stats.npz", "--n", "2") == 1
    assert "is the input" in one_error_line(capsys)
    assert tree(parent) == before


def test_output_inside_the_input_is_refused(parent, capsys):
    model, stats = parent / "tiny", parent / "stats.npz"
    before = tree(parent)
    for output in (model / "pruned", model):
        assert prune_cli(model, stats, output, "--n", "2", "--force") == 1
        line = one_error_line(capsys)
        assert "is inside the input" in line or "is the input" in line
    assert tree(parent) == before


def test_force_replaces_only_a_previous_model_output(tiny, tmp_path, capsys, monkeypatch):
    model, stats = tiny
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("keep me")
    monkeypatch.chdir(work)
    assert prune_cli(model, stats, ".", "--n", "2", "--force") == 1
    assert "is not an mlxfun output" in one_error_line(capsys)
    assert (work / "precious.txt").read_text() == "keep me"

    a_file = tmp_path / "out.bin"
    a_file.write_text("not a model")
    assert prune_cli(model, stats, a_file, "--n", "2", "--force") == 1
    assert "not a model directory" in one_error_line(capsys)
    assert a_file.read_text() == "not a model"

    out = tmp_path / "out"
    assert prune_cli(model, stats, out, "--n", "2") == 0
    assert prune_cli(model, stats, out, "--n", "2") == 1
    assert "already exists" in one_error_line(capsys)
    assert prune_cli(model, stats, out, "--n", "3", "--force") == 0
    assert read_config(out)["num_experts"] == QWEN3_MOE["num_experts"] - 3
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_merge_refuses_an_output_that_contains_its_dataset(parent, tiny, capsys):
    pytest.importorskip("scipy")
    data = parent / "data.jsonl"
    data.write_text(json.dumps({"text": "def f(x):\n    return x\n"}) + "\n")
    (parent / "mlxfun.json").write_text("{}")  # looks like a model output
    before = tree(parent)
    merge = ["merge", "--model", str(tiny[0]), "--stats", str(tiny[1]), "--n", "2"]
    assert main([*merge, "--dataset", str(data), "-o", str(parent), "--force"]) == 1
    assert "contains the input" in one_error_line(capsys)
    assert tree(parent) == before


def test_atomic_output_dir_checks_every_input(tmp_path):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "mlxfun.json").write_text("{}")
    with pytest.raises(MlxfunError, match="contains the input"):
        with atomic_output_dir(out, force=True, inputs=(tmp_path / "elsewhere", out / "data")):
            pass
    assert (out / "data").is_dir()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_later_runs_remove_stale_temporary_outputs(tiny, tmp_path):
    model, stats = tiny
    out = tmp_path / "out"
    host = run_tag().split("-")[0]
    dead, alive = f"{host}-{dead_pid()}", f"{host}-{os.getppid()}"
    stale = tmp_path / f".out.tmp-{dead}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    stale_old = tmp_path / f".out.old-{dead}"
    stale_old.mkdir()
    running = tmp_path / f".out.tmp-{alive}"
    running.mkdir()
    other = tmp_path / f".other.tmp-{dead}"
    other.mkdir()
    elsewhere = tmp_path / ".out.tmp-anotherhost-1"  # a pid of another machine means nothing here
    elsewhere.mkdir()
    assert prune_cli(model, stats, out, "--n", "2") == 0
    assert not stale.exists()
    # killed between its two renames: the .old is the only copy of the previous output
    assert stale_old.is_dir()
    assert running.is_dir() and other.is_dir()  # a live run, and another output's leftovers
    assert elsewhere.is_dir()
    assert prune_cli(model, stats, out, "--n", "2", "--force") == 0
    assert not stale_old.exists()
    assert running.is_dir() and other.is_dir()

    stale_stats = tmp_path / f".s.npz.tmp-{dead}.npz"
    stale_stats.write_bytes(b"partial")
    write_stats(model, tmp_path / "s.npz")
    assert not stale_stats.exists()


# ---------------------------------------------------------------------------------------------
# inputs named another way, output files, weak markers


def test_an_input_reached_through_another_name_is_still_refused(parent, tmp_path, capsys):
    """A link to the folder stands in for what case-insensitive file systems (APFS) and bind
    mounts do: another string for the same folder. Identity, not spelling, decides."""
    alias = tmp_path / "alias"
    alias.symlink_to(parent)
    (parent / "mlxfun.json").write_text("{}")
    before = tree(parent)
    assert prune_cli(parent / "tiny", parent / "stats.npz", alias, "--n", "2", "--force") == 1
    assert "contains the input" in one_error_line(capsys)
    assert tree(parent) == before


def test_force_does_not_replace_a_directory_with_only_a_config(parent, tiny, capsys):
    other = parent / "other-model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert prune_cli(tiny[0], tiny[1], other, "--n", "2", "--force") == 1
    assert "is not an mlxfun output (no mlxfun.json)" in one_error_line(capsys)
    assert (other / "config.json").read_text() == "{}"


def test_collect_and_stats_merge_never_overwrite_their_inputs(tiny, tmp_path, capsys):
    data = tmp_path / "calib.jsonl"
    data.write_text('{"text": "def f(x):\\n    return x + 1"}\n')
    before = data.read_bytes()
    collect = ["collect", "--model", str(tiny[0]), "--dataset", str(data), "--scorers", "reap"]
    assert main([*collect, "--output", str(data)]) == 1
    assert "is the input" in one_error_line(capsys)
    weights = tiny[0] / "model.safetensors"
    assert main([*collect, "--output", str(weights)]) == 1
    assert "is inside the input" in one_error_line(capsys)
    assert data.read_bytes() == before and weights.is_file()
    stats = tmp_path / "a.npz"
    shutil.copy2(tiny[1], stats)
    kept = stats.read_bytes()
    assert main(["stats", "merge", str(stats), str(tiny[1]), "-o", str(stats)]) == 1
    assert "is the input" in one_error_line(capsys)
    assert stats.read_bytes() == kept
