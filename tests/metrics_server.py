"""A /metrics endpoint for tests: a real HTTP server on 127.0.0.1 serving text that the test controls.

``MetricsServer(render)`` answers ``GET /metrics`` with ``render()`` in Prometheus' text format (the
content type prometheus_client and the engines send) and any other path with 404. ``start()`` listens (on
a free port the first time, on the same port after a ``stop()``: an engine that goes down and comes back),
``stop()`` closes it; it is also a context manager.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"


class MetricsServer:
    def __init__(self, render: Callable[[], str]):
        self.render = render
        self.port = 0
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> MetricsServer:
        render = self.render

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                if self.path != "/metrics":
                    self.send_error(404)
                    return
                body = render().encode()
                self.send_response(200)
                self.send_header("Content-Type", TEXT_FORMAT)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"
