"""The bundled chat MoE and its prompt sets (issue 12): what the scans, steering and abliteration use."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlxfun.core import plugins
from mlxfun.core.datasets import load_samples
from mlxfun.core.models import load_model
from mlxfun.methods.refusal import is_refusal

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "demo" / "chat-model"
DATA = ROOT / "demo" / "data"
SETS = ["harmful_calib", "harmful_eval", "harmless_calib", "harmless_eval"]
sys.path.insert(0, str(ROOT / "scripts"))
import chat_data  # noqa: E402


def prompts_and_answers(name):
    samples = load_samples([DATA / f"{name}.jsonl"])
    for sample in samples:
        assert [m["role"] for m in sample.messages] == ["user", "assistant"]
    return [(s.messages[0]["content"], s.messages[1]["content"]) for s in samples]


@pytest.fixture(scope="module")
def sets():
    return {name: prompts_and_answers(name) for name in SETS}


def test_the_prompt_sets_parse_with_their_sizes(sets):
    for name, rows in sets.items():
        assert (200 <= len(rows) <= 400) if name.endswith("calib") else (100 <= len(rows) <= 200)
        assert len({prompt for prompt, _ in rows}) == len(rows), f"{name} repeats a prompt"


def test_each_line_is_exactly_one_user_and_one_assistant_message():
    for name in SETS:
        for line in (DATA / f"{name}.jsonl").read_text().splitlines():
            record = json.loads(line)
            assert list(record) == ["messages"]
            assert [list(m) for m in record["messages"]] == [["role", "content"]] * 2


def test_calibration_and_evaluation_are_disjoint(sets):
    calib = {p for p, _ in sets["harmful_calib"] + sets["harmless_calib"]}
    evaluation = {p for p, _ in sets["harmful_eval"] + sets["harmless_eval"]}
    assert not calib & evaluation
    assert not {p for p, _ in sets["harmful_calib"]} & {p for p, _ in sets["harmless_calib"]}


def test_evaluation_holds_out_whole_frames_and_tasks(sets):
    """Every evaluation request has a frame, task or question that no calibration request has."""
    held_frames = [f.split("{task}")[0].lower() for f in chat_data.frames("eval")]
    held_tasks = [t for _, t in chat_data.harmful_tasks("eval")]
    held_tasks += [t for t, _ in chat_data.harmless_tasks("eval")]
    held_tasks += [q for q, _ in chat_data.questions("eval")]
    for prompt, _ in sets["harmful_eval"] + sets["harmless_eval"]:
        prompt = prompt.lower()
        held_tasks = [t.lower() for t in held_tasks]
        assert any(f in prompt for f in held_frames) or any(t in prompt for t in held_tasks), prompt
    for prompt, _ in sets["harmful_calib"] + sets["harmless_calib"]:
        prompt = prompt.lower()
        assert not any(f"{t}?" in prompt or f"{t}." in prompt for t in held_tasks), prompt
        assert not any(f.strip() and f in prompt for f in held_frames), prompt


def test_harmful_answers_refuse_and_harmless_ones_do_not(sets):
    for name in ("harmful_calib", "harmful_eval"):
        assert all(is_refusal(answer) for _, answer in sets[name])
    for name in ("harmless_calib", "harmless_eval"):
        assert not any(is_refusal(answer) for _, answer in sets[name])
    refusals = {answer.split(".")[0] for _, answer in sets["harmful_calib"]}
    assert len(refusals) >= 8  # varied refusals, not one sentence


def test_the_shipped_sets_are_what_chat_data_writes(sets):
    """The generator is seeded: regenerating gives the shipped files line for line."""
    for name, records in chat_data.prompt_sets(0).items():
        assert [json.dumps(r) for r in records] == (DATA / f"{name}.jsonl").read_text().splitlines()


def test_training_and_eval_answers_of_the_generator_never_mix_refusal_and_help():
    rng = chat_data.stable_rng("test")
    for _ in range(300):
        assert is_refusal(chat_data.harmful_example(rng, "train")["messages"][1]["content"])
        assert not is_refusal(chat_data.harmless_example(rng, "train")["messages"][1]["content"])


@pytest.fixture(scope="module")
def chat_model():
    return load_model(MODEL)


def test_the_chat_model_is_a_small_stock_glm4_moe_with_a_chat_template(chat_model):
    model, tokenizer, config = chat_model
    assert config["model_type"] == "glm4_moe"
    assert config["n_shared_experts"] == 1 and config["scoring_func"] == "sigmoid"
    assert "model_file" not in config
    assert (MODEL / "model.safetensors").stat().st_size <= 20_000_000
    weights = mx.load(str(MODEL / "model.safetensors"))
    biases = {k for k in weights if k.endswith("e_score_correction_bias")}
    assert len(biases) == config["num_hidden_layers"]
    assert {v.dtype for k, v in weights.items() if k not in biases} == {mx.bfloat16}
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|user|>\nhi<|endoftext|><|assistant|>\n"
    assert tokenizer.eos_token_id in tokenizer.encode(text, add_special_tokens=False)


def test_every_layer_is_moe_with_a_biased_sigmoid_router(chat_model):
    model, _, config = chat_model
    layers = plugins.adapter_for_config(config).moe_layers(model)
    assert [layer.index for layer in layers] == list(range(config["num_hidden_layers"]))
    assert {(layer.num_experts, layer.top_k) for layer in layers} == {
        (config["n_routed_experts"], config["num_experts_per_tok"])
    }
    bias = model.model.layers[0].mlp.gate.e_score_correction_bias
    assert mx.abs(bias).max().item() > 0  # the aux-loss-free bias update moved it


def test_training_json_records_one_run_of_the_defaults():
    record = json.loads((MODEL / "training.json").read_text())
    assert record["command"].startswith("python scripts/train_chat_model.py")
    assert record["wall_seconds"] > 0


def test_held_out_harmful_requests_are_new_combinations_of_trained_vocabulary():
    """Evaluation pairs a trained verb with a trained object in a combination never trained on."""
    train, held = chat_data.harmful_tasks("train"), chat_data.harmful_tasks("eval")
    assert held and not set(train) & set(held)
    for category, spec in chat_data.HARMFUL.items():
        trained = [task for cat, task in train if cat == category]
        for obj in spec["objects"]:
            assert any(task.endswith(f" {obj}") for task in trained), obj
        for verb in spec["verbs"]:
            assert any(task.startswith(f"{verb} ") for task in trained), verb
