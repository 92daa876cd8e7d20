"""``mlxfun serve`` through HTTP: a real server process on a free port with a tiny model."""

import json
import threading
import time

import numpy as np
import pytest
from mlxfun.cli.app import main

from .model_dirs import write_model_dir
from .serve_helpers import Server

QWEN = dict(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
    vocab_size=256,
    rope_theta=10000.0,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
PROMPTS = ["def add(a, b):", "The cat sat on", "import numpy as np\n", "Hello there"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("serve") / "model", "qwen3_moe", QWEN, seed=3)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "work"
    path.mkdir()
    texts = PROMPTS * 3
    (path / "calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def server(model_dir, workdir):
    server = Server(model_dir, workdir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def loaded(model_dir):
    from mlxfun.core.models import load_model

    model, tokenizer, config = load_model(model_dir)
    return model, tokenizer, config


def _generated(loaded, prompt_tokens, max_tokens):
    """Greedy tokens and text as mlx_lm.generate makes them."""
    from mlx_lm.generate import stream_generate

    model, tokenizer, _ = loaded
    tokens, text = [], ""
    for response in stream_generate(model, tokenizer, prompt_tokens, max_tokens=max_tokens):
        tokens.append(response.token)
        text += response.text
    return tokens, text


def test_chat_completion_equals_mlx_lm_generate(server, loaded):
    from mlx_lm import generate
    from mlx_lm.server import convert_chat

    model, tokenizer, _ = loaded
    messages = [{"role": "user", "content": "Write a function."}]
    status, body = server.call(
        "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 12}
    )
    assert status == 200, body
    prompt = tokenizer.encode(convert_chat(messages))
    expected = generate(model, tokenizer, prompt, max_tokens=12)
    assert body["choices"][0]["message"]["content"] == expected
    assert body["usage"]["prompt_tokens"] == len(prompt)


def test_streaming_is_mlx_lm_s(server):
    status, text = server.call(
        "POST", "/v1/completions", {"prompt": "abc", "max_tokens": 4, "stream": True}
    )
    assert status == 200 and text.count("data: ") >= 4 and "[DONE]" in text


def test_counts_equal_collect_on_the_same_tokens(server, loaded):
    from mlxfun.core import plugins
    from mlxfun.core.collect import collect_stats

    model, tokenizer, config = loaded
    assert server.call("POST", "/v1/mlxfun/stats/reset", {})[0] == 200
    sequences = []
    for prompt in PROMPTS[:3]:
        status, body = server.call("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 6})
        assert status == 200, body
        prompt_tokens = tokenizer.encode(prompt)
        tokens, text = _generated(loaded, prompt_tokens, 6)
        assert body["choices"][0]["text"] == text
        sequences.append(prompt_tokens + tokens)
    status, live = server.call("GET", "/v1/mlxfun/stats")
    assert status == 200
    adapter = plugins.adapter_for_config(config)
    scorers = [plugins.get_scorer(n) for n in ("frequency", "reap", "ean_sum")]
    collector, _ = collect_stats(model, adapter, sequences, scorers, progress=False)
    expected = collector.scores()
    total = sum(len(s) for s in sequences)
    assert live["token_counts"] == [total, total] and live["tokens"] == total
    np.testing.assert_array_equal(np.array(live["scores"]["frequency"]), expected["frequency"])
    for name in ("reap", "ean_sum"):
        np.testing.assert_allclose(np.array(live["scores"][name]), expected[name], rtol=1e-4)


def test_saved_stats_file_prunes_and_loads(server, workdir, model_dir, tmp_path):
    from mlx_lm import load
    from mlxfun.core.stats import load_stats

    server.call("POST", "/v1/completions", {"prompt": PROMPTS[3], "max_tokens": 4})
    status, saved = server.call("POST", "/v1/mlxfun/stats/save", {"path": "live.npz"})
    assert status == 200, saved
    stats = load_stats(workdir / "live.npz")
    assert stats.metadata["fingerprint"]["model_type"] == "qwen3_moe"
    out = tmp_path / "pruned"
    stats_file = str(workdir / "live.npz")
    args = ["prune", "--model", str(model_dir), "--stats", stats_file, "--n", "2"]
    assert main([*args, "--output", str(out)]) == 0
    pruned, _ = load(str(out))
    assert pruned.model.layers[0].mlp.switch_mlp.gate_proj.weight.shape[0] == 6
    # a second save to the same name needs force
    assert server.call("POST", "/v1/mlxfun/stats/save", {"path": "live.npz"})[0] == 409


def test_select_matches_the_cli_and_the_prune_job_loads_in_mlx_lm(server, workdir):
    from mlx_lm import load

    if not (workdir / "live.npz").exists():
        server.call("POST", "/v1/mlxfun/stats/save", {"path": "live.npz"})
    body = {"stats": "live.npz", "n_prune": 3, "mode": "model_wide", "scorer": "frequency"}
    status, selection = server.call("POST", "/v1/mlxfun/select", body)
    assert status == 200, selection
    assert sum(row["removed"] for row in selection["layers"]) == 3
    assert "--selector model-wide" in selection["command"]
    status, job = server.call(
        "POST", "/v1/mlxfun/prune", {**body, "mode": "per_layer", "output_path": "pruned-job"}
    )
    assert status == 202, job
    job = server.wait_job(job["id"])
    assert job["state"] == "done", job
    assert job["summary"]["removed"] == 6 and job["progress"] == 1.0
    model, _ = load(str(workdir / "pruned-job"))
    assert model.model.layers[1].mlp.switch_mlp.up_proj.weight.shape[0] == 5
    # the same output again: 409 before any work
    status, again = server.call(
        "POST", "/v1/mlxfun/prune", {**body, "mode": "per_layer", "output_path": "pruned-job"}
    )
    assert status == 409, again


def test_merge_job_and_cancel(server, workdir):
    if not (workdir / "live.npz").exists():
        server.call("POST", "/v1/mlxfun/stats/save", {"path": "live.npz"})
    body = {"stats": "live.npz", "n": 2, "dataset": "calib.jsonl", "max_tokens": 64}
    status, first = server.call("POST", "/v1/mlxfun/merge", {**body, "output": "merged"})
    assert status == 202, first
    status, second = server.call("POST", "/v1/mlxfun/merge", {**body, "output": "merged2"})
    assert status == 202
    status, cancelled = server.call("DELETE", f"/v1/mlxfun/jobs/{second['id']}")
    assert status == 200 and cancelled["state"] == "cancelled"
    done = server.wait_job(first["id"])
    assert done["state"] == "done", done
    assert (workdir / "merged" / "mlxfun.json").is_file()
    assert not (workdir / "merged2").exists()
    assert server.call("GET", f"/v1/mlxfun/jobs/{second['id']}")[1]["state"] == "cancelled"


def test_wrong_or_missing_api_key_is_401(server):
    for key in ("wrong", None):
        for method, path, body in (
            ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
            ("GET", "/v1/mlxfun/stats", None),
            ("GET", "/v1/models", None),
            ("POST", "/v1/mlxfun/stats/reset", {}),
        ):
            status, answer = server.call(method, path, body, key=key)
            assert status == 401, (method, path, answer)


def test_bad_requests_get_a_json_4xx(server, workdir):
    cases = [
        ("POST", "/v1/mlxfun/stats/save", b"{not json", 400),
        ("POST", "/v1/chat/completions", b"{not json", 400),
        ("POST", "/v1/mlxfun/stats/save", json.dumps({"path": "../outside.npz"}).encode(), 400),
        ("POST", "/v1/mlxfun/stats/save", json.dumps({"path": "/tmp/x.npz"}).encode(), 400),
        ("POST", "/v1/mlxfun/stats/load", json.dumps({"path": "/etc/passwd"}).encode(), 400),
        ("POST", "/v1/mlxfun/stats/load", json.dumps({"path": "calib.jsonl"}).encode(), 400),
        ("GET", "/v1/mlxfun/stats?layer=99", None, 400),
        ("GET", "/v1/mlxfun/stats?scorer=nope", None, 400),
        ("POST", "/v1/mlxfun/prune", json.dumps({"stats": "live.npz", "n": 2}).encode(), 400),
        (
            "POST",
            "/v1/mlxfun/prune",
            json.dumps({"stats": "live.npz", "n": 2, "output": "../../evil"}).encode(),
            400,
        ),
        (
            "POST",
            "/v1/mlxfun/prune",
            json.dumps(
                {"stats": "live.npz", "n": 2, "output": "p2", "protect": {"7": [0]}}
            ).encode(),
            400,
        ),
        (
            "POST",
            "/v1/mlxfun/prune",
            json.dumps({"stats": "live.npz", "n": 99, "output": "p3"}).encode(),
            400,
        ),
        (
            "POST",
            "/v1/mlxfun/merge",
            json.dumps({"stats": "live.npz", "n": 2, "output": "m3"}).encode(),
            400,
        ),
        ("POST", "/v1/mlxfun/stats/upload?name=../x.npz", b"PK", 400),
        ("POST", "/v1/mlxfun/stats/upload?name=x.npz", b"not a zip", 400),
        ("GET", "/v1/mlxfun/jobs/job-999", None, 404),
        ("GET", "/v1/mlxfun/nothing", None, 404),
        ("DELETE", "/v1/mlxfun/stats", None, 405),
    ]
    if not (workdir / "live.npz").exists():
        server.call("POST", "/v1/mlxfun/stats/save", {"path": "live.npz"})
    for method, path, raw, expected in cases:
        status, answer = server.call(method, path, raw=raw)
        assert status == expected, (method, path, raw, answer)
        assert isinstance(answer, dict) and "error" in answer, answer
        assert "Traceback" not in json.dumps(answer)
    assert not (workdir.parent / "outside.npz").exists()
    assert server.call("GET", "/health")[0] == 200


def test_batched_concurrent_counts_equal_collect_on_each_request(server, loaded):
    """Clients with prompts of different lengths at once: mlx-lm batches them (right-padded
    prefill, rows finishing at different steps) and the counters skip the padding exactly."""
    from mlxfun.core import plugins
    from mlxfun.core.collect import collect_stats

    model, tokenizer, config = loaded
    prompts = [p * (i + 1) for i, p in enumerate(PROMPTS)] + ["x", "a b c d e f g h i j k l"]
    max_tokens = [3, 9, 5, 12, 7, 4]
    assert server.call("POST", "/v1/mlxfun/stats/reset", {})[0] == 200
    answers = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def client(i):
        barrier.wait()
        body = {"prompt": prompts[i], "max_tokens": max_tokens[i]}
        answers[i] = server.call("POST", "/v1/completions", body)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sequences = []
    for prompt, n, (status, body) in zip(prompts, max_tokens, answers):
        assert status == 200, body
        prompt_tokens = tokenizer.encode(prompt)
        tokens, text = _generated(loaded, prompt_tokens, n)
        assert body["choices"][0]["text"] == text
        assert body["usage"]["completion_tokens"] == len(tokens)
        sequences.append(prompt_tokens + tokens)
    status, live = server.call("GET", "/v1/mlxfun/stats")
    total = sum(len(s) for s in sequences)
    # batched: fewer forwards than one prefill + one step per token of each request alone
    assert live["forwards"] < sum(1 + n for n in max_tokens), live["forwards"]
    adapter = plugins.adapter_for_config(config)
    scorers = [plugins.get_scorer(n) for n in ("frequency", "reap", "ean_sum")]
    collector, _ = collect_stats(model, adapter, sequences, scorers, progress=False)
    expected = collector.scores()
    assert live["token_counts"] == [total, total] and live["tokens"] == total
    np.testing.assert_array_equal(np.array(live["scores"]["frequency"]), expected["frequency"])
    for name in ("reap", "ean_sum"):
        np.testing.assert_allclose(np.array(live["scores"][name]), expected[name], rtol=1e-4)


def test_concurrent_clients_lose_no_counts(server):
    assert server.call("POST", "/v1/mlxfun/stats/reset", {})[0] == 200
    served, errors, steered = [], [], []
    lock = threading.Lock()
    stop = time.time() + 8

    def client(i):
        n = 0
        while time.time() < stop:
            body = {"prompt": f"{PROMPTS[i % 4]} {i}-{n}", "max_tokens": 3 + i % 4}
            if n % 3 == 2:
                path = "/v1/chat/completions"
                body = {"messages": [{"role": "user", "content": body["prompt"]}], **body}
                body.pop("prompt")
            else:
                path = "/v1/completions"
            if i == 0 and n % 2:  # steered requests run alone: the running batch drains first
                body["mlxfun_steer"] = {"rules": [{"layer": 0, "experts": [0], "mode": "mask"}]}
                steered.append(n)
            status, answer = server.call("POST", path, body)
            if n % 2:
                server.call("GET", "/v1/mlxfun/stats?scorer=frequency")
            with lock:
                if status != 200:
                    errors.append(answer)
                else:
                    usage = answer["usage"]
                    served.append(usage["prompt_tokens"] + usage["completion_tokens"])
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and steered
    status, live = server.call("GET", "/v1/mlxfun/stats")
    assert len(served) >= 16
    assert live["token_counts"] == [sum(served)] * 2
    frequency = np.array(live["scores"]["frequency"])
    assert frequency.sum(axis=1).tolist() == [2.0 * sum(served)] * 2  # top-2 routing
    assert server.call("GET", "/health")[0] == 200


def test_dashboard_page_is_served_without_the_key(server):
    status, page = server.call("GET", "/", key=None)  # static files hold no data
    assert status == 200 and "<title>mlxfun dashboard</title>" in page
    assert server.call("GET", "/dashboard.js")[0] == 200


def test_non_loopback_host_needs_an_api_key(model_dir, tmp_path, capsys):
    code = main(
        ["serve", "--model", str(model_dir), "--host", "0.0.0.0", "--workdir", str(tmp_path)]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "--api-key" in err and "Traceback" not in err
    spec = tmp_path / "spec.json"
    spec.write_text('{"rules": []}')
    assert main(["serve", "--model", str(model_dir), "--spec", str(spec)]) == 1
    assert "no rules" in capsys.readouterr().err


def _top_experts(server, layer_position, count):
    frequency = np.array(server.call("GET", "/v1/mlxfun/stats")[1]["scores"]["frequency"])
    return [int(e) for e in np.argsort(-frequency[layer_position], kind="stable")[:count]]


def test_steering_masks_change_routing_as_run_time_steering_does(server, loaded):
    from mlxfun.core import plugins
    from mlxfun.core.collect import collect_stats
    from mlxfun.methods.steer import steering

    model, tokenizer, config = loaded
    adapter = plugins.adapter_for_config(config)
    server.call("POST", "/v1/mlxfun/stats/reset", {})
    server.call("POST", "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 6})
    masked = _top_experts(server, 0, 2)
    spec = {"rules": [{"layer": 0, "experts": masked, "mode": "mask"}]}
    status, answer = server.call("POST", "/v1/mlxfun/steer", spec)
    assert status == 200 and answer["spec"]["rules"][0]["experts"] == masked
    assert server.call("GET", "/v1/mlxfun/steer")[1]["spec"]["rules"][0]["mode"] == "mask"
    server.call("POST", "/v1/mlxfun/stats/reset", {})
    sequences, texts = [], []
    for prompt in PROMPTS[:2]:
        status, body = server.call("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 6})
        assert status == 200, body
        texts.append(body["choices"][0]["text"])
        prompt_tokens = tokenizer.encode(prompt)
        with steering(model, spec, adapter, config):
            tokens, text = _generated(loaded, prompt_tokens, 6)
        assert texts[-1] == text
        sequences.append(prompt_tokens + tokens)
    live = server.call("GET", "/v1/mlxfun/stats")[1]
    scorers = [plugins.get_scorer(n) for n in ("frequency", "reap")]
    with steering(model, spec, adapter, config):
        collector, _ = collect_stats(model, adapter, sequences, scorers, progress=False)
    expected = collector.scores()
    frequency = np.array(live["scores"]["frequency"])
    np.testing.assert_array_equal(frequency, expected["frequency"])
    np.testing.assert_allclose(np.array(live["scores"]["reap"]), expected["reap"], rtol=1e-4)
    assert frequency[0, masked].tolist() == [0.0, 0.0] and frequency[1].sum() > 0

    # one request unsteered (its own spec: none), while the active spec stays
    status, plain = server.call(
        "POST", "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 6, "mlxfun_steer": None}
    )
    assert plain["choices"][0]["text"] == _generated(loaded, tokenizer.encode(PROMPTS[0]), 6)[1]
    assert server.call("DELETE", "/v1/mlxfun/steer")[1] == {"spec": None}
    status, after = server.call("POST", "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 6})
    assert after["choices"][0]["text"] == plain["choices"][0]["text"]


def test_bad_steering_specs_are_4xx(server):
    bad = [
        {"rules": [{"layer": 7, "experts": [0], "mode": "mask"}]},  # no such layer
        {"rules": [{"layer": 0, "experts": [99], "mode": "mask"}]},  # no such expert
        {
            "rules": [
                {"layer": "all", "experts": [1], "mode": "mask"},
                {"layer": 0, "experts": [1], "mode": "force"},
            ]
        },  # fmt: skip
        {"rules": [{"layer": 0, "experts": [0], "mode": "nope"}]},
        {"nothing": 1},
    ]
    for spec in bad:
        status, answer = server.call("POST", "/v1/mlxfun/steer", spec)
        assert status == 400 and "error" in answer, (spec, answer)
        body = {"prompt": "x", "max_tokens": 2, "mlxfun_steer": spec}
        status, answer = server.call("POST", "/v1/completions", body)
        assert status == 400 and "error" in answer, (spec, answer)
    assert server.call("GET", "/v1/mlxfun/steer")[1] == {"spec": None}


def test_mlxfun_ui_relays_to_the_server_with_its_key(server):
    import urllib.request

    from mlxfun.methods.dashboard_proxy import build_proxy

    proxy = build_proxy(server.url, 0, server.key)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        local = f"http://127.0.0.1:{proxy.server_address[1]}"
        with urllib.request.urlopen(local + "/") as response:
            assert b"mlxfun dashboard" in response.read()
        with urllib.request.urlopen(local + "/v1/mlxfun/info") as response:  # no key here
            assert json.loads(response.read())["layers"] == [0, 1]
        body = json.dumps({"prompt": "abc", "max_tokens": 3}).encode()
        request = urllib.request.Request(local + "/v1/completions", data=body, method="POST")
        with urllib.request.urlopen(request) as response:
            assert json.loads(response.read())["usage"]["completion_tokens"] == 3
    finally:
        proxy.shutdown()
        proxy.server_close()
