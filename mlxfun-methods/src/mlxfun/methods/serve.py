"""``mlxfun serve``: mlx-lm's OpenAI-compatible server with routing statistics, prune and merge
jobs and the dashboard (docs/dashboard.md).

Chat completions, completions and streaming are ``mlx_lm.server``'s own (``APIHandler``,
``ResponseGenerator``); mlxfun replaces only how the model is loaded (``core.models``, the loader
of every other command) and adds its ``/v1/mlxfun/...`` routes, the dashboard at ``/`` and the
API key check. Unsteered requests are batched as stock mlx-lm batches them (its
``BatchGenerator``); the counters skip the padding of a batch (``live_stats.padding_mask``).
Steered requests are served one at a time (mlx-lm's sequential path) under their spec: the
steering hooks act on every row of a forward. The prompt cache is off by
default (``prompt_cache_size`` 0) so that every prompt token runs through the model and is
counted; a larger cache is faster for long chats but skips the cached prefix.
"""

import argparse
import hmac
import json
import logging
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import attrs
from mlxfun.core.errors import MlxfunError

from .serve_routes import RequestError

DASHBOARD = Path(__file__).with_name("dashboard")
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
MAX_BODY = 256 << 20  # a stats file upload
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@attrs.define(kw_only=True)
class ServeOptions:
    model: Path = attrs.field(converter=Path)
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    workdir: Path = attrs.field(default=Path("."), converter=Path)
    spec: Path | None = None
    scorers: list[str] | None = None  # None: every installed scorer
    max_tokens: int = 512
    prompt_cache_size: int = 0
    count: bool = True  # routing counters on (off: plain serving, for comparisons)
    chat_template: str = ""
    log_level: str = "WARNING"


def check_options(options: ServeOptions) -> None:
    if options.host not in LOOPBACK and not options.api_key:
        raise MlxfunError(
            f"--host {options.host} serves other machines; give --api-key KEY (clients send "
            "'Authorization: Bearer KEY'), or bind to 127.0.0.1"
        )
    if not (options.model / "config.json").is_file():
        raise MlxfunError(f"{options.model} is not a model directory (no config.json)")
    if not options.workdir.is_dir():
        raise MlxfunError(f"--workdir {options.workdir} is not a directory; create it first")
    if options.spec is not None:
        from .steer import load_spec

        load_spec(options.spec)  # a one-line error now, not after loading the model


def _cli_args(options: ServeOptions) -> argparse.Namespace:
    """What ``mlx_lm.server`` reads from its command line, with its defaults."""
    from mlx_lm.server import DEFAULT_QUANTIZED_KV_START

    return argparse.Namespace(
        model=str(options.model),
        adapter_path=None,
        host=options.host,
        port=options.port,
        allowed_origins=["*"],
        draft_model=None,
        num_draft_tokens=3,
        trust_remote_code=False,
        log_level=options.log_level,
        chat_template=options.chat_template,
        use_default_chat_template=False,
        temp=0.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        max_tokens=options.max_tokens,
        chat_template_args={},
        decode_concurrency=32,  # mlx-lm's defaults: batch as stock mlx_lm.server does
        prompt_concurrency=8,
        prefill_step_size=2048,
        prompt_cache_size=options.prompt_cache_size,
        prompt_cache_bytes=None,
        kv_bits=None,
        kv_group_size=64,
        quantized_kv_start=DEFAULT_QUANTIZED_KV_START,
        pipeline=False,
    )


def _model_provider_class():
    from mlx_lm.server import ModelProvider

    class MlxfunModelProvider(ModelProvider):
        """mlx-lm's provider, loading with mlxfun's loader and counting routing."""

        def __init__(self, cli_args, on_load):
            super().__init__(cli_args)
            self._on_load = on_load

        def load(self, model_path, adapter_path=None, draft_model_path=None):
            # any "model" name a client sends means the one served model; adapters are refused
            if adapter_path:
                raise ValueError(f"this server serves only {self.cli_args.model}, no adapters")
            return super().load("default_model", None, "default_model")

        def _load(self, model_path, adapter_path=None, draft_model_path=None):
            from mlxfun.core.models import load_model

            if self.model is not None:
                return
            model, tokenizer, config = load_model(model_path)
            if self.cli_args.chat_template:
                tokenizer.chat_template = self.cli_args.chat_template
            self.model_key = (model_path, adapter_path, draft_model_path)
            self.model, self.tokenizer = model, tokenizer
            self.processor, self.draft_model = None, None
            # batched only where the counters know the padding: plain KV caches (their batched
            # form records each row's right padding; live_stats.padding_mask reads it)
            from mlx_lm.models.cache import KVCache, make_prompt_cache

            self.is_batchable = all(type(c) is KVCache for c in make_prompt_cache(model))
            self._on_load(model, config)

    return MlxfunModelProvider


class ServerState:
    """What the handlers share: options, the generator, the live statistics, the jobs."""

    def __init__(self, options: ServeOptions):
        from mlxfun.core import plugins

        from .jobs import JobRunner

        self.options = options
        self.workdir = options.workdir.resolve()
        self.loaded = threading.Event()
        self.live = None
        self.load_error: str | None = None
        names = plugins.plugin_names("scorer") if options.scorers is None else options.scorers
        self.scorers = [plugins.get_scorer(n) for n in names]
        self.jobs = JobRunner()
        self.response_generator = None
        self.config: dict | None = None
        self.steer_spec = None  # the active SteeringSpec (every request without its own)
        self.steer_lock = threading.Lock()

    def on_load(self, model, config) -> None:
        from mlxfun.core import plugins

        from .live_stats import LiveStats

        adapter = plugins.adapter_for_config(config)
        self.config = config
        self.live = LiveStats(model, adapter, config, self.scorers, self.options.model)
        if self.options.count:
            self.live.install()
        if self.options.spec is not None:
            from .steer import load_spec

            try:
                self.set_steering(load_spec(self.options.spec))
            except MlxfunError as exc:
                self.load_error = str(exc)
                raise
        self.loaded.set()

    # -- steering --------------------------------------------------------------------------

    def check_spec(self, spec):
        """A spec (JSON object, or ``SteeringSpec``) checked against the served model: its
        layers, experts, modes and fingerprint (one-line ``MlxfunError`` otherwise)."""
        from .steer import as_spec, check_spec_fingerprint, layer_biases

        spec = as_spec(spec)
        live = self.live
        check_spec_fingerprint(spec, live.model, live.adapter, live.layers, self.config)
        layer_biases(spec, live.layers)
        return spec

    def set_steering(self, spec) -> None:
        spec = None if spec is None else self.check_spec(spec)
        with self.steer_lock:
            self.steer_spec = spec

    def request_spec(self, body: dict):
        """The steering of one request: its own ``mlxfun_steer`` (a spec, or null for none),
        else the active spec. Returns ``(spec or None,)`` so that None is not "absent"."""
        if "mlxfun_steer" in body:
            own = body["mlxfun_steer"]
            return (None if own is None else self.check_spec(own),)
        with self.steer_lock:
            return (self.steer_spec,)

    def start(self) -> None:
        from mlx_lm.models.cache import LRUPromptCache
        from mlx_lm.server import ResponseGenerator

        state = self

        class SteeringResponseGenerator(ResponseGenerator):
            """mlx-lm's generator; a steered request runs alone under its spec, the others
            are batched as mlx-lm batches them."""

            def generate(self, request, generation_args, *args, **kwargs):
                generation_args.mlxfun_steer = getattr(
                    request, "mlxfun_steer", None
                ) or state.request_spec({})
                return super().generate(request, generation_args, *args, **kwargs)

            def _is_batchable(self, args):
                # steering hooks act on every row of a batch: steered requests run alone
                spec = getattr(args, "mlxfun_steer", (None,))[0]
                return spec is None and super()._is_batchable(args)

            def _next_request(self, timeout=None):
                # the counters are complete before the client reads the end of its answer
                request = super()._next_request(timeout)
                if request is None:
                    return None
                return (_FlushingQueue(request[0], lambda: state.live.flush()), *request[1:])

            def _serve_single(self, request, stream):
                spec = getattr(request[1], "mlxfun_steer", None)
                spec = state.request_spec({})[0] if spec is None else spec[0]
                if spec is None:
                    return super()._serve_single(request, stream)
                from .steer import steering

                live = state.live
                try:
                    with steering(live.model, spec, live.adapter, state.config):
                        return super()._serve_single(request, stream)
                except MlxfunError as exc:
                    request[0].put(ValueError(str(exc)))

        provider = _model_provider_class()(_cli_args(self.options), self.on_load)
        self.response_generator = SteeringResponseGenerator(
            provider, LRUPromptCache(self.options.prompt_cache_size)
        )

    def wait_loaded(self, timeout: float = 600.0) -> None:
        deadline = time.time() + timeout
        while not self.loaded.wait(0.2):
            if not self.response_generator.generation_available():
                raise MlxfunError(
                    self.load_error or f"cannot load {self.options.model}; see the log"
                )
            if time.time() > deadline:
                raise MlxfunError(f"{self.options.model} did not load in {timeout:.0f} s")

    def path(self, text, what: str = "path", must_exist: bool = False) -> Path:
        """A path inside the workdir (relative paths are relative to it); others: 400."""
        if not isinstance(text, str) or not text.strip():
            raise RequestError(f"{what} must be a non-empty string (a path inside the workdir)")
        path = Path(text)
        path = (path if path.is_absolute() else self.workdir / path).resolve()
        if path != self.workdir and not path.is_relative_to(self.workdir):
            raise RequestError(f"{what} {text} is outside the server's --workdir {self.workdir}")
        if must_exist and not path.exists():
            raise RequestError(f"{what} {text} does not exist in the workdir", 404)
        return path


class _FlushingQueue:
    """A request's response queue that flushes the live counters before its end marker (None)
    or an error is put: mlx-lm's handler answers the client only after that."""

    def __init__(self, queue, flush):
        self._queue, self._flush = queue, flush

    def put(self, item, *args, **kwargs):
        if item is None or isinstance(item, Exception):
            self._flush()
        return self._queue.put(item, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._queue, name)


def _handler_class(state: ServerState):
    from mlx_lm.server import APIHandler

    from . import serve_routes

    class MlxfunHandler(APIHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(state.response_generator, *args, **kwargs)

        def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's name
            logging.debug("%s " + format, self.address_string(), *args)

        def _authorized(self) -> bool:
            key = state.options.api_key
            if not key:
                return True
            given = self.headers.get("Authorization", "")
            if hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return True
            self.reply(401, {"error": "missing or wrong API key (Authorization: Bearer KEY)"})
            return False

        def reply(self, status: int, body, content_type="application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self._set_cors_headers()
            self.end_headers()
            self.wfile.write(data)

        def read_body(self) -> bytes:
            length = self.headers.get("Content-Length")
            try:
                length = int(length or 0)
            except ValueError:
                raise RequestError("invalid Content-Length header") from None
            if length < 0 or length > MAX_BODY:
                raise RequestError(f"request body too large (at most {MAX_BODY} bytes)", 413)
            return self.rfile.read(length) if length else b""

        def json_body(self) -> dict:
            raw = self.read_body()
            if not raw:
                return {}
            try:
                body = json.loads(raw.decode())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(f"invalid JSON in request body: {exc}") from None
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object")
            return body

        def _static(self) -> bool:
            """The dashboard's files: public (they hold no data; every API call is checked)."""
            path = urlparse(self.path).path
            if path not in STATIC:
                return False
            name, kind = STATIC[path]
            self.reply(200, (DASHBOARD / name).read_bytes(), kind)
            return True

        def _route(self, method: str) -> bool:
            url = urlparse(self.path)
            if not url.path.startswith("/v1/mlxfun/"):
                return False
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            try:
                status, body = serve_routes.dispatch(state, self, method, url.path, query)
            except RequestError as exc:
                status, body = exc.status, {"error": str(exc)}
            except MlxfunError as exc:
                status, body = 400, {"error": str(exc)}
            except Exception as exc:  # never a traceback to the client, never a dead server
                logging.exception("mlxfun route %s %s failed", method, url.path)
                status, body = 500, {"error": f"{type(exc).__name__}: {exc}"}
            self.reply(status, body)
            return True

        def do_GET(self):
            if not self._static() and self._authorized() and not self._route("GET"):
                super().do_GET()

        def do_POST(self):
            if self._authorized() and not self._route("POST"):
                super().do_POST()

        def handle_completion(self, request, stop_words):
            # mlx-lm parsed the body; the request carries its steering to the generator
            try:
                request.mlxfun_steer = state.request_spec(self.body)
            except MlxfunError as exc:
                self.reply(400, {"error": str(exc)})
                return
            return super().handle_completion(request, stop_words)

        def do_DELETE(self):
            if self._authorized() and not self._route("DELETE"):
                self.reply(404, {"error": f"no route DELETE {self.path}"})

    return MlxfunHandler


def build_server(options: ServeOptions) -> tuple[ThreadingHTTPServer, ServerState]:
    """Load the model (raising on failure) and bind the HTTP server; serve with
    ``serve_forever``."""
    import socket

    check_options(options)
    state = ServerState(options)
    state.start()
    try:
        state.wait_loaded()
        infos = socket.getaddrinfo(
            options.host, options.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _, _, _, address = infos[0]

        class Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True
            request_queue_size = 128  # the listen backlog (5 by default): bursts of clients

        try:
            httpd = Server(address, _handler_class(state))
        except OSError as exc:
            raise MlxfunError(
                f"cannot listen on {options.host}:{options.port}: {exc.strerror or exc}"
            ) from None
    except BaseException:
        state.response_generator.stop_and_join()
        raise
    return httpd, state


def serve(options: ServeOptions, on_ready=None) -> None:
    httpd, state = build_server(options)
    if on_ready is not None:
        on_ready(httpd.server_address)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        state.response_generator.stop_and_join()
