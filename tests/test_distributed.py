"""``mlxfun collect`` on several ranks (``mx.distributed``, ring backend on localhost): the
statistics equal a single-process run, mismatched ranks and ranks that die or hang stop every
rank with one error line, and nothing is half-written."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlxfun.core.datasets import batches
from mlxfun.core.distributed import Ranks, share
from mlxfun.core.stats import load_stats

from .adapters.test_examples import QWEN3_MOE
from .model_dirs import write_model_dir

BIN = Path(sys.executable).parent
TIMEOUT = 180  # seconds for a whole launch on a busy machine; the runs take a few seconds
TEXTS = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(9)] + [
    f"The {w} walked along the river and sang." for w in "cat dog bird fox owl".split()
]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("m") / "qwen", "qwen3_moe", QWEN3_MOE)


def free_ports(count: int) -> int:
    """A first port such that it and the next ``count - 1`` are free now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError("no free ports")


def collect_args(model, dataset, output, *extra):
    return [
        "-m",
        "mlxfun.cli",
        "collect",
        "--model",
        str(model),
        "--dataset",
        str(dataset),
        "-o",
        str(output),
        "--batch-size",
        "2",
        *extra,
    ]


def single(model, dataset, output, *extra):
    args = [sys.executable, *collect_args(model, dataset, output, *extra)]
    subprocess.run(args, check=True, capture_output=True, timeout=TIMEOUT)
    return load_stats(output)


def start_ranks(tmp_path, per_rank_args, stderr_files=True):
    """Start one process per rank with the environment ``mlx.launch --backend ring`` gives
    them (a hostfile and ``MLX_RANK``), so each rank can get its own arguments."""
    port = free_ports(len(per_rank_args))
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(len(per_rank_args))]))
    processes = []
    for rank, args in enumerate(per_rank_args):
        env = dict(os.environ, MLX_HOSTFILE=str(hostfile), MLX_RANK=str(rank))
        err = open(tmp_path / f"rank{rank}.err", "w")
        processes.append(
            subprocess.Popen(
                [sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=err
            )
        )
        err.close()
    return processes


def wait_all(processes, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    codes = []
    for p in processes:
        try:
            codes.append(p.wait(max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            for q in processes:
                q.kill()
            raise AssertionError("a rank hung past the test's timeout") from None
    return codes


def error_lines(path):
    return [line for line in Path(path).read_text().splitlines() if line.startswith("error: ")]


def assert_same_stats(a, b):
    assert a.token_counts.dtype == b.token_counts.dtype == np.int64
    np.testing.assert_array_equal(a.token_counts, b.token_counts)
    assert sorted(a.scores) == sorted(b.scores)
    for name in a.accumulators:
        for key, value in a.accumulators[name].items():
            other = b.accumulators[name][key]
            if key in ("count", "max", "routed", "tokens", "shape"):  # counts and maxima: exact
                np.testing.assert_array_equal(value, other, err_msg=f"{name}.{key}")
            else:
                np.testing.assert_allclose(value, other, rtol=1e-12, err_msg=f"{name}.{key}")
    for name in a.scores:
        np.testing.assert_allclose(a.scores[name], b.scores[name], rtol=1e-12, err_msg=name)


def test_shares_are_the_single_process_batches_dealt_round_robin():
    sequences = [[i] * (1 + (i * 7) % 11) for i in range(23)]
    whole = [t.tolist() for t, _ in batches(sorted(sequences, key=len, reverse=True), 4)]
    for size in (1, 2, 3, 7, 30):
        dealt = {}
        for rank in range(size):
            mine = share(sequences, 4, Ranks(rank=rank, size=size))
            for index, (tokens, _) in enumerate(batches(mine, 4)):
                dealt[rank + index * size] = tokens.tolist()
        assert [dealt[i] for i in range(len(whole))] == whole


@pytest.mark.parametrize("count", [len(TEXTS), 1], ids=["shared", "rank-1-gets-nothing"])
def test_two_ranks_with_mlx_launch_equal_one_process(qwen_dir, tmp_path, count):
    data = write_jsonl(tmp_path / "data.jsonl", TEXTS[:count])
    one = single(qwen_dir, data, tmp_path / "one" / "s.npz")
    out = tmp_path / "two" / "s.npz"
    launch = [
        str(BIN / "mlx.launch"),
        "--backend",
        "ring",
        "-n",
        "2",
        "--hosts",
        "127.0.0.1",
        "--starting-port",
        str(free_ports(2)),
        "--python",
        sys.executable,
        "--",
        *collect_args(qwen_dir, data, out),
    ]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.stdout.count(f"wrote {out}") == 1, done.stdout + done.stderr
    two = load_stats(out)
    assert_same_stats(one, two)
    assert (two.metadata["ranks"], two.metadata["ranks_split"]) == (2, "data")
    assert {k: v for k, v in two.metadata.items() if not k.startswith("ranks")} == one.metadata
    assert os.listdir(out.parent) == ["s.npz"]  # rank 1 wrote nothing, no temporary left


def test_the_model_may_sit_at_another_path_on_another_rank(qwen_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", TEXTS)
    elsewhere = shutil.copytree(qwen_dir, tmp_path / "elsewhere")
    out = tmp_path / "out" / "s.npz"
    ranks = start_ranks(
        tmp_path,
        [collect_args(qwen_dir, data, out), collect_args(elsewhere, data, out)],
    )
    assert wait_all(ranks) == [0, 0], (tmp_path / "rank0.err").read_text()
    assert_same_stats(single(qwen_dir, data, tmp_path / "one.npz"), load_stats(out))


@pytest.mark.parametrize("differs", ["model", "data", "options"])
def test_ranks_with_different_models_data_or_options_stop_before_collecting(
    qwen_dir, tmp_path, differs
):
    data = write_jsonl(tmp_path / "data.jsonl", TEXTS)
    other_model, other_data, extra = qwen_dir, data, []
    if differs == "model":
        other_model = write_model_dir(tmp_path / "other", "qwen3_moe", QWEN3_MOE, seed=1)
    elif differs == "data":
        other_data = write_jsonl(tmp_path / "other.jsonl", TEXTS[:-1])
    else:
        extra = ["--seed", "3"]
    out = tmp_path / "out" / "s.npz"
    ranks = start_ranks(
        tmp_path,
        [collect_args(qwen_dir, data, out), collect_args(other_model, other_data, out, *extra)],
    )
    assert wait_all(ranks) == [1, 1]
    for rank in (0, 1):
        lines = error_lines(tmp_path / f"rank{rank}.err")
        assert len(lines) == 1 and f"rank 1's {differs} differs from rank 0's" in lines[0]
    assert not out.parent.exists() or os.listdir(out.parent) == []


def test_a_rank_that_fails_stops_the_others_with_an_error(qwen_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", TEXTS)
    out = tmp_path / "out" / "s.npz"
    ranks = start_ranks(
        tmp_path,
        [collect_args(qwen_dir, data, out), collect_args(tmp_path / "missing", data, out)],
    )
    assert wait_all(ranks) == [1, 1]
    assert "missing" in error_lines(tmp_path / "rank1.err")[0]
    (line,) = error_lines(tmp_path / "rank0.err")
    assert line.startswith("error: rank 0: lost the other ranks while comparing the runs")
    assert not out.parent.exists() or os.listdir(out.parent) == []


def test_a_rank_that_never_starts_times_out(qwen_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", TEXTS)
    out = tmp_path / "out" / "s.npz"
    ranks = start_ranks(
        tmp_path,
        [collect_args(qwen_dir, data, out, "--rank-timeout", "3"), ["-c", "pass"]],
    )
    start = time.monotonic()
    assert wait_all(ranks)[0] == -signal.SIGTERM
    assert time.monotonic() - start < 60
    (line,) = error_lines(tmp_path / "rank0.err")
    assert "no answer from the other ranks after 3 s while connecting" in line
    assert not out.parent.exists() or os.listdir(out.parent) == []


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_while_collecting(qwen_dir, tmp_path, stop):
    # enough batches that rank 0 is still collecting when rank 1 is stopped
    data = write_jsonl(tmp_path / "data.jsonl", TEXTS * 40)
    out = tmp_path / "out" / "s.npz"
    args = collect_args(qwen_dir, data, out, "--batch-size", "1", "--rank-timeout", "5")
    ranks = start_ranks(tmp_path, [args, args])
    try:
        deadline = time.monotonic() + TIMEOUT
        while "collect:" not in (tmp_path / "rank0.err").read_text():  # rank 0's progress bar
            assert ranks[0].poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(ranks[1].pid, stop)
        code = wait_all(ranks[:1])[0]
    finally:
        ranks[1].kill()
        ranks[1].wait()
    (line,) = error_lines(tmp_path / "rank0.err")
    if stop == signal.SIGKILL:
        assert code == 1
        assert line.startswith("error: rank 0: lost the other ranks while gathering")
    else:
        assert code == -signal.SIGTERM
        assert "rank 0: no answer from the other ranks after 5 s while gathering" in line
    assert not out.parent.exists() or os.listdir(out.parent) == []


@pytest.mark.parametrize(
    "model_type, bits",
    [("qwen3_moe", None), ("qwen3_moe", 4), ("deepseek_v3", None)],
    ids=["qwen3_moe", "qwen3_moe-4bit", "deepseek_v3"],
)
def test_pipeline_over_two_ranks_equals_one_process(tmp_path, model_type, bits):
    # three decoder layers, the first dense: mlx-lm gives rank 1 layer 0 (no MoE layer to
    # observe) and rank 0 layers 1-2
    from .adapters.test_biased_family import DEEPSEEK_V3

    args = {
        "qwen3_moe": dict(QWEN3_MOE, num_hidden_layers=3, mlp_only_layers=[0]),
        "deepseek_v3": dict(DEEPSEEK_V3, num_hidden_layers=3, first_k_dense_replace=1),
    }[model_type]
    model = write_model_dir(tmp_path / "model", model_type, args, bits=bits)
    data = write_jsonl(tmp_path / "data.jsonl", TEXTS)
    one = single(model, data, tmp_path / "one.npz")
    out = tmp_path / "out" / "s.npz"
    ranks = start_ranks(tmp_path, [collect_args(model, data, out, "--pipeline")] * 2)
    assert wait_all(ranks) == [0, 0], (tmp_path / "rank0.err").read_text()
    two = load_stats(out)
    assert one.metadata["moe_layers"] == [1, 2]
    assert two.metadata["fingerprint"] == one.metadata["fingerprint"]
    # each layer is observed by one rank over the same batches: the same additions, exactly
    np.testing.assert_array_equal(two.token_counts, one.token_counts)
    for name, acc in one.accumulators.items():
        for key, value in acc.items():
            np.testing.assert_array_equal(two.accumulators[name][key], value, err_msg=name)
    assert two.metadata["ranks_split"] == "layers"
    assert os.listdir(out.parent) == ["s.npz"]


def test_pipeline_refuses_a_model_mlx_lm_cannot_pipeline(tmp_path, capsys):
    from mlxfun.cli.app import main

    from .adapters.test_examples import MIXTRAL

    model = write_model_dir(tmp_path / "mixtral", "mixtral", MIXTRAL)
    data = write_jsonl(tmp_path / "data.jsonl", TEXTS)
    out = tmp_path / "s.npz"
    args = ["collect", "--model", str(model), "--dataset", str(data), "-o", str(out)]
    assert main([*args, "--pipeline"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: mlx-lm cannot pipeline mixtral models (no model.pipeline); collect without "
        "--pipeline: each rank then takes a share of the data"
    )
    assert not out.exists()
