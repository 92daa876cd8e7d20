"""``mlxfun ui --server URL``: the dashboard on 127.0.0.1, relaying its API calls to a remote
``mlxfun serve`` (same origin for the page, so no CORS; the API key stays on this machine)."""

import http.client
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from mlxfun.core.errors import MlxfunError

from .serve import DASHBOARD, STATIC, serve_until_interrupted

_HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


def _handler_class(base, api_key):
    class ProxyHandler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002
            pass

        def _static(self) -> bool:
            path = urlparse(self.path).path
            if self.command != "GET" or path not in STATIC:
                return False
            name, kind = STATIC[path]
            data = (DASHBOARD / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return True

        def _relay(self):
            if self._static():
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            if api_key:
                headers["Authorization"] = f"Bearer {api_key}"
            connection_class = (
                http.client.HTTPSConnection
                if base.scheme == "https"
                else http.client.HTTPConnection
            )
            try:
                upstream = connection_class(base.hostname, base.port, timeout=600)
                upstream.request(self.command, base.path.rstrip("/") + self.path, body, headers)
                response = upstream.getresponse()
            except OSError as exc:
                data = f'{{"error": "cannot reach {base.geturl()}: {exc}"}}'.encode()
                self.send_response(502)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in _HOP:
                    self.send_header(key, value)
            self.send_header("Connection", "close")
            self.end_headers()
            while chunk := response.read1(65536):  # streamed answers pass through as they come
                self.wfile.write(chunk)
                self.wfile.flush()
            upstream.close()

        do_GET = do_POST = do_DELETE = _relay

    return ProxyHandler


def build_proxy(server: str, port: int, api_key: str | None = None) -> ThreadingHTTPServer:
    base = urlparse(server if "://" in server else f"http://{server}")
    if base.scheme not in ("http", "https") or not base.hostname:
        raise MlxfunError(f"--server {server} is not an http(s) URL (e.g. http://host:8080)")
    try:
        httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler_class(base, api_key))
    except OSError as exc:
        raise MlxfunError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}") from None
    httpd.daemon_threads = True
    return httpd


def run_proxy(server: str, port: int, api_key: str | None = None, on_ready=None) -> None:
    serve_until_interrupted(build_proxy(server, port, api_key), on_ready)
