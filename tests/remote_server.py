"""A throwaway HTTP server on 127.0.0.1 for tests of remote datasets (``http://`` shards)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import threading
from typing import Iterator, Optional


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
        super().do_GET()


@contextlib.contextmanager
def serve_directory(path: str | os.PathLike, *, fail_first: int = 0) -> Iterator[str]:
    """Serve ``path`` over HTTP on 127.0.0.1 (a free port) while the block runs; yields the base
    URL (``http://127.0.0.1:PORT``, no trailing slash). ``fail_first``: answer the first that
    many requests with 503, to exercise retries. The server is shut down on exit."""
    state = {"left": fail_first, "requests": 0, "lock": threading.Lock()}
    handler = type("Handler", (_QuietHandler,), {"fail_state": state})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(path)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="test-http-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
