"""Loopback network parts for remote-read tests (127.0.0.1 only, real sockets, no mocks):

- :func:`serve_http`: a threaded HTTP server of a directory with single-range support (206), which logs
  every request (path, Range start, body bytes sent) and can cut a response after a chosen number of
  body bytes or answer with an error status (hooks per request);
- :func:`moto_s3`: a real S3 server (moto) holding a directory under ``s3://BUCKET/PREFIX``;
- :class:`CuttingProxy`: a TCP proxy that cuts responses to matching GETs mid-body — the first k after
  n bytes, or each one with probability p at a random body byte (seeded) — and records, per request,
  its Range start and the body bytes it let through.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import random
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path

BUCKET = "spkr-test"
PREFIX = "corpus/shards"


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (closed again at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(s):
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


# --------------------------------------------------------------------------- HTTP server


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range support (206 Partial Content). The server's ``status_for(path,
    n)`` may answer the n-th (0-based) request of a path with an error status, its ``cut_for(path, n,
    start)`` may cut the body after that many bytes (the connection is closed); every GET is logged in
    ``server.requests`` as ``{"path", "start", "sent", "cut"}``."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send_head(self):
        srv = self.server
        rel = self.path.split("?", 1)[0]
        with srv.lock:
            n = srv.counts.get((self.command, rel), 0)
            srv.counts[(self.command, rel)] = n + 1
        status = srv.status_for(rel, n) if srv.status_for and self.command == "GET" else None
        path = self.translate_path(self.path)
        self._rec = None
        if status:
            self.send_error(status)
            return None
        if not os.path.isfile(path):
            self.send_error(404)
            return None
        size = os.path.getsize(path)
        f = open(path, "rb")
        m = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        a = 0
        if m:
            a = int(m.group(1))
            b = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            if a >= size:
                f.close()
                self.send_error(416)
                return None
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{size}")
            f.seek(a)
            length = b - a + 1
        else:
            self.send_response(200)
            length = size
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._remaining = length
        self._limit = srv.cut_for(rel, n, a) if srv.cut_for and self.command == "GET" else None
        if self.command == "GET":
            self._rec = {"path": rel, "start": a, "sent": 0, "cut": False}
            with srv.lock:
                srv.requests.append(self._rec)
        return f

    def copyfile(self, source, outputfile):
        n, rec, limit = self._remaining, self._rec, self._limit
        while n > 0:
            step = min(n, 1 << 16)
            if limit is not None:
                step = min(step, limit - rec["sent"])
                if step <= 0:  # cut: what was sent is sent, then the connection goes
                    rec["cut"] = True
                    outputfile.flush()
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
            buf = source.read(step)
            if not buf:
                break
            try:
                outputfile.write(buf)
            except OSError:  # the client (or a proxy) went away
                self.close_connection = True
                return
            rec["sent"] += len(buf)
            n -= len(buf)


@contextlib.contextmanager
def serve_http(
    directory: str | Path,
    *,
    cut_for: Callable[[str, int, int], int | None] | None = None,
    status_for: Callable[[str, int], int | None] | None = None,
):
    """Yield a running server (``.port``, ``.requests``) of ``directory`` on 127.0.0.1."""
    handler = lambda *a, **k: RangeHandler(*a, directory=str(directory), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.lock, server.counts, server.requests = threading.Lock(), {}, []
    server.cut_for, server.status_for = cut_for, status_for
    server.port = server.server_address[1]
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- S3 server


@contextlib.contextmanager
def moto_s3(directory: str | Path | None = None, bucket: str = BUCKET, prefix: str = PREFIX):
    """A real S3 server (moto) on 127.0.0.1 with ``directory`` uploaded to ``s3://bucket/prefix``;
    yields its port. Sets test credentials in the environment while it runs."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        s3 = boto3.client(
            "s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )  # fmt: skip
        s3.create_bucket(Bucket=bucket)
        if directory is not None:
            for p in sorted(Path(directory).rglob("*")):
                if p.is_file():
                    s3.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(directory).as_posix()}")
        yield port
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_options(port: int, **extra) -> dict:
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
        **extra,
    }


# --------------------------------------------------------------------------- cutting proxy


class CuttingProxy:
    """TCP proxy on 127.0.0.1 to ``target_port`` that cuts responses to GETs whose path matches
    ``match`` (the connection is closed mid-body).

    - ``cuts=k, after=n``: the first k matching responses are cut after n body bytes;
    - ``ratio=p, seed=s``: each matching response whose body is longer than ``min_body`` is cut with
      probability p at a body byte drawn uniformly from ``[min_body, min(length, max_body))``
      (``random.Random(s)``); the first response of a path matching ``always_first`` is always cut.

    ``records``: per matching GET, in order: ``{"path", "start" (its Range start, 0 without),
    "body" (body bytes let through), "length" (Content-Length), "cut"}``. ``cuts`` counts cut responses.
    """

    REQUEST = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]\r\n", re.M)
    RANGE = re.compile(rb"^range:\s*bytes=(\d+)-", re.M | re.I)
    LENGTH = re.compile(rb"^content-length:\s*(\d+)", re.M | re.I)

    def __init__(
        self,
        target_port: int,
        cuts: int = 0,
        after: int = 20000,
        *,
        match: str = r"\.tar$",
        ratio: float = 0.0,
        seed: int = 0,
        min_body: int = 4096,
        max_body: int = 1 << 20,
        always_first: str | None = None,
    ):
        self.target, self.cuts_left, self.after = target_port, cuts, after
        self.match = re.compile(match)
        self.ratio, self.rng, self.min_body, self.max_body = ratio, random.Random(seed), min_body, max_body
        self.always_first = re.compile(always_first) if always_first else None
        self.cuts = 0
        self.records: list[dict] = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def tar_requests(self) -> int:
        return len(self.records)

    def _accept(self):
        while not self.stopped:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                _close(client)
                continue
            state = {"rec": None}
            threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._down, args=(client, upstream, state), daemon=True).start()

    def _up(self, client, upstream, state):
        try:
            while data := client.recv(65536):
                m = self.REQUEST.search(data)
                if m:
                    path = m.group(2).split(b"?", 1)[0].decode()
                    rec = None
                    if m.group(1) == b"GET" and self.match.search(path):
                        r = self.RANGE.search(data)
                        rec = {"path": path, "start": int(r.group(1)) if r else 0, "body": 0}
                        rec.update(length=None, cut=False, hdr=bytearray(), cut_at=None, parsed=False)
                        with self.lock:
                            self.records.append(rec)
                    state["rec"] = rec
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _close(upstream)

    def _decide(self, rec) -> int | None:
        """The body byte to cut this response at, or None."""
        with self.lock:
            first = not any(r["path"] == rec["path"] for r in self.records if r is not rec and r["parsed"])
            rec["parsed"] = True
            if self.cuts_left > 0:
                self.cuts_left -= 1
                return self.after
            if self.ratio <= 0 or rec["length"] is None or rec["length"] <= self.min_body:
                return None
            draw = self.rng.random()
            at = self.rng.randrange(self.min_body, max(self.min_body + 1, min(rec["length"], self.max_body)))
            forced = self.always_first is not None and first and self.always_first.search(rec["path"])
            return at if forced or draw < self.ratio else None

    def _down(self, client, upstream, state):
        try:
            while data := upstream.recv(65536):
                rec = state["rec"]
                if rec is None or rec["cut"]:
                    client.sendall(data)
                    continue
                if not rec["parsed"]:
                    rec["hdr"] += data
                    end = rec["hdr"].find(b"\r\n\r\n")
                    if end < 0:
                        continue  # headers incomplete: held back until they are
                    head, body = bytes(rec["hdr"][: end + 4]), bytes(rec["hdr"][end + 4 :])
                    m = self.LENGTH.search(head)
                    rec["length"] = int(m.group(1)) if m else None
                    rec["cut_at"] = self._decide(rec)
                    client.sendall(head)
                    data = body
                cut_at = rec["cut_at"]
                if cut_at is not None and rec["body"] + len(data) >= cut_at:
                    client.sendall(data[: cut_at - rec["body"]])
                    rec["body"] = cut_at
                    rec["cut"] = True
                    with self.lock:
                        self.cuts += 1
                    break
                rec["body"] += len(data)
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(upstream)

    def cut_ratio(self) -> float:
        return self.cuts / max(1, len(self.records))

    def resumes(self) -> list[tuple[str, int, int]]:
        """Per cut response: (path, the byte it stopped at, the Range start of the next request of
        that path) — equal when the client resumed exactly at the byte it had received (one client
        reading one path at a time)."""
        out = []
        recs = list(self.records)
        for i, r in enumerate(recs):
            if r["cut"]:
                nxt = next((q for q in recs[i + 1 :] if q["path"] == r["path"]), None)
                out.append((r["path"], r["start"] + r["body"], None if nxt is None else nxt["start"]))
        return out

    def close(self):
        self.stopped = True
        _close(self.sock)
