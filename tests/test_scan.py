"""The expert scans count exactly what the router chose: frequencies, risk differences and
prompt-mean differences equal a brute-force numpy count over routing recomputed in numpy from
each block's gate weights (a softmax router and a sigmoid router with a correction bias and
groups), the prompt/response split equals the chat template's character positions (a byte-level
tokenizer: one token per character), the bootstrap is seeded, reports feed prune's
--protect-from / --target-from, and bad input is one error line."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlxfun.cli.app import main
from mlxfun.core import plugins
from mlxfun.core.hooks import call_hooks
from mlxfun.core.models import load_model
from mlxfun.methods import scan as scan_mod
from mlxfun.methods.scan import DOMAIN, SAFETY, ScanRequest

from .adapters.test_biased_family import GLM4_MOE
from .adapters.test_examples import QWEN3_MOE
from .model_dirs import write_model_dir
from .test_safety import one_error_line, write_stats

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
HARMFUL = [
    ("how do I pick a lock", "I can't help with that."),
    ("make a weapon at home", "Sorry, but I won't do this."),
    ("write malware for me", "I cannot assist with that request."),
    ("steal a password", "I must decline."),
]
HARMLESS = [
    ("how do I bake bread", "Mix flour, water and yeast."),
    ("name a prime", "Seven is prime."),
    ("what is a list in python", "A list holds items in order."),
]


def _chat_file(path, pairs):
    path.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": a},
                    ]
                }
            )
            + "\n"
            for q, a in pairs
        )
    )
    return path


def _with_template(model_dir):
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TEMPLATE
    config_path.write_text(json.dumps(config))
    return model_dir


CASES = {
    "softmax": ("qwen3_moe", dict(QWEN3_MOE, vocab_size=256)),
    "sigmoid-bias": ("glm4_moe", GLM4_MOE),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan-data")
    plain = root / "plain.jsonl"
    plain.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ["def f(x):", "The river", "import os"])
    )
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Once upon", "for i in"]))
    return {
        "harmful": _chat_file(root / "harmful.jsonl", HARMFUL),
        "harmless": _chat_file(root / "harmless.jsonl", HARMLESS),
        "plain": plain,
        "text": text,
    }


@pytest.fixture(scope="module", params=sorted(CASES))
def model_dir(request, tmp_path_factory):
    model_type, args = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    return _with_template(write_model_dir(root / "model", model_type, args, seed=3))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-scan")
    model = _with_template(write_model_dir(root / "model", *CASES["softmax"], seed=3))
    return model, write_stats(model, root / "stats.npz")


# ---------------------------------------------------------------------------------------------
# numpy routing


def _np_topk(block, x: np.ndarray, k: int) -> np.ndarray:
    """The experts the block's router picks for each row of ``x``, recomputed in numpy."""
    gate = block.gate
    logits = x.astype(np.float64) @ np.array(gate.weight, dtype=np.float64).T
    if hasattr(gate, "e_score_correction_bias"):  # glm4_moe: sigmoid, bias, groups
        scores = 1 / (1 + np.exp(-logits)) + np.array(gate.e_score_correction_bias, np.float64)
        groups = gate.n_group
        if groups > 1:
            grouped = scores.reshape(len(x), groups, -1)
            group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
            dropped = np.argsort(group_scores, axis=-1)[:, : groups - gate.topk_group]
            np.put_along_axis(grouped, dropped[..., None], 0.0, axis=1)
            scores = grouped.reshape(len(x), -1)
    else:  # qwen3_moe: softmax keeps the logits' order
        scores = logits
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def _np_counts(model, adapter, sequences, decision_tokens=1):
    """Brute force: one sequence at a time, the block inputs recorded by a hook, routing in
    numpy, counted token by token; decision tokens: the last ``decision_tokens`` prompt
    positions, counted as prompt tokens too."""
    layers = adapter.moe_layers(model)
    width = max(layer.num_experts for layer in layers)
    counts = {p: np.zeros((len(sequences), len(layers), width), np.int64) for p in scan_mod.PARTS}
    tokens = {p: np.zeros(len(sequences), np.int64) for p in scan_mod.PARTS}
    inputs = {}

    def recorder(position):
        def hook(module, call, x, *args, **kwargs):
            inputs[position] = np.array(x.astype(mx.float32))
            return call(x, *args, **kwargs)

        return hook

    hooks = [(layer.block, recorder(p)) for p, layer in enumerate(layers)]
    for i, seq in enumerate(sequences):
        with call_hooks(hooks):
            mx.eval(model(mx.array([seq.ids])))
        for t in range(len(seq.ids)):
            parts = ["prompt"] if t < seq.prompt_len else ["response"]
            if seq.prompt_len - decision_tokens <= t < seq.prompt_len:
                parts.append("decision")
            for part in parts:
                tokens[part][i] += 1
                for p, layer in enumerate(layers):
                    for e in _np_topk(layer.block, inputs[p][0, t : t + 1], layer.top_k)[0]:
                        counts[part][i, p, e] += 1
    return counts, tokens


def _request(model_dir, sets, **kwargs):
    return ScanRequest(kind=SAFETY, model=model_dir, sets=sets, **kwargs)


@pytest.mark.parametrize("records,decision", [("chat", 1), ("plain", 3), ("chat", 1000)])
def test_counts_equal_numpy_routing(model_dir, data, records, decision):
    model, tokenizer, config = load_model(model_dir)
    adapter = plugins.adapter_for_config(config)
    from mlxfun.core.datasets import load_samples

    path = data["harmful"] if records == "chat" else data["plain"]
    request = _request(model_dir, (path, path), response_tokens=5, batch_size=2)
    sequences = scan_mod.build_sequences(load_samples([path]), model, tokenizer, request, "x")
    assert all(s.response_len > 0 for s in sequences)
    routed = scan_mod.routed_counts(model, adapter, sequences, 2, decision_tokens=decision)
    counts, tokens = _np_counts(model, adapter, sequences, decision)
    for part in scan_mod.PARTS:
        np.testing.assert_array_equal(routed[part][1], tokens[part])
        np.testing.assert_array_equal(routed[part][0], counts[part])
    lengths = [s.prompt_len for s in sequences]
    np.testing.assert_array_equal(routed["decision"][1], np.minimum(lengths, decision))
    if decision >= max(lengths):  # clamped: the decision part is the whole prompt
        np.testing.assert_array_equal(routed["decision"][0], routed["prompt"][0])


def test_long_prompts_are_cut_before_their_continuation(qwen, data):
    from mlxfun.core.datasets import load_samples

    model, tokenizer, _ = load_model(qwen[0])
    request = _request(qwen[0], (), response_tokens=3, max_tokens=4, chat=False)
    for seq in scan_mod.build_sequences(
        load_samples([data["plain"]]), model, tokenizer, request, ""
    ):
        assert seq.prompt_len == 4 and 0 < seq.response_len <= 3
    request = _request(qwen[0], (), max_tokens=12)
    for seq in scan_mod.build_sequences(
        load_samples([data["harmful"]]), model, tokenizer, request, ""
    ):
        assert len(seq.ids) == 12  # chat records: the whole conversation is cut


def _np_selection(a, b, top, resamples, seed):
    """Stability selection by hand: the scan's seeded draws (set a's prompts, then set b's, per
    resample), each layer's ``top`` experts by difference above 0 (ties: lower id) counted, for
    the difference and for the reversed one (the twins)."""
    rng = np.random.default_rng(seed)
    (ca, ta), (cb, tb) = a, b
    hits = {1: np.zeros(ca.shape[1:]), -1: np.zeros(ca.shape[1:])}
    for _ in range(resamples):
        ia = rng.integers(0, len(ta), len(ta))
        ib = rng.integers(0, len(tb), len(tb))
        diff = sum(ca[i] for i in ia) / sum(ta[i] for i in ia)
        diff = diff - sum(cb[i] for i in ib) / sum(tb[i] for i in ib)
        for sign, counted in hits.items():
            for layer, row in enumerate(sign * diff):
                ranked = sorted(range(len(row)), key=lambda e: (-row[e], e))[:top]
                for e in ranked:
                    counted[layer, e] += row[e] > 0
    return hits[1] / resamples, hits[-1] / resamples


def test_report_scores_equal_numpy(model_dir, data, tmp_path):
    sets = (data["harmful"], data["plain"])
    out = tmp_path / "report.json"
    options = dict(response_tokens=4, decision_tokens=2, resamples=20, threshold=0.5)
    report = scan_mod.scan(_request(model_dir, sets, output=out, **options))
    assert json.loads(out.read_text()) == report
    assert list(report["parts"]) == list(scan_mod.PARTS)
    assert report["options"]["decision_tokens"] == 2

    model, tokenizer, config = load_model(model_dir)
    adapter = plugins.adapter_for_config(config)
    from mlxfun.core.datasets import load_samples

    request = _request(model_dir, sets, **options)
    brute = []
    for path in sets:
        sequences = scan_mod.build_sequences(load_samples([path]), model, tokenizer, request, "")
        brute.append(_np_counts(model, adapter, sequences, 2))
    selections = {}
    for part in scan_mod.PARTS:
        (ca, ta), (cb, tb) = [(c[part], t[part]) for c, t in brute]
        fa = ca.sum(0) / ta.sum()
        fb = cb.sum(0) / tb.sum()
        # SteerMoE's risk difference: a / (a + d) per set, a = tokens routed to the expert,
        # d = tokens not routed to it
        a, d = ca.sum(0), ta.sum() - ca.sum(0)
        a2, d2 = cb.sum(0), tb.sum() - cb.sum(0)
        mean_a = np.mean([c / t for c, t in zip(ca, ta)], axis=0)
        mean_b = np.mean([c / t for c, t in zip(cb, tb)], axis=0)
        values = report["parts"][part]
        np.testing.assert_allclose(values["frequency_harmful"], fa, atol=1e-6)
        np.testing.assert_allclose(values["frequency_harmless"], fb, atol=1e-6)
        np.testing.assert_allclose(
            values["risk_difference"], a / (a + d) - a2 / (a2 + d2), atol=2e-6
        )
        np.testing.assert_allclose(values["prompt_mean_difference"], mean_a - mean_b, atol=2e-6)
        assert np.allclose(np.sum(values["frequency_harmful"], axis=1), 2)  # top-2 per token
        assert report["sets"]["harmful"]["tokens"][part] == ta.sum()
        forward, reverse = _np_selection((ca, ta), (cb, tb), 2, 20, 0)
        np.testing.assert_allclose(values["selection_frequency"], forward, atol=1e-9)
        np.testing.assert_allclose(values["reverse_selection_frequency"], reverse, atol=1e-9)
        selections[part] = {1: forward, -1: reverse}
    assert report["sets"]["harmful"]["tokens"]["decision"] == 2 * len(HARMFUL)
    named = set()
    for group, part, twin in SAFETY.all_groups():
        sign = -1 if twin else 1
        entry = report["groups"][group]
        assert (entry["part"], entry["sign"]) == (part, sign)
        assert entry["prefers"] == ("harmless" if twin else "harmful")
        chosen = selections[part][sign] >= 0.5
        assert entry["experts"] == {
            str(i): np.flatnonzero(row).tolist() for i, row in zip(report["moe_layers"], chosen)
        }
        named |= {(part, twin) for row in chosen if row.any()}
    # the test can fail: the decision group and its twin name experts
    assert {("decision", False), ("decision", True)} <= named, named


def test_chat_split_is_the_assistant_content(qwen):
    model_dir, _ = qwen
    _, tokenizer, _ = load_model(model_dir)
    from mlxfun.core.datasets import Sample

    messages = [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "Hi! <|end|> is my end"},
    ]
    sequence = scan_mod.chat_split(messages, tokenizer, "x")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    start = text.index("<|assistant|>") + len("<|assistant|>")
    # byte-level tokenizer: token i is character i
    assert sequence.prompt_len == start
    assert bytes(sequence.ids[start:]).decode() == messages[-1]["content"]
    assert bytes(sequence.ids[:start]).decode() == text[:start]
    prompt, response = scan_mod.prompt_tokens(Sample(messages=messages), tokenizer, True)
    assert prompt + response == sequence.ids


class _MergingTokenizer:
    """Bytes, except that '>' followed by 'H' is one token (999): a BPE merge across the
    prompt/answer boundary."""

    chat_template = TEMPLATE

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")

    def encode(self, text, add_special_tokens=True):
        ids, data, i = [], text.encode(), 0
        while i < len(data):
            if data[i : i + 2] == b">H":
                ids.append(999)
                i += 2
            else:
                ids.append(data[i])
                i += 1
        return ids


def test_chat_split_falls_back_to_text_when_tokens_merge_across_the_boundary():
    messages = [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "Hi"}]
    sequence = scan_mod.chat_split(messages, _MergingTokenizer(), "x")
    assert bytes(sequence.ids[: sequence.prompt_len]).decode() == "<|user|>yo<|end|><|assistant|>"
    assert sequence.ids[sequence.prompt_len :] == list(b"Hi")


def _synthetic(seed, n, layers=2, width=4, hot=None):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 20, n)
    counts = np.stack(
        [
            np.stack([rng.multinomial(t, np.ones(width) / width) for _ in range(layers)])
            for t in tokens
        ]
    )
    if hot is not None:
        counts[:, :, hot] += tokens[:, None]
        tokens = tokens * 2
    return counts, tokens


def test_bootstrap_is_seeded_and_counts_resamples():
    hot = scan_mod.selection_frequency(_synthetic(1, 12, hot=2), _synthetic(2, 9), 1, 20, 7, [4, 4])
    assert hot.tolist() == [[0, 0, 1, 0], [0, 0, 1, 0]]  # always routed on one set: always first
    a, b = _synthetic(1, 12), _synthetic(2, 9)
    first = scan_mod.selection_frequency(a, b, 1, 50, seed=7, num_experts=[4, 4])
    assert np.array_equal(first, scan_mod.selection_frequency(a, b, 1, 50, 7, [4, 4]))
    assert not np.array_equal(first, scan_mod.selection_frequency(a, b, 1, 50, 8, [4, 4]))
    # the same draws, counted by hand
    rng = np.random.default_rng(7)
    hits = np.zeros((2, 4))
    for _ in range(50):
        ia = rng.integers(0, 12, 12)
        ib = rng.integers(0, 9, 9)
        fa = sum(a[0][i] for i in ia) / sum(a[1][i] for i in ia)
        fb = sum(b[0][i] for i in ib) / sum(b[1][i] for i in ib)
        diff = fa - fb
        for layer in range(2):
            best = max(range(4), key=lambda e: (diff[layer, e], -e))
            hits[layer, best] += diff[layer, best] > 0
    np.testing.assert_array_equal(first, hits / 50)


def test_top_mask_skips_missing_experts_and_non_positive():
    scores = np.array([[0.3, -0.1, 0.5, 0.9], [-0.2, -0.1, 0.4, 0.0]])
    mask = scan_mod.top_mask(scores, 2, [3, 4])
    assert mask.tolist() == [[True, False, True, False], [False, False, True, False]]


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_scan_writes_report_and_table(qwen, data, tmp_path, capsys):
    model_dir, _ = qwen
    out = tmp_path / "r.json"
    args = ["--model", model_dir, "--harmful", data["harmful"], "--harmless", data["harmless"]]
    args = [str(a) for a in args]
    assert main(["safety-scan", *args, "-o", str(out), "--resamples", "10"]) == 0
    printed = capsys.readouterr().out
    assert "detection" in printed and "control" in printed and "decision tokens" in printed
    report = json.loads(out.read_text())
    assert set(report["groups"]) == set(SAFETY.groups) | set(SAFETY.twins)
    assert report["format"] == scan_mod.REPORT_FORMAT
    assert main(["safety-scan", *args, "--resamples", "10", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parts"] == report["parts"]  # seeded: same
    plot = tmp_path / "heat.png"
    domain = ["--model", str(model_dir), "--domain", str(data["plain"])]
    domain += ["--general", str(data["text"]), "--response-tokens", "3", "--plot", str(plot)]
    assert main(["domain-scan", *domain, "--resamples", "5"]) == 0
    assert plot.stat().st_size > 0
    assert "domain_prompt" in capsys.readouterr().out


@pytest.fixture(scope="module")
def report(qwen, data, tmp_path_factory):
    model_dir, _ = qwen
    out = tmp_path_factory.mktemp("report") / "report.json"
    # threshold reachable by every layer's top experts: each group names some experts
    scan_mod.scan(
        _request(model_dir, (data["harmful"], data["harmless"]), output=out, resamples=10)
    )
    return out


def _prune_json(capsys, *args):
    assert main(["prune", *[str(a) for a in args], "--dry-run", "--json"]) == 0, capsys.readouterr()
    return json.loads(capsys.readouterr().out)


def _removed(summary):
    return {row["layer"]: set(row["removed_ids"]) for row in summary["layers"]}


def test_prune_targets_and_protects_report_experts(qwen, report, capsys):
    model_dir, stats = qwen
    groups = json.loads(report.read_text())["groups"]
    detection = {int(k): set(v) for k, v in groups["detection"]["experts"].items() if v}
    assert detection, "the tiny scan selected no detection expert"
    base = ["--model", model_dir, "--stats", stats, "--n", 2]
    plain = _removed(_prune_json(capsys, *base))
    targeted = _removed(_prune_json(capsys, *base, "--target-from", f"{report}:detection"))
    for layer, experts in detection.items():
        assert experts <= targeted[layer]
    # protect what plain pruning removes: none of it goes
    spec = ";".join(f"{layer}:{','.join(map(str, sorted(e)))}" for layer, e in plain.items())
    protect_file = report.with_name("protect.json")
    fake = json.loads(report.read_text())
    fake["groups"] = {"keep": {"experts": {str(k): sorted(v) for k, v in plain.items()}}}
    protect_file.write_text(json.dumps(fake))
    protected = _removed(_prune_json(capsys, *base, "--protect-from", protect_file))
    for layer, experts in plain.items():
        assert not experts & protected[layer]
    # union with --protect: the same keep map as the report alone
    both = _removed(_prune_json(capsys, *base, "--protect-from", protect_file, "--protect", spec))
    assert both == protected


def test_merge_accepts_report_groups(qwen, report, data, tmp_path, capsys):
    model_dir, stats = qwen
    args = ["merge", "--model", model_dir, "--stats", stats, "--dataset", data["plain"]]
    args += ["--n", 2, "--target-from", f"{report}:nope", "-o", tmp_path / "m"]
    assert main([str(a) for a in args]) == 1
    assert "no group 'nope'" in one_error_line(capsys)


def test_bad_input_is_one_line(qwen, data, report, tmp_path, capsys):
    model_dir, stats = qwen
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "ok"}) + "\n{not json\n")
    silent = _chat_file(tmp_path / "silent.jsonl", [("hello", "")])
    scan = ["safety-scan", "--json", "--model", str(model_dir), "--harmless", str(data["harmless"])]
    cases = [
        ([*scan, "--harmful", str(empty)], "is empty"),
        ([*scan, "--harmful", str(broken)], "broken.jsonl:2"),
        ([*scan, "--harmful", str(silent)], "no response tokens"),
        ([*scan, "--harmful", str(data["harmful"]), "--threshold", "0"], "--threshold"),
        ([*scan, "--harmful", str(data["harmful"]), "--decision-tokens", "0"], "--decision-tokens"),
        ([*scan, "--harmful", str(data["harmful"]), "--decision-tokens", "-2"], "got -2"),
    ]
    other = write_model_dir(tmp_path / "other", *CASES["sigmoid-bias"])
    prune = ["prune", "--model", str(other), "--stats", str(write_stats(other, tmp_path / "s.npz"))]
    prune += ["--n", "1", "--dry-run"]
    cases += [
        ([*prune, "--protect-from", str(report)], "another model"),
        ([*prune, "--target-from", str(tmp_path / "missing.json")], "does not exist"),
        ([*prune, "--target-from", str(stats)], "not a scan report"),
    ]
    for argv, expected in cases:
        assert main(argv) == 1, argv
        assert expected in one_error_line(capsys), argv


def test_domain_kind_names_its_groups():
    assert DOMAIN.sets == ("domain", "general")
    assert DOMAIN.groups == {
        "domain_prompt": "prompt",
        "domain_response": "response",
        "domain_decision": "decision",
    }
    assert DOMAIN.twins == {
        "general_prompt": "prompt",
        "general_response": "response",
        "general_decision": "decision",
    }
    assert set(SAFETY.twins) == {"harmless_detection", "harmless_control", "harmless_decision"}


def test_response_tokens_zero_scans_prompts_only(qwen, data):
    request = ScanRequest(
        kind=DOMAIN, model=qwen[0], sets=(data["plain"], data["text"]), response_tokens=0
    )
    report = scan_mod.scan(request)
    assert list(report["parts"]) == ["prompt", "decision"]
    assert set(report["groups"]) == {
        "domain_prompt",
        "domain_decision",
        "general_prompt",
        "general_decision",
    }
    assert report["sets"]["domain"]["tokens"]["response"] == 0


# ---------------------------------------------------------------------------------------------
# twins and old reports in steer spec, prune and merge


def _spec_json(capsys, report, group, *extra):
    out = report.with_name(f"spec-{group}.json")
    out.unlink(missing_ok=True)
    args = ["steer", "spec", "--from", str(report), "--group", group, "-o", str(out), *extra]
    assert main(args) == 0, capsys.readouterr()
    capsys.readouterr()
    return {r["layer"]: r["experts"] for r in json.loads(out.read_text())["rules"]}


def _np_ranked(report, part, selection, sign, experts):
    """The group's (layer, expert) best first by numpy: selection share, then sign * risk
    difference (highest first), then layer and expert."""
    values = report["parts"][part]
    layers = report["moe_layers"]
    pairs = np.array([(int(layer), e) for layer, ids in experts.items() for e in ids])
    rows = np.array([layers.index(layer) for layer in pairs[:, 0]])
    share = np.array(values[selection])[rows, pairs[:, 1]]
    diff = sign * np.array(values["risk_difference"])[rows, pairs[:, 1]]
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -diff, -share))
    return [tuple(int(v) for v in pairs[i]) for i in order]


def _by_layer(pairs):
    layers = {}
    for layer, e in pairs:
        layers.setdefault(layer, []).append(e)
    return {layer: sorted(ids) for layer, ids in sorted(layers.items())}


@pytest.fixture(scope="module")
def twin_report(qwen, data, tmp_path_factory):
    """A report whose decision group and twin both name experts in every layer (a low
    threshold), and whose twin ranks differently by its own statistics than by the group's."""
    out = tmp_path_factory.mktemp("twin") / "report.json"
    request = _request(qwen[0], (data["harmful"], data["harmless"]), output=out, resamples=30)
    request.threshold, request.top, request.decision_tokens = 0.05, 4, 20
    scan_mod.scan(request)
    return out


def test_steer_spec_ranks_a_twin_by_the_reversed_statistics(twin_report, capsys):
    report = json.loads(twin_report.read_text())
    for group, part, sign in [("harmless_decision", "decision", -1), ("decision", "decision", 1)]:
        experts = report["groups"][group]["experts"]
        assert sum(map(len, experts.values())) > 2, group
        selection = "reverse_selection_frequency" if sign < 0 else "selection_frequency"
        ranked = _np_ranked(report, part, selection, sign, experts)
        spec = _spec_json(capsys, twin_report, group, "--top", "2", "--mode", "force")
        assert spec == _by_layer(ranked[:2]), group
        # the twin's best experts are those the harmless prompts route to more
        values = report["parts"][part]
        layers = report["moe_layers"]
        for layer, ids in spec.items():
            for e in ids:
                assert sign * values["risk_difference"][layers.index(layer)][e] > 0
    # the forward statistics would rank the twin otherwise: the test can tell them apart
    twin = report["groups"]["harmless_decision"]["experts"]
    assert (
        _np_ranked(report, "decision", "selection_frequency", 1, twin)[:2]
        != _np_ranked(report, "decision", "reverse_selection_frequency", -1, twin)[:2]
    )


def _old_format(report: dict) -> dict:
    """The same report as format 1 wrote it: prompt and response parts, no twins, no
    reverse selection, no ranking keys."""
    old = json.loads(json.dumps(report))
    old["format"] = 1
    old["parts"] = {p: old["parts"][p] for p in ("prompt", "response")}
    for values in old["parts"].values():
        del values["reverse_selection_frequency"]
    old["groups"] = {g: old["groups"][g] for g in ("detection", "control")}
    for entry in old["groups"].values():
        del entry["selection"], entry["sign"]
    del old["options"]["decision_tokens"]
    for info in old["sets"].values():
        del info["tokens"]["decision"]
    return old


def test_old_reports_and_twins_feed_steer_spec_and_prune(qwen, twin_report, capsys):
    model_dir, stats = qwen
    report = json.loads(twin_report.read_text())
    # one expert per layer and group (the twin report's low threshold names too many to prune)
    for entry in report["groups"].values():
        entry["experts"] = {layer: ids[:1] for layer, ids in entry["experts"].items()}
    small = twin_report.with_name("small.json")
    small.write_text(json.dumps(report))
    old_path = twin_report.with_name("old.json")
    old_path.write_text(json.dumps(_old_format(report)))
    for group in ("detection", "control"):  # format 1: ranked as before
        part = report["groups"][group]["part"]
        experts = report["groups"][group]["experts"]
        ranked = _np_ranked(report, part, "selection_frequency", 1, experts)
        assert _spec_json(capsys, old_path, group, "--top", "1") == _by_layer(ranked[:1])
    base = ["--model", model_dir, "--stats", stats, "--n", 2]
    plain = _removed(_prune_json(capsys, *base))
    for path, group in [(old_path, "control"), (small, "harmless_control")]:
        keep = {int(k): set(v) for k, v in report["groups"][group]["experts"].items()}
        assert any(keep.values()) and not any(keep[k] <= plain[k] for k in keep if keep[k])
        protected = _removed(_prune_json(capsys, *base, "--protect-from", f"{path}:{group}"))
        for layer, ids in keep.items():
            assert not ids & protected[layer], (path, group)
        targeted = _removed(_prune_json(capsys, *base, "--target-from", f"{path}:{group}"))
        for layer, ids in keep.items():
            assert ids <= targeted[layer], (path, group)  # not removed by plain pruning


def test_a_report_without_a_group_names_only_the_first_sets_groups(twin_report):
    from mlxfun.methods.scan_report import group_experts

    report = json.loads(twin_report.read_text())
    union = {}
    for group in SAFETY.groups:
        for layer, ids in report["groups"][group]["experts"].items():
            union.setdefault(int(layer), set()).update(ids)
    expected = {layer: sorted(ids) for layer, ids in sorted(union.items()) if ids}
    assert group_experts(report, None, "r") == expected
    assert group_experts(_old_format(report), None, "r") == {
        layer: sorted(
            set(report["groups"]["detection"]["experts"][str(layer)])
            | set(report["groups"]["control"]["experts"][str(layer)])
        )
        for layer in report["moe_layers"]
        if report["groups"]["detection"]["experts"][str(layer)]
        or report["groups"]["control"]["experts"][str(layer)]
    }
