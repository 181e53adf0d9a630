"""Download LibriSpeech from OpenSLR: resumable, checksummed, atomically extracted.

``download_openslr(["train.100", "dev-clean", "test-clean"], "data")`` produces
``data/LibriSpeech/<subset>/...`` (plus the corpus-level ``SPEAKERS.TXT`` etc.) and a marker
``data/LibriSpeech/<subset>/.complete`` written last; a rerun skips completed subsets. Hugging Face datasets
need no download step here: :func:`spkr.corpus.librispeech.iter_hf_dataset` reads them directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

import requests

from spkr import atomic
from spkr.errors import SpkrError

from .librispeech import expand_subsets

OPENSLR_BASE_URL = "https://www.openslr.org/resources/12"

# Published by OpenSLR in https://www.openslr.org/resources/12/md5sum.txt
KNOWN_MD5: dict[str, str] = {
    "dev-clean": "42e2234ba48799c1f50f24a7926300a1",
    "dev-other": "c8d0bcc9cca99d4f8b62fcc847357931",
    "test-clean": "32fa31d27d2e1cad72775fee3f4849a9",
    "test-other": "fb5a50374b501bb3bac4815ee91d3135",
    "train-clean-100": "2a93770f6d5c6c964bc36631d331a522",
    "train-clean-360": "c0e676e450a7ff2f54aeade5171606fa",
    "train-other-500": "d1a0fd59409feb2c614ce4d30c387708",
}
# SHA-256 of the same tarballs (as pinned by torchaudio.datasets.LIBRISPEECH).
KNOWN_SHA256: dict[str, str] = {
    "dev-clean": "76f87d090650617fca0cac8f88b9416e0ebf80350acb97b343a85fa903728ab3",
    "dev-other": "12661c48e8c3fe1de2c1caa4c3e135193bfb1811584f11f569dd12645aa84365",
    "test-clean": "39fde525e59672dc6d1551919b1478f724438a95aa55f874b576be21967e6c23",
    "test-other": "d09c181bba5cf717b3dee7d4d592af11a3ee3a09e08ae025c5506f6ebe961c29",
    "train-clean-100": "d4ddd1d5a6ab303066f14971d768ee43278a5f2a0aa43dc716b0e64ecbbbf6e2",
    "train-clean-360": "146a56496217e96c14334a160df97fffedd6e0a04e66b9c5af0d40be3c792ecf",
    "train-other-500": "ddb22f27f96ec163645d53215559df6aa36515f26e01dd70798188350adcb6d2",
}

COMPLETE_MARKER = ".complete"
_CHUNK = 1 << 16  # download block: at most this much is lost (re-fetched) when a connection drops


class DownloadError(SpkrError, RuntimeError):
    """The download failed (HTTP error, retries exhausted, truncated file)."""


class ChecksumError(SpkrError, ValueError):
    """The downloaded archive does not match its published checksum."""


class UnsafeArchiveError(SpkrError, ValueError):
    """A tar member would be written outside the extraction directory."""


# ------------------------------------------------------------------------------------- checksums


def read_checksum_file(path: str | os.PathLike, *, timeout: float = 60.0) -> dict[str, str]:
    """Parse ``md5sum``/``sha256sum`` output (``<hex>  <file>``, either kind, even mixed) into
    ``{subset: hex}``; ``path`` may be an ``http(s)://`` URL (a published checksum file).

    ``train-clean-100.tar.gz`` -> ``train-clean-100``; other lines are kept under their file name.
    """
    if str(path).startswith(("http://", "https://")):
        try:
            r = requests.get(str(path), timeout=timeout)
        except requests.RequestException as e:
            raise DownloadError(f"{path}: cannot fetch the checksum file ({e})") from e
        if r.status_code != 200:
            raise DownloadError(f"{path}: HTTP {r.status_code} {r.reason}")
        lines = r.text.splitlines()
    else:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    out: dict[str, str] = {}
    for line in lines:
        parts = line.split()
        if len(parts) < 2 or line.lstrip().startswith("#"):
            continue
        digest, name = parts[0].lower(), parts[-1].lstrip("*")
        out[subset_of_file(name)] = digest
    return out


def subset_of_file(name: str) -> str:
    """``.../train-clean-100.tar.gz`` -> ``train-clean-100`` (other names: their base name)."""
    name = PurePosixPath(name).name
    return name[: -len(".tar.gz")] if name.endswith(".tar.gz") else name


def file_digests(path: str | os.PathLike) -> dict[str, str]:
    """``{"md5": ..., "sha256": ...}`` of a file (one read)."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            md5.update(block)
            sha.update(block)
    return {"md5": md5.hexdigest(), "sha256": sha.hexdigest()}


def _expected_digests(
    subset: str, md5s: Mapping[str, str] | None, sha256s: Mapping[str, str] | None
) -> dict[str, str]:
    """{"md5": hex, "sha256": hex} expected for ``subset``. A value is classified by its length (a
    checksum file may mix algorithms), so either table may hold either kind; two different values
    for one algorithm are an error."""
    exp: dict[str, str] = {}
    for table in (md5s, sha256s):
        value = ((table or {}).get(subset) or "").strip().lower()
        if not value:
            continue
        algo = {32: "md5", 64: "sha256"}.get(len(value))
        if algo is None or any(c not in "0123456789abcdef" for c in value):
            raise ValueError(
                f"checksum {value!r} for {subset}: not an md5 (32 hex digits) or sha256 (64 hex digits)"
            )
        if exp.get(algo, value) != value:
            raise ValueError(f"two different {algo} checksums for {subset}: {exp[algo]} and {value}")
        exp[algo] = value
    return exp


# -------------------------------------------------------------------------------------- download


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def _log(msg: str, enabled: bool) -> None:
    if enabled:
        from rich import print as rprint

        rprint(msg)


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    session: requests.Session | None = None,
    retries: int = 5,
    timeout: float = 60.0,
    progress: bool = True,
    description: str | None = None,
) -> Path:
    """Download ``url`` into ``<dest>.part``, resuming from its size with an HTTP Range request.

    A server answering 200 to a Range request gets the file restarted from scratch; 206 with the wrong
    start restarts too; 416 means the part is already complete (if its size matches). Connection drops are
    retried (``retries`` times, resuming each time). Returns the ``.part`` path; the caller verifies and
    renames it.
    """
    part = Path(str(dest) + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    sess = session or requests.Session()
    attempt = 0
    with _progress(progress) as bar:
        task = bar.add_task(description or Path(str(dest)).name, total=None)
        while True:
            try:
                _fetch_part(sess, url, part, timeout, bar, task)
                return part
            except _Restart as e:
                if e.rejected_at is None:
                    continue
                attempt += 1
                if attempt > retries:
                    raise DownloadError(f"{url}: server rejects resuming at byte {e.rejected_at}") from None
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as e:
                attempt += 1
                if attempt > retries:
                    raise DownloadError(
                        f"{url}: download failed after {retries} retries ({e}); rerun to resume from "
                        f"{part} ({part.stat().st_size if part.exists() else 0} bytes)"
                    ) from e
                time.sleep(min(30.0, 0.5 * 2 ** (attempt - 1)) if attempt > 1 else 0.1)


class _Restart(Exception):
    """Start the download over (the part was deleted). ``rejected_at``: the server refused to resume at
    that byte (a 416 for a part that is not the whole file), which counts as a retry."""

    def __init__(self, rejected_at: int | None = None):
        super().__init__(rejected_at)
        self.rejected_at = rejected_at


def _fetch_part(sess: requests.Session, url: str, part: Path, timeout: float, bar, task) -> None:
    """One GET of ``url`` from the size of ``part`` on, appended to it (or written afresh when the server
    sends the whole file); returns when ``part`` is complete. A connection error, or a body shorter than
    announced (a ConnectionError), leaves what arrived in ``part``."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with sess.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416 and offset:
            if _content_range_total(r.headers.get("Content-Range")) == offset:
                return  # already complete
            part.unlink()  # inconsistent part: start over
            raise _Restart(rejected_at=offset)
        if r.status_code not in (200, 206):
            raise DownloadError(f"{url}: HTTP {r.status_code} {r.reason}")
        start, total = _response_range(r, offset, part)
        bar.update(task, total=total, completed=start)
        with open(part, "ab" if r.status_code == 206 else "wb") as f:  # 200: the server ignored Range
            for block in r.iter_content(chunk_size=_CHUNK):
                if block:
                    f.write(block)
                    bar.advance(task, len(block))
        size = part.stat().st_size
        if total is not None and size != total:
            raise requests.ConnectionError(f"truncated: {size} of {total} bytes")


def _response_range(r: requests.Response, offset: int, part: Path) -> tuple[int, int | None]:
    """(first byte, total size or None) of a 200/206 response; a 206 that does not start at ``offset``
    deletes ``part`` and restarts the download."""
    if r.status_code != 206:
        return 0, (int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None)
    start, total = _content_range(r.headers.get("Content-Range"))
    if start != offset:
        part.unlink(missing_ok=True)
        raise _Restart()
    return start, total


def _content_range(value: str | None) -> tuple[int, int | None]:
    # "bytes 100-199/200"
    if not value or not value.startswith("bytes "):
        raise DownloadError(f"bad Content-Range header {value!r}")
    rng, _, total = value[len("bytes ") :].partition("/")
    start = int(rng.split("-")[0])
    return start, (int(total) if total.isdigit() else None)


def _content_range_total(value: str | None) -> int | None:
    # "bytes */200"
    if value and "/" in value:
        total = value.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    return None


# --------------------------------------------------------------------------------------- extract


def _safe_filter(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo | None:
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise UnsafeArchiveError(f"refusing tar member with an absolute or parent path: {name!r}")
    if member.islnk() or member.issym():
        target = member.linkname
        if target.startswith("/") or ".." in PurePosixPath(target).parts:
            raise UnsafeArchiveError(f"refusing tar link {name!r} -> {target!r}")
    member = tarfile.data_filter(member, dest_path)
    # a file gets the mode of any new file (0666 & ~umask; 0777 & ~umask if executable), not the archive's
    if member.isreg():
        exe = member.mode is not None and member.mode & 0o100
        member = member.replace(mode=(0o777 & ~atomic.current_umask()) if exe else None, deep=False)
    return member


def extract_subset(archive: str | os.PathLike, dest: str | os.PathLike, subset: str) -> Path:
    """Extract a LibriSpeech tarball atomically into ``<dest>/LibriSpeech/<subset>``.

    Extracts into ``<dest>/.extract-<subset>.tmp``, moves the corpus-level files (``SPEAKERS.TXT`` ...) to
    ``<dest>/LibriSpeech/`` unless present, renames the subset directory into place and writes the
    ``.complete`` marker last.
    """
    dest = Path(dest)
    tmp = dest / f".extract-{subset}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:*") as tf:
            tf.extractall(tmp, filter=_safe_filter)
        base = tmp / "LibriSpeech" if (tmp / "LibriSpeech").is_dir() else tmp
        src = base / subset
        if not src.is_dir():
            raise ValueError(f"{archive} does not contain LibriSpeech/{subset}/ (has: {os.listdir(base)})")
        corpus = dest / "LibriSpeech"
        corpus.mkdir(parents=True, exist_ok=True)
        for extra in base.iterdir():
            if extra.is_file() and not (corpus / extra.name).exists():
                os.replace(extra, corpus / extra.name)
        final = corpus / subset
        if final.exists():  # a previous, unfinished extraction (no marker)
            shutil.rmtree(final)
        os.replace(src, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_marker(subset_dir: Path, info: dict) -> None:
    data = json.dumps(info, indent=2, sort_keys=True) + "\n"
    atomic.write_bytes(subset_dir / COMPLETE_MARKER, data.encode())


def is_complete(dest: str | os.PathLike, subset: str) -> bool:
    return (Path(dest) / "LibriSpeech" / subset / COMPLETE_MARKER).is_file()


def _verify_archive(candidate: Path, subset: str, url: str, expected: dict, progress: bool) -> dict:
    """The archive's md5/sha256; a mismatch with any expected digest deletes it and raises ChecksumError."""
    got = file_digests(candidate)
    bad = {a: (e, got[a]) for a, e in expected.items() if got[a] != e}
    if bad:
        candidate.unlink(missing_ok=True)
        detail = "; ".join(f"{a} expected {e}, got {g}" for a, (e, g) in bad.items())
        raise ChecksumError(f"{subset}: checksum mismatch for {url} ({detail}); deleted {candidate}")
    if not expected:
        _log(
            f"[yellow]{subset}: no known checksum, not verified[/]: md5 {got['md5']} sha256 {got['sha256']}",
            progress,
        )
    return got


def download_openslr(
    subsets: str | Iterable[str],
    dest: str | os.PathLike,
    *,
    base_url: str = OPENSLR_BASE_URL,
    md5s: Mapping[str, str] | None = None,
    sha256s: Mapping[str, str] | None = None,
    keep_archive: bool = False,
    retries: int = 5,
    timeout: float = 60.0,
    progress: bool = True,
    session: requests.Session | None = None,
) -> list[Path]:
    """Download, verify and extract LibriSpeech subsets (names or combined names such as ``train.960``).

    For each subset: skip if ``<dest>/LibriSpeech/<subset>/.complete`` exists; else fetch
    ``<base_url>/<subset>.tar.gz`` into ``<dest>/<subset>.tar.gz.part`` (resuming), verify md5 and/or
    sha256 (``md5s``/``sha256s`` map subset -> hex, classified by length: 32 digits md5, 64 sha256;
    every expected digest must match; when neither table is given: OpenSLR's published md5 sums and
    the sha256 sums torchaudio pins, :data:`KNOWN_MD5` / :data:`KNOWN_SHA256`), rename it to
    ``<subset>.tar.gz``, extract atomically, write the marker and delete
    the archive unless ``keep_archive``. A checksum mismatch deletes the download and raises
    :class:`ChecksumError`. With no known checksum the computed md5/sha256 are printed and the archive is
    accepted. Returns the subset directories.
    """
    if md5s is None and sha256s is None:
        md5s, sha256s = KNOWN_MD5, KNOWN_SHA256
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    fetch = dict(session=session or requests.Session(), retries=retries, timeout=timeout, progress=progress)
    out = []
    for subset in expand_subsets(subsets):
        final = dest / "LibriSpeech" / subset
        if is_complete(dest, subset):
            _log(f"{subset}: already complete ({final})", progress)
            out.append(final)
            continue
        url = f"{base_url.rstrip('/')}/{subset}.tar.gz"
        expected = _expected_digests(subset, md5s, sha256s)
        out.append(_install_subset(subset, dest, url, expected, keep_archive=keep_archive, fetch=fetch))
    return out


def _install_subset(
    subset: str, dest: Path, url: str, expected: dict, *, keep_archive: bool, fetch: dict
) -> Path:
    """One subset of :func:`download_openslr`: the archive (an existing ``<subset>.tar.gz``, else
    downloaded with ``fetch``, :func:`download_file`'s options) verified, extracted, marked complete."""
    progress = fetch["progress"]
    archive = dest / f"{subset}.tar.gz"
    if archive.exists():
        candidate = archive
        _log(f"{subset}: verifying existing {archive}", progress)
    else:
        candidate = download_file(url, archive, description=subset, **fetch)
    got = _verify_archive(candidate, subset, url, expected, progress)
    if candidate != archive:
        os.replace(candidate, archive)
    _log(f"{subset}: extracting {archive.name}", progress)
    final = extract_subset(archive, dest, subset)
    marker = {"subset": subset, "url": url, "md5": got["md5"], "sha256": got["sha256"]}
    _write_marker(final, {**marker, "verified": bool(expected), "verified_with": sorted(expected)})
    if not keep_archive:
        archive.unlink()
    _log(f"[green]{subset}: done[/] ({final})", progress)
    return final
