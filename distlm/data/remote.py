"""Where shard bytes come from: local files, ``file://``, ``http(s)://`` and (opt-in) ``pipe:``.

A dataset location is either a local folder or a URL of one; a shard location is a path or URL
of one ``.tar`` file. :func:`open_url` turns any of them into a readable binary stream, and
:func:`expand_urls` turns a WebDataset brace pattern into the list of shard URLs.

Why ``pipe:`` is opt-in: ``pipe:CMD`` runs ``CMD`` through the shell, and the command comes
from a config file or a manifest location. A config copied from somewhere else must not be
able to run commands on every training node just because it is read, so ``open_url`` refuses
it unless the caller passes ``allow_pipe=True`` (``data.allow_pipe: true`` in the config).

Why retries live here: an object store or HTTP server behind a load balancer drops a
connection or answers 5xx now and then, and one such blip must not count as a bad shard.
Connection errors and 5xx answers are retried a few times with exponential backoff; a 404 is
an answer (the shard does not exist) and is not retried.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO, Optional

import braceexpand

from .shards import ShardError

__all__ = ["open_url", "expand_urls", "is_url", "url_scheme", "local_path", "join_url",
           "HTTP_TIMEOUT_S", "HTTP_RETRIES"]

HTTP_TIMEOUT_S = 60.0
"""Seconds a connect or a single socket read may take before it counts as a failed attempt."""
HTTP_RETRIES = 3
"""Extra attempts after the first for a connection error, timeout or 5xx answer."""
_BACKOFF_S = 0.5
_STDERR_TAIL = 2000
_SCHEMES = ("http", "https", "file", "pipe")


def url_scheme(location: str | os.PathLike) -> str:
    """``"http"``, ``"https"``, ``"file"``, ``"pipe"``, or ``""`` for a plain local path.

    Anything else that looks like a scheme (``s3://``, ``gs://``) is refused with a hint, so a
    typo never becomes a relative folder named ``s3:``.
    """
    text = os.fspath(location)
    if isinstance(text, bytes):
        text = text.decode()
    if text.startswith("pipe:"):
        return "pipe"
    head, sep, _ = text.partition("://")
    if not sep or "/" in head or not head:
        return ""
    scheme = head.lower()
    if scheme not in _SCHEMES:
        raise ValueError(
            f"{text}: unsupported URL scheme {scheme!r}; distlm reads local paths, file://, http:// and "
            f"https:// directly; for other stores use a command, e.g. 'pipe:aws s3 cp {text} -', and set "
            f"`data.allow_pipe: true`"
        )
    return scheme


def is_url(location: str | os.PathLike) -> bool:
    """True for ``http(s)://`` and ``pipe:`` locations; plain paths and ``file://`` are local."""
    return url_scheme(location) in ("http", "https", "pipe")


def local_path(location: str | os.PathLike) -> Optional[Path]:
    """The local path of a plain path or ``file://`` URL; None for remote locations."""
    scheme = url_scheme(location)
    if scheme == "":
        return Path(location)
    if scheme == "file":
        parsed = urllib.parse.urlparse(os.fspath(location))
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{location}: file:// URLs name a local file (file:///path), not host {parsed.netloc!r}")
        return Path(urllib.parse.unquote(parsed.path))
    return None


def join_url(base: str, name: str) -> str:
    """``base/name`` for a folder location of any kind.

    A ``pipe:`` location is a command template in which ``{}`` stands for the file name
    (``pipe:aws s3 cp s3://bucket/ds/{} -``): a command yields one stream, so the template is
    the only way to reach the several files of a dataset.
    """
    scheme = url_scheme(base)
    if scheme == "pipe":
        if "{}" not in base:
            raise ValueError(
                f"{base}: a pipe: dataset location is a command template with {{}} where the file name "
                f"goes, e.g. 'pipe:aws s3 cp s3://bucket/ds/{{}} -'"
            )
        return base.replace("{}", name)
    if scheme in ("http", "https"):
        return base.rstrip("/") + "/" + urllib.parse.quote(name)
    if scheme == "file":
        return base.rstrip("/") + "/" + urllib.parse.quote(name)
    return str(Path(base) / name)


def expand_urls(pattern: str) -> list[str]:
    """The shard URLs of a WebDataset pattern, in order.

    Brace ranges and lists expand like webdataset's (``train-{000000..000009}.tar`` keeps the
    zero padding, ``{a,b}`` lists alternatives, braces nest) and ``::`` joins several patterns.
    Unbalanced braces and an empty result are errors rather than a literal file name, so a typo
    in a pattern fails at start-up instead of as a missing shard later.
    """
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"empty shard URL pattern {pattern!r}")
    urls: list[str] = []
    for part in pattern.split("::"):
        part = part.strip()
        if not part:
            continue
        try:
            urls.extend(braceexpand.braceexpand(part, escape=False))
        except braceexpand.UnbalancedBracesError as exc:
            raise ValueError(f"shard URL pattern {part!r}: unbalanced braces") from exc
    if not urls:
        raise ValueError(f"shard URL pattern {pattern!r} expands to no URLs")
    return urls


def open_url(location: str | os.PathLike, *, allow_pipe: bool = False, timeout: float = HTTP_TIMEOUT_S,
             retries: int = HTTP_RETRIES, backoff: float = _BACKOFF_S) -> BinaryIO:
    """A binary stream of ``location``, positioned at its first byte; the caller closes it.

    * a local path or ``file://`` URL: the file (a missing one is :class:`ShardError` kind
      ``missing``);
    * ``http(s)://``: the response body, via urllib (so ``http_proxy``/``no_proxy`` apply);
      404/410 is kind ``missing``; connection errors, timeouts and 5xx are retried ``retries``
      times with exponential backoff starting at ``backoff`` seconds, then kind ``unreachable``;
    * ``pipe:CMD``: the standard output of ``CMD`` run by the shell, only with ``allow_pipe``
      (else :class:`ValueError`, a configuration error). A command that exits non-zero raises
      kind ``unreachable`` with the tail of its stderr when its output ends.
    """
    text = os.fspath(location)
    scheme = url_scheme(text)
    if scheme in ("", "file"):
        path = local_path(text)
        try:
            return open(path, "rb")
        except FileNotFoundError as exc:
            raise ShardError(f"{text}: file not found; re-copy the dataset or re-run `distlm prepare`",
                             kind="missing", url=text) from exc
        except OSError as exc:
            raise ShardError(f"{text}: cannot open ({exc}); check the path and its permissions",
                             kind="unreachable", url=text) from exc
    if scheme == "pipe":
        if not allow_pipe:
            raise ValueError(
                f"{text}: pipe: locations run a shell command taken from the config; set "
                f"`data.allow_pipe: true` if you trust this config and want it to run"
            )
        return _PipeStream(text[len("pipe:"):], text)
    return _ResumingHTTPStream(text, timeout=timeout, retries=retries, backoff=backoff)


def _open_http(url: str, *, timeout: float, retries: int, backoff: float, start: int = 0) -> BinaryIO:
    """The response body from byte ``start`` on (a ``Range`` request when ``start`` > 0)."""
    last = ""
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
            if start and response.status != 206:  # the server ignored the range: skip what we have
                _discard(response, start)
            return response
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (404, 410):
                raise ShardError(f"{url}: HTTP {exc.code} {exc.reason}: the server has no such file; check "
                                 f"the URL, or re-upload the dataset", kind="missing", url=url) from exc
            if exc.code < 500 and exc.code != 429:
                raise ShardError(f"{url}: HTTP {exc.code} {exc.reason}; check the URL and access rights",
                                 kind="unreachable", url=url) from exc
            last = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout) as exc:
            last = str(getattr(exc, "reason", exc)) or type(exc).__name__
    raise ShardError(f"{url}: unreachable after {retries + 1} attempts ({last}); check the network and the "
                     f"server", kind="unreachable", url=url)


def _discard(stream: BinaryIO, n: int) -> None:
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise http.client.IncompleteRead(b"")
        n -= len(chunk)


class _ResumingHTTPStream:
    """An http(s) response body that survives a dropped connection.

    A read that fails part-way (reset, timeout, a body shorter than its Content-Length) reopens
    the URL with a ``Range`` request from the first byte not yet returned and carries on, with
    the same retries and backoff as opening; only when those run out is it a
    :class:`ShardError` of kind ``unreachable``. A shard download that a network blip cuts
    off mid-way therefore costs a reconnect, not a damaged block or a stopped run.
    """

    def __init__(self, url: str, *, timeout: float, retries: int, backoff: float):
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self._response = _open_http(url, timeout=timeout, retries=retries, backoff=backoff)
        length = self._response.headers.get("Content-Length")
        self._size = int(length) if length and length.isdigit() else None  # None: chunked, unknown
        self._position = 0
        self.reconnects = 0

    def read(self, n: int = -1) -> bytes:
        for attempt in range(self.retries + 1):
            try:
                data = self._response.read() if n is None or n < 0 else self._response.read(n)
                if not data and n != 0 and self._size is not None and self._position < self._size:
                    # http.client returns b"" when the body stops short of its Content-Length.
                    raise http.client.IncompleteRead(b"", self._size - self._position)
                self._position += len(data)
                if (n is None or n < 0) and data:
                    return data + self.read()  # until the true end: after a reconnect, the rest
                return data
            except (http.client.HTTPException, ConnectionError, socket.timeout, OSError) as exc:
                last = str(exc) or type(exc).__name__
                self._reconnect(attempt)
        raise ShardError(f"{self.url}: the connection kept dropping at byte {self._position:,} ({last}); check the "
                         f"network and the server", kind="unreachable", url=self.url)

    def _reconnect(self, attempt: int) -> None:
        self._response.close()
        time.sleep(self.backoff * 2 ** attempt)
        self.reconnects += 1
        self._response = _open_http(self.url, timeout=self.timeout, retries=self.retries, backoff=self.backoff,
                                    start=self._position)

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> "_ResumingHTTPStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _PipeStream:
    """The standard output of a shell command, read like a file.

    When the output ends, the command's exit status is checked before the last (short) read
    returns, so a failed ``aws s3 cp`` surfaces as its own error (kind ``unreachable``, with
    its stderr) rather than as a truncated archive. Closing early kills the command's process
    group: a reader that needs only the first blocks does not wait for the whole download.
    """

    def __init__(self, command: str, url: str):
        self.url = url
        self._command = command
        self._stderr = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self._stderr,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            self._stderr.close()
            raise ShardError(f"{url}: cannot start the command ({exc})", kind="unreachable", url=url) from exc
        assert self._proc.stdout is not None
        self._out = self._proc.stdout
        self._ended = False

    def read(self, n: int = -1) -> bytes:
        data = self._out.read(n) if n is not None and n >= 0 else self._out.read()
        if n is None or n < 0 or len(data) < n:
            self._check_exit()
        return data

    def readinto(self, buffer) -> int:
        got = self._out.readinto(buffer)
        if got < len(memoryview(buffer)):
            self._check_exit()
        return got

    def _check_exit(self) -> None:
        if self._ended:
            return
        self._ended = True
        code = self._proc.wait()
        if code != 0:
            self._stderr.seek(0)
            tail = self._stderr.read()[-_STDERR_TAIL:].decode("utf-8", "replace").strip()
            raise ShardError(f"{self.url}: the command exited with status {code}"
                             + (f"; its stderr ends: {tail}" if tail else "; it wrote nothing to stderr"),
                             kind="unreachable", url=self.url)

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._out.close()
        self._proc.wait()
        self._stderr.close()

    def __enter__(self) -> "_PipeStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
