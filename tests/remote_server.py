"""A throwaway HTTP server on 127.0.0.1 for tests of remote datasets (``http://`` shards)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import socket
import threading
from typing import Iterator, Optional


class ServedURL(str):
    """The server's base URL, carrying its request counters as ``state``."""

    state: dict


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files; logs nothing; optionally answers 503 to the first ``fail_first`` requests."""

    fail_state: Optional[dict] = None

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:
        state = self.fail_state
        if state is not None:
            with state["lock"]:
                state["requests"] += 1
                fail = state["left"] > 0
                state["left"] -= fail
            if fail:
                self.send_error(503, "try again")
                return
            if self._partial(state):
                return
        super().do_GET()

    def _partial(self, state: dict) -> bool:
        """Answer a ``Range: bytes=N-`` request with 206; cut the first ``drop_first`` full
        responses off after half their body, as a dropped connection would."""
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            return False
        size = os.path.getsize(path)
        wanted = self.headers.get("Range", "")
        start = int(wanted[len("bytes="):].rstrip("-")) if wanted.startswith("bytes=") else 0
        with state["lock"]:
            drop = not start and state.get("drop_left", 0) > 0
            state["drop_left"] = state.get("drop_left", 0) - drop
            state["ranges"] += bool(start)
        if not (start or drop):
            return False
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read()
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if drop else body)
        if drop:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        return True


@contextlib.contextmanager
def serve_directory(path: str | os.PathLike, *, fail_first: int = 0, drop_first: int = 0) -> Iterator[str]:
    """Serve ``path`` over HTTP on 127.0.0.1 (a free port) while the block runs; yields the base
    URL (``http://127.0.0.1:PORT``, no trailing slash; its ``.state`` counts ``requests`` and
    ``ranges``). ``fail_first``: answer the first that many requests with 503, to exercise
    retries. ``drop_first``: cut the first that many whole-file responses off half-way, as a
    dropped connection would (Range requests are answered with 206). The server is shut down
    on exit."""
    state = {"left": fail_first, "requests": 0, "drop_left": drop_first, "ranges": 0, "lock": threading.Lock()}
    handler = type("Handler", (_QuietHandler,), {"fail_state": state})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(path)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="test-http-server", daemon=True)
    thread.start()
    try:
        url = ServedURL(f"http://127.0.0.1:{server.server_address[1]}")
        url.state = state
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
