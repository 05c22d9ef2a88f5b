"""A local HTTP receiver for ``veil serve --alert-webhook``: records each POST's path and
JSON body, and answers the statuses it is given in turn (then 200 for ever)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# The receiver's secret path: a chat service's webhook carries its token this way.
SECRET_PATH = "/hook/T0KEN-not-for-logs"


@dataclass
class Receiver:
    """A local HTTP server that records each POST and answers the next status in line."""

    statuses: list[int] = field(default_factory=list)  # then 200 for ever
    posts: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{SECRET_PATH}"

    def events(self) -> list[object]:
        with self.lock:
            return [body.get("event") for _, body in self.posts]


@contextlib.contextmanager
def receiving() -> Iterator[Receiver]:
    got = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with got.lock:
                got.posts.append((self.path, body))
                status = got.statuses.pop(0) if got.statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    got.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield got
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
