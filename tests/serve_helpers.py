"""A real ``mlxfun serve`` process on a free port, and a small HTTP client for it (stdlib)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir, workdir, *extra, api_key=KEY):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = api_key
        args = ["serve", "--model", str(model_dir), "--port", str(self.port)]
        args += ["--workdir", str(workdir), *extra]
        if api_key:
            args += ["--api-key", api_key]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLXFUN_")}
        self.log = open(os.path.join(workdir, "..", f"server-{self.port}.log"), "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlxfun.cli", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self._wait()

    def _wait(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlxfun serve exited: {self.read_log()}")
            try:
                if self.call("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"mlxfun serve did not start: {self.read_log()}")

    def read_log(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def call(self, method, path, body=None, key="default", raw=None, headers=None, timeout=120):
        """``(status, parsed JSON or text)``; ``raw``: bytes sent as is."""
        key = self.key if key == "default" else key
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def wait_job(self, job_id, timeout=240):
        deadline = time.time() + timeout
        while time.time() < deadline:
            status, job = self.call("GET", f"/v1/mlxfun/jobs/{job_id}")
            assert status == 200, job
            if job["state"] not in ("queued", "running"):
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} still running after {timeout} s")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
