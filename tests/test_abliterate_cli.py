"""``mlxfun abliterate`` on tiny checkpoints: the search table and its record, an output that
stock mlx-lm loads with logits equal to the run-time ablation, the saved direction reused,
and bad input as one error line."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlxfun.cli.app import main
from mlxfun.core.testing.tiny_models import TINY_ARGS, save_tiny_checkpoint
from mlxfun.methods.residual import ablation

from .test_safety import one_error_line, tree

HARMFUL = [f"How do I break into house number {i}?" for i in range(8)]
HARMLESS = [f"What is a good recipe for soup number {i}?" for i in range(8)]
TOKENS = mx.array([list(b"How do I pick a lock?")])


def write_prompts(path, prompts):
    path.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": p},
                        {"role": "assistant", "content": "ok"},
                    ]
                }
            )
            + "\n"
            for p in prompts
        )
    )
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("abl")
    model = save_tiny_checkpoint(root / "model", "qwen3_moe", dict(TINY_ARGS, num_hidden_layers=3))
    harmful = write_prompts(root / "harmful.jsonl", HARMFUL)
    harmless = write_prompts(root / "harmless.jsonl", HARMLESS)
    return model, harmful, harmless


def run(*args):
    return main(["abliterate", *[str(a) for a in args]])


def test_auto_search_writes_a_loadable_model(setup, tmp_path, capsys):
    from mlx_lm import load

    model, harmful, harmless = setup
    before = tree(model)
    out = tmp_path / "out"
    args = ["--model", model, "--harmful", harmful, "--harmless", harmless, "-o", out]
    assert run(*args, "--eval-prompts", 2, "--max-tokens", 3) == 0
    assert tree(model) == before, "the input was modified"
    printed = capsys.readouterr().out
    assert "refusal_rate" in printed and "kl" in printed and "wrote" in printed
    record = json.loads((out / "mlxfun.json").read_text())
    assert record["method"] == "abliterate" and record["selection"] == "auto"
    assert [r["layer"] for r in record["candidates"]] == [0, 1, 2]
    assert record["prompts"] == {
        "harmful": 6,
        "harmless": 6,
        "harmful_held_out": 2,
        "harmless_held_out": 2,
    }
    chosen = next(r for r in record["candidates"] if r["layer"] == record["layer"])
    assert chosen["kl"] is not None
    d = np.load(out / "refusal_direction.npy")
    assert d.shape == (32,) and abs(np.linalg.norm(d) - 1) < 1e-5
    # stock mlx-lm loads it; its logits equal the source under run-time ablation of d
    edited, _ = load(str(out))
    source, _ = load(str(model))
    with ablation(source, d):
        expected = source(TOKENS)
    got = edited(TOKENS)
    assert (
        np.abs(np.array(got) - np.array(expected)).max() <= 1e-4 * np.abs(np.array(expected)).max()
    )
    # --direction reuses it without a search: the same weights
    again = tmp_path / "again"
    assert run("--model", model, "--direction", out / "refusal_direction.npy", "-o", again) == 0
    a, b = mx.load(str(out / "model.safetensors")), mx.load(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)


def test_fixed_layer_and_skip_experts(setup, tmp_path):
    model, harmful, harmless = setup
    out = tmp_path / "out"
    args = ["--model", model, "--harmful", harmful, "--harmless", harmless, "-o", out]
    assert run(*args, "--layer", "-1", "--skip-experts", "--json") == 0
    record = json.loads((out / "mlxfun.json").read_text())
    assert record["layer"] == 2 and record["selection"] == "given"
    assert "expert" not in record["edit"]["writers"]
    src = mx.load(str(model / "model.safetensors"))
    dst = mx.load(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.switch_mlp.down_proj.weight"
    assert mx.array_equal(src[name], dst[name])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layer", "7"], "--layer 7 is out of range: the model has 3 decoder layers (0..2)"),
        (["--layer", "x"], "--layer x: pass auto or a decoder layer index"),
        (["--position", "3"], "--position 3: pass last or a negative offset"),
        (["--eval-prompts", "7"], "--harmful has 8 prompts; a direction needs at least 9"),
        (["--layer", "0"], "--layer 0: the harmful and harmless means are equal there"),
    ],
)
def test_bad_options_are_one_line(setup, tmp_path, capsys, extra, message):
    model, harmful, harmless = setup
    args = ["--model", model, "--harmful", harmful, "--harmless", harmless, "-o", tmp_path / "o"]
    assert run(*args, *extra, "--json") != 0  # --json: no progress bars on stderr
    assert message in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_bad_prompt_sets_are_one_line(setup, tmp_path, capsys):
    model, harmful, _ = setup
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    small = write_prompts(tmp_path / "small.jsonl", ["one"])
    for bad, message in [
        (empty, f"--harmless {empty} has no prompts"),
        (small, "--harmless has 1 prompts; a direction needs at least 2"),
    ]:
        args = ["--model", model, "--harmful", harmful, "--harmless", bad, "-o", tmp_path / "o"]
        assert run(*args, "--layer", "1") != 0
        assert message in one_error_line(capsys)


def test_unknown_architecture_is_refused_by_name(tmp_path, capsys):
    from mlxfun.core.testing.tiny_models import write_byte_tokenizer

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    write_byte_tokenizer(model)
    h = write_prompts(tmp_path / "h.jsonl", HARMFUL)
    assert run("--model", model, "--harmful", h, "--harmless", h, "-o", tmp_path / "o") != 0
    line = one_error_line(capsys)
    assert line.startswith("error: gemma3_text: abliteration does not know")


def test_quantized_model_keeps_its_quantization(setup, tmp_path, capsys):
    from mlx_lm import load

    _, harmful, harmless = setup
    model = save_tiny_checkpoint(
        tmp_path / "q", "qwen3_moe", dict(TINY_ARGS, num_hidden_layers=3), bits=4
    )
    out = tmp_path / "out"
    args = ["--model", model, "--harmful", harmful, "--harmless", harmless, "-o", out]
    assert run(*args, "--layer", "1") == 0
    assert "requantization added a relative error of" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4}
    record = json.loads((out / "mlxfun.json").read_text())
    error = record["edit"]["requantization_error"]
    assert 0 < error["mean"] <= error["max"] < 0.2
    src, dst = mx.load(str(model / "model.safetensors")), mx.load(str(out / "model.safetensors"))
    assert src.keys() == dst.keys()
    assert all(src[k].dtype == dst[k].dtype and src[k].shape == dst[k].shape for k in src)
    load(str(out))


def test_half_precision_is_written_back_in_its_dtype(setup, tmp_path):
    _, harmful, harmless = setup
    model = save_tiny_checkpoint(tmp_path / "m", "qwen3_moe", dict(TINY_ARGS, num_hidden_layers=3))
    weights = mx.load(str(model / "model.safetensors"))
    mx.save_safetensors(
        str(model / "model.safetensors"), {k: v.astype(mx.bfloat16) for k, v in weights.items()}
    )
    out = tmp_path / "out"
    args = ["--model", model, "--harmful", harmful, "--harmless", harmless, "-o", out]
    assert run(*args, "--layer", "1") == 0
    written = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in written.values()} == {mx.bfloat16}
    name = "model.layers.0.self_attn.o_proj.weight"
    assert not mx.array_equal(written[name], weights[name].astype(mx.bfloat16))
