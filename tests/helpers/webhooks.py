"""A real HTTP server on loopback that records the webhook requests it receives."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Recorder:
    """A ThreadingHTTPServer on 127.0.0.1 that records (path, headers, body). Requests to paths under /slow are
    held until `release` is set (or 60 s pass); `arrived` is set when such a request has been read."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.cond = threading.Condition()
        self.release = threading.Event()
        self.arrived = threading.Event()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                if self.path.startswith("/slow"):
                    recorder.arrived.set()
                    recorder.release.wait(60)
                with recorder.cond:
                    recorder.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    recorder.cond.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def wait(self, count: int, path: str | None = None, timeout: float = 5.0) -> list[dict]:
        """The requests (to `path`, if given) once there are `count` of them, or fail after `timeout`."""

        def matching():
            return [r for r in self.requests if path is None or r["path"] == path]

        with self.cond:
            self.cond.wait_for(lambda: len(matching()) >= count, timeout=timeout)
            found = matching()
        assert len(found) >= count, f"expected {count} requests to {path}, got {len(found)}"
        return found

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
