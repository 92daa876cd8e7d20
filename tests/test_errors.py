"""Bad input on the command line gives exactly one ``error: ...`` line, never a traceback:
a model directory without weights, an output that cannot be written, a stats file that is not
one."""

import json
import shutil
import struct

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


# ---------------------------------------------------------------------------------------------
# Damaged weight files (an interrupted download or conversion): every command that reads a
# model stops with one line naming the file and the fix, before it loads or writes anything.


def shard_parts(data: bytes) -> tuple[dict, bytes]:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def with_header(header, body: bytes) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def offsets_past_the_end(data: bytes) -> bytes:
    """The last tensor moved 4 KiB further, its size unchanged: it now ends past the file."""
    header, body = shard_parts(data)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    header[last]["data_offsets"] = [x + 4096 for x in header[last]["data_offsets"]]
    return with_header(header, body)


def unsupported_dtype(data: bytes) -> bytes:
    """A header that parses and fits the file but that mlx refuses: only mlx can tell."""
    header, body = shard_parts(data)
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "Q9"
    return with_header(header, body)


DAMAGE = {
    "truncated data": lambda data: data[: len(data) - len(shard_parts(data)[1]) // 2],
    "truncated header": lambda data: data[: 8 + (len(data) - len(shard_parts(data)[1]) - 8) // 2],
    "garbage header": lambda data: with_header(b'{"not json', shard_parts(data)[1]),
    "offsets past the end": offsets_past_the_end,
    "zero bytes": lambda data: b"",
    "shape does not match its bytes": lambda data: with_header(
        {
            **shard_parts(data)[0],
            "lm_head.weight": {**shard_parts(data)[0]["lm_head.weight"], "shape": [1, 2, 3]},
        },
        shard_parts(data)[1],
    ),  # fmt: skip
    "unsupported dtype": unsupported_dtype,
}


@pytest.fixture(params=list(DAMAGE))
def damaged(request, tiny, tmp_path):  # noqa: F811
    model = tmp_path / "damaged"
    shutil.copytree(tiny[0], model)
    shard = model / "model.safetensors"
    shard.write_bytes(DAMAGE[request.param](shard.read_bytes()))
    return model, shard


def model_commands(model, stats, data, out):
    m, s, d = str(model), str(stats), str(data)
    prune = ["prune", "--model", m, "--stats", s, "--n", "2"]
    merge = ["merge", "--model", m, "--stats", s, "--n", "2"]
    return [
        ["collect", "--model", m, "--dataset", d, "-o", str(out / "stats.npz")],
        [*prune, "-o", str(out / "pruned")],
        [*prune, "--dry-run"],
        [*merge, "--dataset", d, "-o", str(out / "merged")],
        [*merge, "--dry-run"],
        ["eval", "--model", m, "--dataset", d],
        ["smoke-test", m],
        ["inspect", m],
    ]


def test_damaged_weights_give_one_line_naming_the_file(damaged, tiny, data, tmp_path, capsys):  # noqa: F811
    model, shard = damaged
    before = shard.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    for command in model_commands(model, tiny[1], data, out):
        assert main(command) == 1, command
        line = one_error_line(capsys, progress="evaluating ")
        assert str(shard) in line and "re-download" in line, (command, line)
    assert list(out.iterdir()) == []  # nothing written, not even a temporary output
    assert shard.read_bytes() == before


def test_a_damaged_later_model_stops_eval_before_the_first_runs(tiny, data, tmp_path, capsys):  # noqa: F811
    bad = tmp_path / "bad"
    shutil.copytree(tiny[0], bad)
    (bad / "model.safetensors").write_bytes(b"")
    assert main(["eval", "--model", str(tiny[0]), "--model", str(bad), "--dataset", str(data)]) == 1
    err = capsys.readouterr().err
    assert "evaluating" not in err and f"{bad / 'model.safetensors'} is 0 bytes long" in err


def test_the_damaged_shard_of_several_is_named(tmp_path):
    """mlx's own error names no file: the one that mlx refuses is found and named."""
    import mlx.core as mx
    from mlxfun.core import slicing
    from mlxfun.core.errors import MlxfunError

    first, second = (tmp_path / f"model-0000{i}-of-00002.safetensors" for i in (1, 2))
    mx.save_safetensors(str(first), {"a": mx.zeros((4, 2))})
    mx.save_safetensors(str(second), {"b": mx.ones((3,))})
    slicing.check_weights(tmp_path)
    slicing.check_weights_mlx(tmp_path)
    second.write_bytes(unsupported_dtype(second.read_bytes()))
    slicing.check_weights(tmp_path)  # the header is sound: only mlx can refuse it
    with pytest.raises(MlxfunError, match=f"^{second} cannot be read by mlx .*unsupported dtype"):
        slicing.check_weights_mlx(tmp_path)
    second.write_bytes(second.read_bytes()[:-4])
    with pytest.raises(MlxfunError, match=f"^{second} is truncated: its tensors need 12 bytes"):
        slicing.check_weights(tmp_path)


def test_a_damaged_weight_index_is_one_line(tiny, tmp_path, capsys):  # noqa: F811
    model = tmp_path / "badindex"
    shutil.copytree(tiny[0], model)
    index = model / "model.safetensors.index.json"
    index.write_text(index.read_text()[:40])
    assert main(["prune", "--model", str(model), "--stats", str(tiny[1]), "--n", "2",
                 "--dry-run"]) == 1  # fmt: skip
    line = one_error_line(capsys)
    assert str(index) in line and "re-download" in line, line
