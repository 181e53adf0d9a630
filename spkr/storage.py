"""Where artefacts live: a local directory or any fsspec URL (s3://, gs://, http(s)://, ...).

Both the write side and the read side go through these few functions, so a path and an
``s3://bucket/prefix`` behave the same everywhere.

Options for the filesystem (endpoint, credentials, anonymous access) come, in this order, from the
``storage_options`` argument, from the ``SPKR_STORAGE_OPTIONS`` environment variable (a JSON
object, e.g. ``{"anon": true}`` or ``{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}``),
and from each backend's usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...).

Remote reads — ``manifest.json``, sidecars and shards alike — go through one :class:`RetryPolicy`
and one retrying loop (:func:`fill`; :func:`read_bytes` for whole small files):

- the budget counts CONSECUTIVE failures WITHOUT PROGRESS: a failed attempt after which at least
  one byte arrived resets it (and the backoff), so a long read over a link that breaks every few MB
  completes, while an endpoint that delivers nothing fails after ``retries`` retries;
- every retry resumes at the exact byte reached: :class:`RemoteFile` streams one ranged GET (HTTP
  ``Range``, S3 ``GetObject Range``) and keeps every byte that arrived before a break;
- errors that are not transient (not found, permission/auth, other HTTP 4xx, bad parameters) are
  raised at once; after the budget, :class:`ReadFailed` names the URL and the byte offset (also for an
  endpoint that refuses connections).
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec

from spkr.config import NonFinite, TooDeep, loads_json
from spkr.errors import SpkrError


def is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def storage_options_from_env(options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Explicit options win over SPKR_STORAGE_OPTIONS."""
    merged: dict[str, Any] = {}
    env = os.environ.get("SPKR_STORAGE_OPTIONS")
    if env:
        try:
            merged.update(loads_json(env))
        except (json.JSONDecodeError, NonFinite, TooDeep) as e:
            raise ValueError(f"SPKR_STORAGE_OPTIONS is not a JSON object: {e}") from None
    merged.update(options or {})
    return merged


def get_fs(url: str, storage_options: dict[str, Any] | None = None, *, cache_dir: str | None = None):
    """(filesystem, path-within-filesystem) for a local path or URL; the one place the options of
    :func:`storage_options_from_env` reach a filesystem. With ``cache_dir``, a remote URL's filesystem is
    fsspec's ``filecache`` over it: whole files kept under ``cache_dir``, read locally after the first
    fetch."""
    url = str(url)
    protocol = url.split("://", 1)[0] if is_url(url) else "file"
    opts = storage_options_from_env(storage_options) if protocol != "file" else {}
    if cache_dir and protocol != "file":
        fs = fsspec.filesystem(
            "filecache", target_protocol=protocol, target_options=opts, cache_storage=cache_dir
        )
        return fs, fs._strip_protocol(url)
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join URL or path components with '/'."""
    if is_url(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


# --------------------------------------------------------------------------- retries

PIECE = 256 << 10  # bytes per request of a backend that cannot stream (a break loses at most this)


@dataclass(frozen=True)
class RetryPolicy:
    """How every remote read survives a flaky network (see the module docstring).

    ``retries``: consecutive failed attempts without progress allowed before :class:`ReadFailed`.
    Before the k-th retry of such a run (k = 1, 2, ...): sleep ``min(backoff * 2**(k-1), max_sleep)``
    seconds. ``timeout``: seconds without a byte after which an open response counts as failed (None:
    wait as long as the backend does). ``sleep`` is replaceable for tests."""

    retries: int = 5
    backoff: float = 0.2
    max_sleep: float = 10.0
    timeout: float | None = 60.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)

    def delay(self, failures: int) -> float:
        return min(self.backoff * 2 ** (failures - 1), self.max_sleep)


class ReadFailed(SpkrError, OSError):
    """A remote read that failed ``failures`` times in a row without progress (``url``, ``offset``:
    where it stood; ``cause``: the last error). Never retried itself."""

    def __init__(
        self,
        message: str,
        url: str | None = None,
        offset: int | None = None,
        failures: int = 0,
        reason: str | None = None,
    ):
        super().__init__(message)
        self.url, self.offset, self.failures = url, offset, failures
        self.reason = reason or message  # the message without "<url> at byte <offset>: "

    def __str__(self) -> str:
        return str(self.args[0])

    @property
    def cause(self) -> BaseException | None:
        return self.__cause__

    @classmethod
    def after(cls, url: str, offset: int, failures: int, cause: BaseException) -> ReadFailed:
        hint = " (could not connect: is the endpoint up and reachable?)" if _is_connect_error(cause) else ""
        reason = (
            f"read failed after {failures} retries without progress{hint}: {type(cause).__name__}: {cause}"
        )
        return cls(f"{url} at byte {offset}: {reason}", url, offset, failures, reason)


# Not transient: retrying cannot help (or the error is a bug).
_PERMANENT = (
    FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError, ReadFailed,
    ValueError, TypeError, AttributeError, NameError, LookupError, NotImplementedError, AssertionError,
    ImportError, MemoryError,
)  # fmt: skip
_PERMANENT_NAMES = frozenset(  # botocore: credentials and request validation
    {"NoCredentialsError", "PartialCredentialsError", "ParamValidationError", "NoRegionError",
     "InvalidRegionError", "UnknownSignatureVersionError", "InvalidConfigError"}
)  # fmt: skip
_CONNECT_NAMES = frozenset(
    {"ClientConnectorError", "ClientConnectorDNSError", "EndpointConnectionError", "ConnectTimeoutError"}
)


def _chain(exc: BaseException | None):
    seen = 0
    while exc is not None and seen < 8:
        yield exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an error carries (aiohttp's ``.status``, botocore's ``.response``), if any."""
    for e in _chain(exc):
        status = getattr(e, "status", None)
        if isinstance(status, int) and 100 <= status < 600:
            return status
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
    return None


def _transient_status(status: int | None) -> bool:
    return status is not None and (status >= 500 or status in (408, 425, 429))


def is_transient(exc: BaseException) -> bool:
    """Whether retrying may help: dropped/refused connections, timeouts, short responses, HTTP 5xx,
    408/425/429 (S3 SlowDown). Not: not found, permission/auth errors, other HTTP 4xx, missing
    credentials, bad parameters, programming errors, :class:`ReadFailed`."""
    if any(type(e).__name__ in _PERMANENT_NAMES for e in _chain(exc)):
        return False
    status = http_status(exc)
    if status is not None and status >= 400:
        return _transient_status(status)
    return not isinstance(exc, _PERMANENT)


def _is_connect_error(exc: BaseException) -> bool:
    return any(
        isinstance(e, ConnectionRefusedError) or type(e).__name__ in _CONNECT_NAMES for e in _chain(exc)
    )


def fill(
    source: Callable[[], Any],
    pos: int,
    mv: memoryview,
    policy: RetryPolicy,
    *,
    url: str,
    end: int | None = None,
    drop: Callable[[], None] | None = None,
    stats: Any = None,
) -> int:
    """Fill ``mv`` with an object's bytes from ``pos`` on; fewer only at the object's end. THE retrying
    read loop of spkr.

    ``source()`` returns the source to read (opening it if needed; it is called again after a
    failure): ``.size`` (None while unknown), ``.read_into(pos, mv) -> int`` (>= 1 byte before the end,
    0 at it; bytes it returned are final even if the next call fails) and optionally ``.expect(end)``
    (the caller reads on up to ``end``). A transient failure calls ``drop()`` (close the source), sleeps
    and resumes at the byte reached; any byte received resets the count of consecutive failures. After
    ``policy.retries`` retries without progress: :class:`ReadFailed` naming ``url`` and the offset.
    ``stats`` (optional): ``.retries`` and ``.bytes`` are incremented."""
    done = failures = 0
    while done < len(mv):
        at = pos + done
        try:
            src = source()
            if end is not None and hasattr(src, "expect"):
                src.expect(end)
            got = src.read_into(at, mv[done:])
            if not got:
                if src.size is None or at >= src.size:
                    break  # the end of the object (a file shorter than expected is the caller's to report)
                raise ConnectionError(f"no data at byte {at} of {src.size}")
        except Exception as e:
            if not is_transient(e):
                raise
            if drop is not None:
                drop()
            if failures >= policy.retries:
                raise ReadFailed.after(url, at, failures, e) from e
            failures += 1
            if stats is not None:
                stats.retries += 1
            policy.sleep(policy.delay(failures))
            continue
        done += got
        failures = 0
        if stats is not None:
            stats.bytes += got
    return done


def read_bytes(
    url: str, storage_options: dict[str, Any] | None = None, retry: RetryPolicy | None = None
) -> bytes:
    """The whole (small) file at ``url`` — ``manifest.json``, a sidecar — read under ``retry``
    (default :class:`RetryPolicy`), resumed at the byte reached. Local paths are read directly.
    Raises FileNotFoundError / PermissionError as they come, :class:`ReadFailed` after the budget."""
    url = str(url)
    fs, path = get_fs(url, storage_options)
    if not is_url(url):
        return fs.cat_file(path)
    policy = retry or RetryPolicy()
    src = RemoteFile(fs, path, timeout=policy.timeout)

    def read(pos: int, buf: bytearray) -> int:
        return fill(lambda: src, pos, memoryview(buf)[pos:], policy, url=url, drop=src.close)

    try:
        buf = bytearray(PIECE)
        n = read(0, buf)
        while n == len(buf):  # more to come: to the size the server announced, else double
            grown = bytearray(src.size if src.size is not None and src.size > n else 2 * len(buf))
            grown[:n] = buf  # never resized in place: an error's traceback may still hold a view
            buf = grown
            n += read(n, buf)
        return bytes(memoryview(buf)[:n])
    finally:
        src.close()


# --------------------------------------------------------------------------- streamed remote reads

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _content_range(value: str | None) -> tuple[int, int, int | None]:
    """'bytes a-b/total' -> (a, b + 1, total or None)."""
    m = _CONTENT_RANGE.fullmatch((value or "").strip())
    if not m:
        raise ConnectionError(f"bad Content-Range {value!r} in a partial response")
    return int(m.group(1)), int(m.group(2)) + 1, None if m.group(3) == "*" else int(m.group(3))


def _stream_kind(fs) -> str:
    try:
        from fsspec.implementations.http import HTTPFileSystem

        if isinstance(fs, HTTPFileSystem):
            return "http"
    except ImportError:  # aiohttp missing
        pass
    try:
        from s3fs import S3FileSystem

        if isinstance(fs, S3FileSystem):
            return "s3"
    except ImportError:
        pass
    return "other"


class _Body:
    """An open response body: an aiohttp stream (``content``) or any object with ``async read(n)``."""

    def __init__(self, closer, content=None, release=None):
        self.closer, self.content, self.release = closer, content, release

    async def read(self, n: int) -> bytes:
        return await (self.content.read(n) if self.content is not None else self.closer.read(n))

    def salvage(self, n: int) -> bytes:
        """Bytes that arrived before the connection broke: aiohttp raises the error on the next read
        even while earlier bytes are still buffered; take them from the buffer instead."""
        content = self.content
        if content is None or not getattr(content, "_buffer", None) or n <= 0:
            return b""
        try:
            return content._read_nowait(n)
        except Exception:
            return b""

    async def aclose(self, reuse: bool = False) -> None:
        if reuse and self.release is not None:
            self.release()
        else:
            self.closer.close()


class RemoteFile:
    """One remote object read at byte offsets through its fsspec filesystem (``size``: known length,
    else learnt from the first response).

    http(s):// and s3:// stream: a read continues the open ranged GET when it asks for the byte that
    response stands at, else a new one is opened for ``[pos, end)`` (``end`` from :meth:`expect`, else
    the object's end). Bytes are handed out as they arrive; when the connection breaks, those that
    arrived first are still returned and the error is raised by the next read, so a retry resumes at the
    exact byte reached. Other backends: one ``cat_file`` of at most :data:`PIECE` bytes per read (a
    break loses at most that piece). s3fs's own retry loop is bypassed (botocore's connection retries,
    configured with ``config_kwargs={"retries": ...}``, happen inside one attempt)."""

    def __init__(self, fs, path: str, size: int | None = None, *, timeout: float | None = None):
        self.fs, self.path, self.size, self.timeout = fs, path, size, timeout
        self.kind = _stream_kind(fs)
        self._pid = os.getpid()  # a forked child must not touch the parent's event loop
        self.requests = 0  # requests opened (ranged GETs, or cat_file calls)
        self._body: _Body | None = None
        self._pos, self._stop = 0, None  # the open response: next byte, end of its range (None: unknown)
        self._error: BaseException | None = None  # a break after the bytes last returned
        self._end: int | None = None

    def expect(self, end: int) -> None:
        self._end = end

    def read_into(self, pos: int, mv: memoryview) -> int:
        n = len(mv) if self.size is None else min(len(mv), self.size - pos)
        if self._error is not None:  # the open response broke: first the bytes still buffered
            got = self._sync(self._salvage, mv[: max(n, 0)]) if self._pos == pos else 0
            if got:
                self._pos += got
                return got
            err, self._error = self._error, None
            self.close()
            if self._pos == pos:
                raise err
        if n <= 0:
            return 0
        if self.kind == "other":
            return self._read_other(pos, mv[:n])
        if self._body is None or self._pos != pos or (self._stop is not None and pos >= self._stop):
            self.close()
            if not self._open(pos):
                return 0
        got, err, ended = self._sync(self._fill, mv[:n])
        self._pos += got
        if err is not None:
            if not got:
                self.close()
                raise err
            self._error = err  # raised by the next read: these bytes are kept
        elif ended:  # a body of unknown length ended cleanly: the object's end
            self.size = self._pos
            self.close(reuse=True)
        elif self._stop is not None and self._pos >= self._stop:
            self.close(reuse=True)
        return got

    def close(self, reuse: bool = False) -> None:
        body, self._body = self._body, None
        if body is not None and os.getpid() == self._pid:
            try:
                self._sync(body.aclose, reuse)
            except Exception:
                pass

    # ---------------------------------------------------------------- internals
    def _sync(self, func, *args):
        from fsspec.asyn import sync

        return sync(self.fs.loop, func, *args)

    async def _timed(self, aw):
        return await (asyncio.wait_for(aw, self.timeout) if self.timeout else aw)

    def _read_other(self, pos: int, mv: memoryview) -> int:
        if self.size is None:
            self.size = self.fs.size(self.path)
        n = min(len(mv), PIECE, self.size - pos)
        if n <= 0:
            return 0
        self.requests += 1
        data = self.fs.cat_file(self.path, start=pos, end=pos + n)
        mv[: len(data)] = data
        return len(data)

    def _open(self, pos: int) -> bool:
        """Open a response at ``pos``; False when the object ends at or before ``pos``."""
        end = self._end if self._end is not None and self._end > pos else None
        if self.size is not None:
            end = self.size if end is None else min(end, self.size)
        self.requests += 1
        opened = self._sync(self._aopen, pos, end)
        if opened is None:  # 416: nothing at pos (the object is shorter than expected)
            self.size = pos if self.size is None else min(self.size, pos)
            return False
        self._body, self._pos, self._stop, total = opened
        if total is not None and (self.size is None or total < self.size):
            self.size = total
        if self._stop is None:
            self._stop = self.size
        return True

    async def _aopen(self, pos: int, end: int | None):
        opened = await self._timed(
            self._open_http(pos, end) if self.kind == "http" else self._open_s3(pos, end)
        )
        if opened is None:
            return None
        body, start, stop, total = opened
        try:
            while start < pos:  # a server that ignores Range answers from byte 0
                data = await self._timed(body.read(min(pos - start, PIECE)))
                if not data:
                    raise ConnectionError(f"response ended at byte {start}, before byte {pos}")
                start += len(data)
            if start != pos:
                raise ConnectionError(f"asked for byte {pos}, the response starts at byte {start}")
        except BaseException:
            await body.aclose()
            raise
        return body, pos, stop, total

    async def _open_http(self, pos: int, end: int | None):
        fs = self.fs
        kw = dict(fs.kwargs)
        headers = dict(kw.pop("headers", None) or {})
        if pos > 0 or end is not None:
            headers["Range"] = f"bytes={pos}-{'' if end is None else end - 1}"
        session = await fs.set_session()
        resp = await session.get(fs.encode_url(self.path), headers=headers, **kw)
        try:
            if resp.status == 404:
                raise FileNotFoundError(self.path)
            if resp.status in (401, 403):
                raise PermissionError(f"HTTP {resp.status} {resp.reason}: {self.path}")
            if resp.status == 416:
                resp.close()
                return None
            resp.raise_for_status()
            if resp.status == 206:
                start, stop, total = _content_range(resp.headers.get("Content-Range"))
            else:  # the whole object
                start, stop = 0, resp.content_length
                total = stop
        except BaseException:
            resp.close()
            raise
        return _Body(resp, resp.content, resp.release), start, stop, total

    async def _open_s3(self, pos: int, end: int | None):
        from botocore.exceptions import ClientError
        from s3fs.errors import translate_boto_error

        fs = self.fs
        bucket, key, version = fs.split_path(self.path)
        kw: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if version:
            kw["VersionId"] = version
        if pos > 0 or end is not None:
            kw["Range"] = f"bytes={pos}-{'' if end is None else end - 1}"
        await fs.set_session()
        s3 = await fs.get_s3(bucket)
        with_defaults = getattr(fs, "_get_s3_method_kwargs", None)  # requester-pays, SSE-C, ...
        if with_defaults is not None:
            kw = with_defaults(s3.get_object, **kw)
        try:
            resp = await s3.get_object(**kw)
        except ClientError as e:
            status = http_status(e)
            if status == 416 or e.response.get("Error", {}).get("Code") == "InvalidRange":
                return None
            if _transient_status(status):
                raise
            raise translate_boto_error(e) from e
        body = resp["Body"]
        raw = getattr(body, "_raw_stream", None)
        content = getattr(raw, "content", None)
        if resp.get("ContentRange"):
            start, stop, total = _content_range(resp["ContentRange"])
        else:
            start, stop = 0, resp.get("ContentLength")
            total = stop
        return _Body(body, content, getattr(raw, "release", None)), start, stop, total

    async def _salvage(self, mv: memoryview) -> int:
        data = self._body.salvage(min(len(mv), self._stop - self._pos) if self._stop is not None else len(mv))
        mv[: len(data)] = data
        return len(data)

    async def _fill(self, mv: memoryview) -> tuple[int, BaseException | None, bool]:
        """(bytes copied into ``mv`` from the open response, the error that stopped it or None,
        whether a body of unknown length ended)."""
        body, got = self._body, 0
        n = len(mv) if self._stop is None else min(len(mv), self._stop - self._pos)
        try:
            while got < n:
                data = await self._timed(body.read(n - got))
                if not data:
                    if self._stop is None:
                        return got, None, True
                    raise ConnectionError(
                        f"response ended at byte {self._pos + got}, {self._stop - self._pos - got} bytes early"
                    )
                mv[got : got + len(data)] = data
                got += len(data)
        except Exception as e:
            data = body.salvage(n - got)
            mv[got : got + len(data)] = data
            return got + len(data), e, False
        return got, None, False
