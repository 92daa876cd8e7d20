"""Bad input on the command line gives exactly one ``error: ...`` line, never a traceback:
a model directory without weights, an output that cannot be written, a stats file that is not
one."""

import json
import shutil

import pytest
from mlxfun.cli.app import main

from .test_safety import one_error_line, tiny, write_stats  # noqa: F401  (fixture)

UNWRITABLE = "/proc/mlxfun-test-unwritable"


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "def f(x):\n    return x * 2\n"}) + "\n")
    return path


@pytest.fixture
def no_weights(tiny, tmp_path):  # noqa: F811
    nows = tmp_path / "nows"
    nows.mkdir()
    for path in tiny[0].iterdir():
        if not path.name.endswith(".safetensors") and path.is_file():
            shutil.copy2(path, nows / path.name)
    return nows


def test_model_without_weights(no_weights, data, tmp_path, capsys):
    commands = [
        ["inspect", str(no_weights)],
        ["smoke-test", str(no_weights)],
        ["collect", "--model", str(no_weights), "--dataset", str(data), "-o", str(tmp_path / "s")],
        ["eval", "--model", str(no_weights), "--dataset", str(data)],
    ]
    for command in commands:
        assert main(command) == 1, command
        line = one_error_line(capsys, progress="evaluating ")
        assert str(no_weights) in line and "safetensors" in line, line


def test_unwritable_outputs(tiny, data, capsys):  # noqa: F811
    model, stats = tiny
    assert main(["prune", "--model", str(model), "--stats", str(stats), "--n", "2",
                 "-o", UNWRITABLE]) == 1  # fmt: skip
    assert UNWRITABLE in one_error_line(capsys)
    out = UNWRITABLE + ".npz"
    assert main(["collect", "--model", str(model), "--dataset", str(data), "-o", out]) == 1
    assert out in one_error_line(capsys)


def test_stats_that_is_not_a_stats_file(tiny, tmp_path, capsys):  # noqa: F811
    model, _ = tiny
    for name, content in (("notes.txt", b"hello\n"), ("fake.npz", b"PK\x03\x04 broken")):
        bad = tmp_path / name
        bad.write_bytes(content)
        assert main(["prune", "--model", str(model), "--stats", str(bad), "--n", "2",
                     "--dry-run"]) == 1  # fmt: skip
        line = one_error_line(capsys)
        assert line == f"error: {bad} is not an mlxfun stats file (.npz from mlxfun collect)"
    assert main(["stats", "show", str(tmp_path / "notes.txt")]) == 1
    assert "is not an mlxfun stats file" in one_error_line(capsys)


def test_stats_output_that_is_a_directory(tiny, tmp_path, capsys):  # noqa: F811
    with pytest.raises(Exception, match="is a directory"):
        write_stats(tiny[0], tmp_path)


@pytest.fixture(scope="module")
def dense0(tmp_path_factory):
    """A model whose decoder layer 0 is dense: MoE layers 1 and 2 are positions 0 and 1."""
    from .adapters.test_examples import QWEN3_MOE
    from .model_dirs import write_model_dir

    root = tmp_path_factory.mktemp("dense0")
    args = {**QWEN3_MOE, "num_hidden_layers": 3, "mlp_only_layers": [0]}
    model = write_model_dir(root / "dense0", "qwen3_moe", args)
    return model, write_stats(model, root / "dense0.npz")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--protect", "2:0..6"], "layer 2 can lose at most 1"),
        (["--target", "1:9"], "do not exist in layer 1"),
        (["--min-keep", "9"], "min_keep 9 is more than the 8 experts of layer 1"),
        (["--normalize", "mean"], "only applies to the model-wide selector"),
        (["--selector", "strided", "--normalize", "max"], "only applies to the model-wide"),
        (["--normalize", "zscore"], "unknown normalize 'zscore'"),
    ],
)
def test_selector_errors_name_decoder_layers(dense0, capsys, extra, message):
    model, stats = dense0
    command = ["prune", "--model", str(model), "--stats", str(stats), "--n", "2", "--dry-run"]
    assert main([*command, *extra]) == 1
    line = one_error_line(capsys)
    assert message in line, line
