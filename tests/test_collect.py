"""``mlxfun collect`` / ``stats`` / ``inspect`` end to end on tiny model directories."""

import json

import numpy as np
import pytest
from mlxfun.cli.app import main
from mlxfun.core.errors import MlxfunError
from mlxfun.core.stats import check_fingerprint, load_stats

from .adapters.test_examples import MIXTRAL, QWEN3_MOE
from .model_dirs import write_model_dir

CODE = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(6)]
PROSE = [
    f"The {w} walked along the river and the {w} sang a song."
    for w in "cat dog bird fox owl".split()
]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("m") / "qwen", "qwen3_moe", QWEN3_MOE)


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "code.jsonl", CODE), write_jsonl(tmp_path / "prose.jsonl", PROSE)


def collect(model_dir, datasets, output, *extra):
    args = ["collect", "--model", str(model_dir), "--output", str(output)]
    for d in datasets:
        args += ["--dataset", str(d)]
    assert main([*args, *extra]) == 0
    return load_stats(output)


def test_stats_file_format(qwen_dir, data, tmp_path):
    stats = collect(qwen_dir, data, tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz", allow_pickle=False) as raw:
        for name in (
            "frequency",
            "weighted_frequency",
            "ean_sum",
            "ean_mean",
            "reap",
            "max_activation",
            "random",
        ):
            assert raw[name].dtype == np.float64 and raw[name].shape == (2, 8)
        meta = json.loads(str(raw["metadata"]))
    assert meta["format_version"] == 1
    assert meta["fingerprint"]["model_type"] == "qwen3_moe"
    assert meta["moe_layers"] == [0, 1]
    total = sum(len(t.encode()) for t in CODE + PROSE)
    assert meta["tokens_seen"] == total
    # every token is routed to exactly top-k experts, padding never counts
    assert stats.token_counts.tolist() == [total, total]
    np.testing.assert_array_equal(stats.scores["frequency"].sum(axis=1), [2 * total, 2 * total])


def test_batching_does_not_change_statistics(qwen_dir, data, tmp_path):
    one = collect(qwen_dir, data, tmp_path / "a.npz", "--batch-size", "1")
    many = collect(qwen_dir, data, tmp_path / "b.npz", "--batch-size", "5")
    for name in ("frequency", "reap", "ean_mean", "weighted_frequency"):
        np.testing.assert_allclose(one.scores[name], many.scores[name], rtol=1e-5, err_msg=name)


def test_merge_by_sum_equals_one_collect_over_both(qwen_dir, data, tmp_path):
    code, prose = data
    a = tmp_path / "code.npz"
    b = tmp_path / "prose.npz"
    collect(qwen_dir, [code], a, "--batch-size", "1")
    collect(qwen_dir, [prose], b, "--batch-size", "1")
    both = collect(qwen_dir, [code, prose], tmp_path / "both.npz", "--batch-size", "1")
    assert main(["stats", "merge", str(a), str(b), "-o", str(tmp_path / "m.npz")]) == 0
    merged = load_stats(tmp_path / "m.npz")
    for name in (
        "frequency",
        "weighted_frequency",
        "ean_sum",
        "ean_mean",
        "reap",
        "max_activation",
        "random",
    ):
        np.testing.assert_allclose(merged.scores[name], both.scores[name], rtol=1e-6, err_msg=name)
    assert merged.token_counts.tolist() == both.token_counts.tolist()


def test_rank_merge_sums_within_layer_ranks(qwen_dir, data, tmp_path):
    code, prose = data
    collect(qwen_dir, [code], tmp_path / "a.npz")
    collect(qwen_dir, [prose], tmp_path / "b.npz")
    assert (
        main(
            [
                "stats",
                "merge",
                str(tmp_path / "a.npz"),
                str(tmp_path / "b.npz"),
                "-o",
                str(tmp_path / "r.npz"),
                "--mode",
                "rank",
            ]
        )
        == 0
    )
    ranked = load_stats(tmp_path / "r.npz").scores["reap"]
    a = load_stats(tmp_path / "a.npz").scores["reap"]
    b = load_stats(tmp_path / "b.npz").scores["reap"]
    expected = np.argsort(np.argsort(a, axis=1, kind="stable"), axis=1) + np.argsort(
        np.argsort(b, axis=1, kind="stable"), axis=1
    )
    np.testing.assert_array_equal(ranked, expected)


def test_stats_from_another_model_are_refused(qwen_dir, data, tmp_path, capsys):
    other = write_model_dir(tmp_path / "mixtral", "mixtral", MIXTRAL)
    mine = collect(qwen_dir, data, tmp_path / "q.npz")
    theirs = collect(other, data, tmp_path / "x.npz")
    with pytest.raises(MlxfunError, match="collected on another model"):
        check_fingerprint(theirs, mine.fingerprint, "x.npz")
    capsys.readouterr()
    merge = ["stats", "merge", str(tmp_path / "q.npz"), str(tmp_path / "x.npz")]
    assert main([*merge, "-o", str(tmp_path / "bad.npz")]) == 1
    assert "cannot merge stats of different models" in capsys.readouterr().err


def test_seeded_subsample_and_random_scorer(qwen_dir, data, tmp_path):
    a = collect(qwen_dir, data, tmp_path / "a.npz", "--max-samples", "4", "--seed", "3")
    b = collect(qwen_dir, data, tmp_path / "b.npz", "--max-samples", "4", "--seed", "3")
    c = collect(qwen_dir, data, tmp_path / "c.npz", "--max-samples", "4", "--seed", "4")
    np.testing.assert_array_equal(a.scores["frequency"], b.scores["frequency"])
    np.testing.assert_array_equal(a.scores["random"], b.scores["random"])
    assert not np.array_equal(a.scores["random"], c.scores["random"])
    assert a.metadata["samples"] == 4


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": "ok"\n', "bad.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n\n["a"]\n', "bad.jsonl:3: expected a JSON object"),
        ('{"txt": "ok"}\n', "bad.jsonl:1: no 'text'"),
        ('{"messages": [{"role": "user"}]}\n', "bad.jsonl:1: every message needs"),
    ],
)
def test_malformed_dataset_lines_name_file_and_line(qwen_dir, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    assert (
        main(
            [
                "collect",
                "--model",
                str(qwen_dir),
                "--dataset",
                str(bad),
                "-o",
                str(tmp_path / "s.npz"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "s.npz").exists()


def test_missing_paths_and_unknown_names(qwen_dir, data, tmp_path, capsys):
    out = str(tmp_path / "s.npz")
    assert (
        main(["collect", "--model", str(tmp_path / "nope"), "--dataset", str(data[0]), "-o", out])
        == 1
    )
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "collect",
                "--model",
                str(qwen_dir),
                "--dataset",
                str(tmp_path / "none.jsonl"),
                "-o",
                out,
            ]
        )
        == 1
    )
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "collect",
                "--model",
                str(qwen_dir),
                "--dataset",
                str(data[0]),
                "-o",
                out,
                "--scorers",
                "reap,nope",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "unknown scorer 'nope'" in err and "reap" in err
    assert main(["stats", "show", str(tmp_path / "missing.npz")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_unsupported_architecture_lists_supported(tmp_path, capsys, data):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert (
        main(
            [
                "collect",
                "--model",
                str(model),
                "--dataset",
                str(data[0]),
                "-o",
                str(tmp_path / "s.npz"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "unsupported architecture 'llama'" in err and "qwen3_moe" in err


def test_stats_show_and_inspect_json(qwen_dir, data, tmp_path, capsys):
    collect(qwen_dir, data, tmp_path / "s.npz")
    capsys.readouterr()
    assert main(["stats", "show", str(tmp_path / "s.npz"), "--scorer", "frequency", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [row["layer"] for row in shown["layers"]] == [0, 1]
    assert main(["inspect", str(qwen_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [layer["experts"] for layer in report["layers"]] == [8, 8]
    sizes = {row["part"]: row for row in report["sizes"]}
    # 2 layers x 8 experts x 3 projections x (64 x 32)
    assert sizes["experts"]["parameters"] == 2 * 8 * 3 * 64 * 32
    assert sizes["routers"]["parameters"] == 2 * 8 * 64
