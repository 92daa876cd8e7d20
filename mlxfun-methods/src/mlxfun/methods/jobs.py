"""Prune and merge jobs for ``mlxfun serve``: one worker thread runs them one at a time.

Each job runs the ordinary compressor (``prune`` or ``ream``) in a child Python process, so a
merge's forwards never share MLX with the served model's generation thread, and a cancel stops
the child at once (the compressors write to a temporary directory and move it into place only
when complete, so a cancelled job leaves no output). Progress is the child's tqdm bar, read
from its stderr; the summary is its last stdout line (JSON).

``python -m mlxfun.methods.jobs KIND REQUEST_JSON`` is the child's entry point.
"""

import itertools
import json
import queue
import re
import subprocess
import sys
import threading
import time

import attrs

KINDS = ("prune", "merge")
_PERCENT = re.compile(r"(?:^|[\r\n])\s*([^\r\n:|]*?):?\s*(\d{1,3})%\|")


@attrs.define
class Job:
    id: str
    kind: str
    request: dict
    state: str = "queued"  # queued, running, done, failed, cancelled
    progress: float = 0.0
    phase: str = ""
    summary: dict | None = None
    error: str | None = None
    created: float = attrs.field(factory=time.time)
    started: float | None = None
    finished: float | None = None
    process: object = attrs.field(default=None, repr=False)

    def as_json(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "progress": round(self.progress, 4),
            "phase": self.phase,
            "request": self.request,
            "summary": self.summary,
            "error": self.error,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
        }


class JobRunner:
    """Queue of jobs and the one worker thread that runs them."""

    def __init__(self, env: dict | None = None):
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        self._env = env
        self._thread = threading.Thread(target=self._work, name="mlxfun-jobs", daemon=True)
        self._thread.start()

    def submit(self, kind: str, request: dict) -> Job:
        with self.lock:
            job = Job(id=f"job-{next(self._ids)}", kind=kind, request=request)
            self.jobs[job.id] = job
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def all(self) -> list[Job]:
        with self.lock:
            return list(self.jobs.values())

    def cancel(self, job_id: str) -> Job | None:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job.state not in ("queued", "running"):
                return job
            if job.state == "queued":
                job.state, job.finished = "cancelled", time.time()
            elif job.process is not None:
                job.state = "cancelled"
                job.process.terminate()
        return job

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            with self.lock:
                if job.state != "queued":
                    continue
                job.state, job.started = "running", time.time()
            try:
                self._run(job)
            except Exception as exc:  # the worker must survive any job
                with self.lock:
                    job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
            with self.lock:
                job.finished = time.time()

    def _run(self, job: Job) -> None:
        command = [sys.executable, "-m", "mlxfun.methods.jobs", job.kind, json.dumps(job.request)]
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self._env,
        )
        with self.lock:
            job.process = process
            if job.state == "cancelled":
                process.terminate()
        reader = threading.Thread(target=self._read_progress, args=(job, process.stderr))
        reader.start()
        out = process.stdout.read().decode(errors="replace")
        process.wait()
        reader.join()
        lines = [line for line in out.splitlines() if line.strip()]
        try:
            result = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            result = {}
        with self.lock:
            job.process = None
            if job.state == "cancelled":
                return
            if process.returncode == 0 and "summary" in result:
                job.state, job.summary, job.progress = "done", result["summary"], 1.0
            else:
                job.state = "failed"
                job.error = (
                    result.get("error")
                    or job.error
                    or (f"the {job.kind} process exited with status {process.returncode}")
                )

    def _read_progress(self, job: Job, stream) -> None:
        tail = ""
        while chunk := stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096):
            tail = (tail + chunk.decode(errors="replace"))[-2000:]
            found = _PERCENT.findall(tail)
            if found:
                phase, percent = found[-1]
                with self.lock:
                    job.phase = phase.strip() or job.kind
                    job.progress = min(int(percent), 100) / 100
            lines = [t for t in re.split(r"[\r\n]", tail) if t.startswith("error:")]
            if lines:
                with self.lock:
                    job.error = lines[-1][len("error:") :].strip()


# ---------------------------------------------------------------------------------------------
# The child process


def compress_request(kind: str, fields: dict):
    from .prune import PruneRequest, parse_expert_lists
    from .ream import MergeRequest

    fields = dict(fields)
    for key in ("protect", "target"):
        if key in fields:
            fields[key] = parse_expert_lists(fields[key], f"--{key}")
    return (MergeRequest if kind == "merge" else PruneRequest)(**fields)


def run_job(kind: str, fields: dict) -> dict:
    """One job in this process: the compressor's summary."""
    from mlxfun.core import plugins

    request = compress_request(kind, fields)
    compressor = plugins.get_compressor("ream" if kind == "merge" else "prune")
    return compressor.compress(request)


def main(argv=None) -> int:
    from mlxfun.core.errors import MlxfunError

    kind, text = (argv or sys.argv[1:])[:2]
    try:
        summary = run_job(kind, json.loads(text))
    except MlxfunError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 1
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps({"summary": summary}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
