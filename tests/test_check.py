"""``mlxfun smoke-test`` and ``mlxfun eval`` on tiny model directories."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlxfun.cli.app import main
from mlxfun.methods.evaluate import degenerate_reason

from .adapters.test_examples import MIXTRAL, QWEN3_MOE
from .model_dirs import write_model_dir
from .test_prune import write_stats


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    source = write_model_dir(root / "model", "qwen3_moe", QWEN3_MOE)
    stats = write_stats(source, root / "stats.npz")
    pruned = root / "pruned"
    wide = root / "wide"
    assert (
        main(
            ["prune", "--model", str(source), "--stats", str(stats), "--n", "2", "-o", str(pruned)]
        )
        == 0
    )
    assert (
        main(
            [
                "prune",
                "--model",
                str(source),
                "--stats",
                str(stats),
                "--selector",
                "model-wide",
                "--n",
                "3",
                "-o",
                str(wide),
            ]
        )
        == 0
    )
    data = root / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": f"The {w} sat on the mat and looked at the {w} again."}) + "\n"
            for w in ["cat", "dog", "owl", "fox"]
        )
    )
    return source, pruned, wide, data


@pytest.mark.parametrize(
    "tokens, text, reason",
    [
        ([], "", "no tokens"),
        ([3, 4], "  ", "blank text"),
        ([7, 7, 7], "aaa", "token 7 repeated 3 times"),
        ([1, 2, 2, 2, 2, 2, 2, 2, 2, 2], "abbbbbbbbb", "token 2 is 9 of 10 tokens"),
        ([1, 2, 3, 2], "abcb", None),
        ([5], "x", None),
    ],
)
def test_degenerate_reason(tokens, text, reason):
    assert degenerate_reason(tokens, text) == reason


def test_smoke_test_prints_text_and_speed(models, capsys):
    _, pruned, wide, _ = models
    for model in (pruned, wide):
        code = main(
            ["smoke-test", str(model), "--max-tokens", "6", "--json", "-p", "hello", "-p", "abc"]
        )
        result = json.loads(capsys.readouterr().out)
        assert [row["prompt"] for row in result["prompts"]] == ["hello", "abc"]
        for row in result["prompts"]:
            assert 0 <= row["tokens"] <= 6 and row["tokens_per_s"] >= 0
            assert row["degenerate"] == bool(row["reason"])
        assert code == (1 if result["degenerate"] else 0)
    main(["smoke-test", str(pruned), "--max-tokens", "4", "--raw"])
    out = capsys.readouterr().out
    assert "tokens/s" in out and "outputs look healthy" in out


def test_smoke_test_flags_a_model_that_only_ends(models, tmp_path, capsys):
    """All-zero output weights: every logit ties and token 0 (end of sequence) wins."""
    source, *_ = models
    broken = write_model_dir(tmp_path / "broken", "qwen3_moe", QWEN3_MOE)
    weights = dict(mx.load(str(broken / "model.safetensors")))
    weights["lm_head.weight"] = mx.zeros_like(weights["lm_head.weight"])
    mx.save_safetensors(str(broken / "model.safetensors"), weights, {"format": "mlx"})
    assert main(["smoke-test", str(broken), "--max-tokens", "4", "-p", "hi"]) == 1
    assert "DEGENERATE: no tokens" in capsys.readouterr().out


def test_eval_side_by_side(models, capsys):
    source, pruned, wide, data = models
    args = [
        "eval",
        "--model",
        str(source),
        "--model",
        str(pruned),
        "--model",
        str(wide),
        "--model",
        str(source),
    ]
    assert (
        main([*args, "--dataset", str(data), "--gen-tokens", "6", "--prompt-tokens", "8", "--json"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    rows = result["models"]
    assert [r["model"] for r in rows] == [str(source), str(pruned), str(wide), str(source)]
    assert result["tokens"] == sum(r["tokens"] for r in rows) / 4 > 0
    for row in rows:
        assert np.isfinite(row["perplexity"]) and row["perplexity"] == pytest.approx(
            np.exp(row["nll"])
        )
        assert 0 <= row["top1_agreement"] <= 1 and 0 <= row["greedy_agreement"] <= 1
    assert rows[0]["top1_agreement"] == rows[3]["top1_agreement"] == 1.0
    assert rows[3]["perplexity"] == rows[0]["perplexity"] and rows[3]["greedy_prefix"] == 6
    assert rows[1]["perplexity"] != rows[0]["perplexity"]
    assert main([*args[:5], "--dataset", str(data)]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "agreement is against the first model" in out


def test_eval_refuses_models_with_another_vocabulary(models, tmp_path, capsys):
    source, _, _, data = models
    small = write_model_dir(tmp_path / "small", "mixtral", dict(MIXTRAL, vocab_size=64))
    assert (
        main(["eval", "--model", str(source), "--model", str(small), "--dataset", str(data)]) == 1
    )
    assert "share a tokenizer" in capsys.readouterr().err
