"""The ``/v1/mlxfun/...`` routes of ``mlxfun serve`` (docs/dashboard.md lists them).

``dispatch`` returns ``(status, JSON body)``; bad input raises ``serve.RequestError`` (or
``MlxfunError``), which the handler answers with a 4xx JSON error.
"""

import json
import re
import shlex
import time
from pathlib import Path


class RequestError(Exception):
    """A bad request: answered with ``status`` and a one-line JSON error."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


SELECTOR_MODES = {"model_wide": "model-wide", "per_layer": "bottom"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,120}$")


def dispatch(state, handler, method: str, path: str, query: dict):
    route = path[len("/v1/mlxfun/") :].strip("/")
    if route.startswith("jobs"):
        return _jobs(state, handler, method, route)
    table = {
        ("GET", "info"): lambda: (200, _info(state)),
        ("GET", "stats"): lambda: (200, _stats(state, query)),
        ("POST", "stats/reset"): lambda: _reset(state, handler),
        ("POST", "stats/save"): lambda: _save(state, handler.json_body()),
        ("POST", "stats/load"): lambda: _load(state, handler.json_body()),
        ("POST", "stats/upload"): lambda: _upload(state, handler, query),
        ("POST", "stats/merge"): lambda: _merge(state, handler.json_body()),
        ("GET", "files"): lambda: (200, _files(state)),
        ("GET", "report"): lambda: _report(state, query),
        ("POST", "select"): lambda: (200, _select(state, handler.json_body())),
        ("POST", "prune"): lambda: _submit(state, "prune", handler.json_body()),
        ("POST", "merge"): lambda: _submit(state, "merge", handler.json_body()),
        ("GET", "steer"): lambda: (200, _steer_json(state)),
        ("POST", "steer"): lambda: _set_steer(state, handler.json_body()),
        ("DELETE", "steer"): lambda: _set_steer(state, None),
    }
    action = table.get((method, route))
    if action is None:
        known = any(r == route for _, r in table)
        raise RequestError(
            f"{method} is not allowed on {path}" if known else f"no route {method} {path}",
            405 if known else 404,
        )
    return action()


# ---------------------------------------------------------------------------------------------
# statistics


def _live(state):
    if state.live is None:
        raise RequestError("the model is still loading", 503)
    return state.live


def _counting(state):
    if not state.options.count:
        raise RequestError("this server does not count routing (started with --no-stats)", 409)
    return _live(state)


def _info(state) -> dict:
    live = _live(state)
    return {
        "model": str(state.options.model),
        "adapter": live.adapter.name,
        "layers": [layer.index for layer in live.layers],
        "experts_per_layer": [layer.num_experts for layer in live.layers],
        "top_k": [layer.top_k for layer in live.layers],
        "scorers": [s.name for s in live.scorers],
        "workdir": str(state.workdir),
        "steering": True,
        "auth": bool(state.options.api_key),
        "counting": state.options.count,
    }


def _stats(state, query: dict) -> dict:
    data = _counting(state).snapshot()
    return _filtered(data, query)


def _filtered(data: dict, query: dict) -> dict:
    """``?scorer=NAME`` keeps one scorer, ``?layer=INDEX`` one MoE layer."""
    if "scorer" in query:
        if query["scorer"] not in data["scores"]:
            known = ", ".join(sorted(data["scores"]))
            raise RequestError(f"unknown scorer {query['scorer']!r}; known: {known}")
        data["scores"] = {query["scorer"]: data["scores"][query["scorer"]]}
    if "layer" in query:
        try:
            position = data["layers"].index(int(query["layer"]))
        except ValueError:
            raise RequestError(
                f"unknown layer {query['layer']!r}; the MoE layers are {data['layers']}"
            ) from None
        data["layers"] = [data["layers"][position]]
        data["experts_per_layer"] = [data["experts_per_layer"][position]]
        data["token_counts"] = [data["token_counts"][position]]
        data["scores"] = {k: [v[position]] for k, v in data["scores"].items()}
    return data


def _reset(state, handler):
    handler.read_body()
    _counting(state).reset()
    return 200, {"reset": True}


def _save(state, body: dict):
    target = state.path(body.get("path", ""), "path")
    if target.suffix != ".npz":
        raise RequestError("path must end with .npz (a stats file)")
    if target.exists() and not body.get("force"):
        raise RequestError(f'{body["path"]} exists; pass "force": true to replace it', 409)
    summary = _counting(state).save(target)
    summary["path"] = _relative(state, target)
    return 200, summary


def _stats_file(state, text, what="path"):
    from mlxfun.core.stats import load_stats

    return load_stats(state.path(text, what, must_exist=True))


def _load(state, body: dict):
    from .live_stats import stats_json

    stats = _stats_file(state, body.get("path", ""))
    return 200, stats_json(stats, body["path"])


def _upload(state, handler, query: dict):
    from mlxfun.core.errors import MlxfunError
    from mlxfun.core.stats import load_stats

    from .live_stats import stats_json

    name = query.get("name", "")
    if not _SAFE_NAME.match(name) or not name.endswith(".npz") or name.startswith("."):
        raise RequestError("?name= must be a plain file name ending in .npz (letters, digits, ._-)")
    data = handler.read_body()
    folder = state.workdir / "uploads"
    folder.mkdir(exist_ok=True)
    target = folder / name
    tmp = folder / f".{name}.upload-{time.time_ns()}.npz"
    tmp.write_bytes(data)
    try:
        stats = load_stats(tmp)
    except MlxfunError as exc:
        tmp.unlink(missing_ok=True)
        raise RequestError(str(exc).replace(str(tmp), name)) from None
    tmp.replace(target)
    result = stats_json(stats, _relative(state, target))
    result["path"] = _relative(state, target)
    return 200, result


def _merge(state, body: dict):
    from mlxfun.core import plugins
    from mlxfun.core.stats import MERGE_MODES, merge_stats, save_stats

    from .live_stats import stats_json

    paths = body.get("paths")
    if not isinstance(paths, list) or len(paths) < 2:
        raise RequestError("paths must list at least two stats files of the workdir")
    mode = body.get("mode", "rank")
    if mode not in MERGE_MODES:
        raise RequestError(f"unknown mode {mode!r}; use {', '.join(MERGE_MODES)}")
    stats = [_stats_file(state, p, "paths[]") for p in paths]
    by_name = {s.name: s for s in (plugins.get_scorer(n) for n in plugins.plugin_names("scorer"))}
    merged = merge_stats(stats, by_name, mode)
    result = stats_json(merged, f"{mode} merge of {len(paths)} files")
    if body.get("output"):
        target = state.path(body["output"], "output")
        if target.suffix != ".npz":
            raise RequestError("output must end with .npz")
        save_stats(target, merged.scores, merged.accumulators, merged.token_counts, merged.metadata)
        result["path"] = _relative(state, target)
    return 200, result


def _relative(state, path: Path) -> str:
    return str(path.relative_to(state.workdir))


def _files(state) -> dict:
    stats, reports = [], []
    for path in sorted(state.workdir.rglob("*")):
        relative = path.relative_to(state.workdir)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if path.suffix == ".npz":
            stats.append(str(relative))
        elif (
            path.suffix == ".json" and path.name != "mlxfun.json" and path.stat().st_size < 8 << 20
        ):
            if _looks_like_report(path):
                reports.append(str(relative))
        if len(stats) + len(reports) > 500:
            break
    return {"stats": stats, "reports": reports}


def _looks_like_report(path: Path) -> bool:
    """A scan report: a JSON object with per-expert rows (``experts`` or ``layers``)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and any(k in data for k in ("experts", "layers", "groups"))


def _report(state, query: dict):
    path = state.path(query.get("path", ""), "path", must_exist=True)
    try:
        return 200, json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RequestError(f"{query['path']} is not a JSON report ({exc})") from None


# ---------------------------------------------------------------------------------------------
# selection and jobs


def _snapshot_live(state) -> str:
    name = f"live-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 1000000:06d}.npz"
    _counting(state).save(state.workdir / name)
    return name


def _compress_fields(state, body: dict, kind: str) -> dict:
    """The compressor request (JSON-ready) from a job body: seed 000's names
    (``saliency_file``, ``n_prune``, ``mode``, ``output_path``) or mlxfun's (``stats``, ``n``,
    ``selector``, ``output``). Paths are confined to the workdir."""
    stats = body.get("stats", body.get("saliency_file"))
    if stats is None:
        raise RequestError('give "stats": a stats file in the workdir, or "live"')
    if stats == "live":
        stats = _snapshot_live(state)
    fields = {
        "model": str(state.options.model),
        "stats": str(state.path(stats, "stats", must_exist=True)),
        "scorer": body.get("scorer", "reap"),
    }
    mode = body.get("mode")
    if mode is not None and mode not in SELECTOR_MODES:
        raise RequestError(f"unknown mode {mode!r}; use model_wide or per_layer")
    fields["selector"] = body.get("selector") or SELECTOR_MODES.get(mode, "bottom")
    n = body.get("n", body.get("n_prune"))
    ratio = body.get("ratio")
    if (n is None) == (ratio is None):
        raise RequestError('give exactly one of "n" (or "n_prune") and "ratio"')
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise RequestError('"n" must be a positive integer')
    if ratio is not None and (not isinstance(ratio, (int, float)) or not 0 < ratio < 1):
        raise RequestError('"ratio" must be a number between 0 and 1')
    fields.update(n=n, ratio=ratio)
    for key in ("min_keep", "normalize", "force"):
        if key in body:
            fields[key] = body[key]
    for key in ("protect", "target"):
        if key in body:
            fields[key] = _expert_lists(body[key], key)
    output = body.get("output", body.get("output_path"))
    if kind == "select":
        return fields
    fields["output"] = str(state.path(output, "output"))
    if kind == "merge":
        datasets = body.get("dataset", body.get("datasets"))
        datasets = [datasets] if isinstance(datasets, str) else datasets
        if not datasets or not isinstance(datasets, list):
            raise RequestError('merge needs "dataset": calibration text in the workdir')
        fields["dataset"] = [str(state.path(d, "dataset", must_exist=True)) for d in datasets]
        for key in ("group_size", "max_tokens", "max_samples", "batch_size", "seed"):
            if key in body:
                fields[key] = body[key]
    return fields


def _expert_lists(value, key: str) -> list[str]:
    """``{"layer": [experts]}`` or CLI strings (``"3:0,5"``) into ``parse_expert_lists`` items."""
    if isinstance(value, dict):
        return [f"{layer}:{','.join(str(e) for e in experts)}" for layer, experts in value.items()]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise RequestError(f'"{key}" must map layers to expert lists, e.g. {{"3": [0, 5]}}')


def _plan(fields: dict, dry_output=None):
    """The prune plan (nothing written): checks the request exactly as the CLI would."""
    from .jobs import compress_request
    from .prune import plan_prune

    fields = {**fields, "output": dry_output, "dry_run": dry_output is None}
    request = compress_request("prune", {k: v for k, v in fields.items() if k in _PRUNE_FIELDS})
    try:
        return plan_prune(request)
    except TypeError as exc:
        raise RequestError(f"bad request field: {exc}") from None


_PRUNE_FIELDS = {
    "model",
    "stats",
    "output",
    "scorer",
    "selector",
    "n",
    "ratio",
    "protect",
    "target",
    "min_keep",
    "normalize",
    "force",
    "dry_run",
}


def cli_command(state, fields: dict, output: str = "pruned") -> str:
    """The ``mlxfun prune`` command that makes this selection (paths as the server sees them)."""
    words = ["mlxfun", "prune", "--model", fields["model"], "--stats", fields["stats"]]
    words += ["--scorer", fields["scorer"], "--selector", fields["selector"]]
    words += ["--n", str(fields["n"])] if fields.get("n") is not None else []
    words += ["--ratio", str(fields["ratio"])] if fields.get("ratio") is not None else []
    if fields.get("min_keep") is not None:
        words += ["--min-keep", str(fields["min_keep"])]
    if fields.get("normalize", "none") != "none":
        words += ["--normalize", fields["normalize"]]
    for key in ("protect", "target"):
        for item in fields.get(key) or []:
            words += [f"--{key}", item]
    words += ["--output", str(state.workdir / output)]
    return shlex.join(words)


def _select(state, body: dict) -> dict:
    """Which experts a prune with these settings removes (the selector's own choice)."""
    fields = _compress_fields(state, body, "select")
    plan = _plan(fields)
    summary = dict(plan.summary)
    summary.pop("keep", None)
    summary["stats"] = _relative(state, Path(fields["stats"]))
    summary["command"] = cli_command(state, fields, body.get("output") or "pruned")
    return summary


def _submit(state, kind: str, body: dict):
    fields = _compress_fields(state, body, kind)
    output = Path(fields["output"])
    if output.exists() and not fields.get("force"):
        raise RequestError(f"output {body.get('output', body.get('output_path'))} exists", 409)
    _plan({k: v for k, v in fields.items() if k != "output"})  # bad settings: 400 now
    job = state.jobs.submit(kind, fields)
    return 202, job.as_json()


def _jobs(state, handler, method: str, route: str):
    parts = route.split("/")
    if parts == ["jobs"] and method == "GET":
        return 200, {"jobs": [job.as_json() for job in state.jobs.all()]}
    if len(parts) >= 2:
        job = state.jobs.get(parts[1])
        if job is None:
            raise RequestError(f"no job {parts[1]}", 404)
        if len(parts) == 2 and method == "GET":
            return 200, job.as_json()
        if (len(parts) == 2 and method == "DELETE") or (
            parts[2:] == ["cancel"] and method == "POST"
        ):
            return 200, state.jobs.cancel(job.id).as_json()
    raise RequestError(f"no route {method} /v1/mlxfun/{route}", 404)


# ---------------------------------------------------------------------------------------------
# steering


def _steer_json(state) -> dict:
    with state.steer_lock:
        spec = state.steer_spec
    return {"spec": None if spec is None else spec.to_json()}


def _set_steer(state, body):
    _live(state)
    if body is not None and not body:
        raise RequestError('give a steering spec: {"rules": [{"layer", "experts", "mode"}]}')
    state.set_steering(body)
    return 200, _steer_json(state)
