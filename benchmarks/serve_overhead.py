"""Tokens/s of ``mlxfun serve`` (routing counters on, steering off) vs stock ``mlx_lm.server``
on the same requests, and requests/s under concurrency, measured in one run.

    python benchmarks/serve_overhead.py [--model demo/model] [--requests 12] [--max-tokens 64]
                                        [--clients 16] [--duration 60]

Both servers run as subprocesses on free ports, one at a time, with the same model, prompts and
greedy settings. Single stream: ``--requests`` completions one after another (seeded prompts
from the demo's evaluation text when present), tokens/s = completion tokens / wall time, after
two warm-up requests; the servers alternate in rounds so machine noise hits both alike, and the
slowdown is the median (and range) of the per-round ratios.
Concurrency: ``--clients`` threads send completions for ``--duration`` seconds; requests/s and
tokens/s. mlxfun serve runs with every installed scorer (its default), with ``--scorers
frequency`` and with ``--no-stats`` (the same serving without counting: what the
counters cost on their own). Target: mlxfun serve at most 1.05x slower than stock
single-stream. Both batch concurrent unsteered requests (mlx-lm's BatchGenerator, its default
concurrency); mlxfun serve counts only the real tokens of a batch (the prompts' padding masked).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "demo" / "model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, model: Path, workdir: str, extra=()):
    port = free_port()
    if kind == "stock":
        command = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model)]
        command += ["--port", str(port), "--log-level", "WARNING"]
    else:
        command = [sys.executable, "-m", "mlxfun.cli", "serve", "--model", str(model)]
        command += ["--port", str(port), "--workdir", workdir, *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{kind} server exited with {process.returncode}: {command}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit(f"{kind} server did not start")


def runnable_copy(model: Path, directory: str) -> Path:
    """The model in a dtype the CPU backend runs (stock mlx-lm refuses bf16 experts there; the
    loader of mlxfun converts them): both servers serve this copy."""
    from mlx_lm.utils import save_config, save_model
    from mlxfun.core.models import copy_tokenizer_files, load_model

    loaded, _, config = load_model(model)
    out = Path(directory) / "model"
    out.mkdir()
    save_model(out, loaded)
    config = {k: v for k, v in config.items() if k not in ("torch_dtype", "dtype")}
    save_config(config, out / "config.json")
    copy_tokenizer_files(model, out)
    return out


def complete(url: str, prompt: str, max_tokens: int) -> int:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}).encode()
    request = urllib.request.Request(url + "/v1/completions", data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=600) as response:
        usage = json.loads(response.read())["usage"]
    return usage["completion_tokens"], usage["prompt_tokens"] + usage["completion_tokens"]


def prompts(count: int) -> list[str]:
    source = ROOT / "demo" / "data" / "eval_prose.jsonl"
    texts = []
    if source.is_file():
        for line in source.read_text().splitlines():
            text = json.loads(line).get("text", "")
            if text:
                texts.append(text[:200])
    if not texts:
        texts = [f"The river number {i} runs past the old mill and" for i in range(count)]
    return [texts[i % len(texts)] for i in range(count)]


def single_stream(url: str, items: list[str], max_tokens: int) -> float:
    for text in items[:2]:
        complete(url, text, max_tokens)  # warm-up
    start_time = time.perf_counter()
    tokens = sum(complete(url, text, max_tokens)[0] for text in items)
    return tokens / (time.perf_counter() - start_time)


def concurrent(url: str, items: list[str], max_tokens: int, clients: int, duration: float):
    done, tokens, failed, served = [0], [0], [0], [0]
    lock = threading.Lock()
    stop = time.time() + duration

    def client(i):
        n = i
        while time.time() < stop:
            try:
                got, total = complete(url, items[n % len(items)], max_tokens)
            except OSError:  # refused or reset: counted, and the client tries again
                with lock:
                    failed[0] += 1
                time.sleep(0.05)
                continue
            with lock:
                done[0] += 1
                tokens[0] += got
                served[0] += total
            n += clients

    counted = _counted(url)
    start_time = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start_time
    after = _counted(url)
    lost = None if after is None else served[0] - (after - counted)
    return done[0] / elapsed, tokens[0] / elapsed, failed[0], lost


def _counted(url: str):
    """Tokens mlxfun serve has counted (None: a server without counters)."""
    try:
        with urllib.request.urlopen(url + "/v1/mlxfun/stats?scorer=frequency", timeout=60) as r:
            return json.loads(r.read())["tokens"]
    except OSError:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args()
    items = prompts(args.requests)
    workdir = tempfile.mkdtemp(prefix="serve-bench-")
    args.model = runnable_copy(args.model, workdir)
    configs = {
        "stock mlx_lm.server": ("stock", ()),
        "mlxfun serve (all scorers)": ("mlxfun", ()),
        "mlxfun serve (--scorers frequency)": ("mlxfun", ("--scorers", "frequency")),
        "mlxfun serve --no-stats": ("mlxfun", ("--no-stats",)),
    }
    speeds = {name: [] for name in configs}
    rates = {}
    for _ in range(args.rounds):
        for name, (kind, extra) in configs.items():
            process, url = start(kind, args.model, workdir, extra)
            try:
                speeds[name].append(single_stream(url, items, args.max_tokens))
            finally:
                process.terminate()
                process.wait()
    if args.duration > 0:
        for name, (kind, extra) in configs.items():
            process, url = start(kind, args.model, workdir, extra)
            try:
                rates[name] = concurrent(url, items, args.max_tokens, args.clients, args.duration)
            finally:
                process.terminate()
                process.wait()
    stock_runs = speeds["stock mlx_lm.server"]
    print(f"model {args.model}, {args.requests} requests x {args.max_tokens} tokens, "
          f"{args.rounds} rounds; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print(
        "| server | single-stream tok/s (median) | slowdown vs stock (median [range] of rounds) "
        f"| {args.clients} clients req/s | tok/s | failed requests | tokens served - counted |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in configs:
        speed = statistics.median(speeds[name])
        ratios = [s / m for s, m in zip(stock_runs, speeds[name])]  # paired per round
        spread = f"{statistics.median(ratios):.3f}x [{min(ratios):.2f}, {max(ratios):.2f}]"
        req, tok, failed, lost = rates.get(name, (float("nan"), float("nan"), 0, None))
        lost = "-" if lost is None else lost
        print(f"| {name} | {speed:.1f} | {spread} | {req:.2f} | {tok:.1f} | {failed} | {lost} |")


if __name__ == "__main__":
    main()
