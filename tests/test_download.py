"""spkr.corpus.download (against a local HTTP server on 127.0.0.1) and the Hugging Face source."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import stat
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from spkr.corpus import iter_hf_dataset, iter_openslr
from spkr.corpus import librispeech as ls
from spkr.corpus.download import (
    COMPLETE_MARKER,
    KNOWN_SHA256,
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
    download_openslr,
    read_checksum_file,
)
from spkr.tools import download as cli

SR = 16000


def _flac_bytes(seconds: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    x = (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, SR, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))


def make_tarball(subset: str, n_utts: int = 3) -> bytes:
    """A LibriSpeech-format tarball: LibriSpeech/<subset>/<spk>/<ch>/..., plus SPEAKERS.TXT.
    Noise audio, so the gzip does not shrink it much (the resume tests need some size)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        _add(
            tf,
            "LibriSpeech/SPEAKERS.TXT",
            b";ID |SEX| SUBSET | MINUTES | NAME\n1 | F | dev-clean | 1.00 | A\n",
        )
        lines = []
        for i in range(n_utts):
            key = f"1-2-{i:04d}"
            _add(tf, f"LibriSpeech/{subset}/1/2/{key}.flac", _flac_bytes(4.0, i))
            lines.append(f"{key} TEXT {i}")
        _add(tf, f"LibriSpeech/{subset}/1/2/1-2.trans.txt", ("\n".join(lines) + "\n").encode())
    return buf.getvalue()


class Server:
    """http.server in a thread serving ``files`` (url path -> bytes) with Range support.

    mode: "normal"; "drop_once" (the first GET sends half the body, then closes the connection);
    "ignore_range" (always answers 200 with the whole file)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.mode = "normal"
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.dropped = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and server.mode != "ignore_range":
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if server.mode == "drop_once" and server.dropped == 0:
                    server.dropped += 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def tarballs():
    return {s: make_tarball(s) for s in ("dev-clean", "train-clean-100")}


@pytest.fixture
def server(tarballs):
    with Server({f"/{s}.tar.gz": data for s, data in tarballs.items()}) as srv:
        yield srv


def _md5s(tarballs):
    return {s: hashlib.md5(d).hexdigest() for s, d in tarballs.items()}


def test_download_extract_and_skip(tmp_path, server, tarballs):
    dest = tmp_path / "data"
    dirs = download_openslr(
        ["train.100", "dev-clean"], dest, base_url=server.url, md5s=_md5s(tarballs), progress=False
    )
    assert dirs == [dest / "LibriSpeech" / "train-clean-100", dest / "LibriSpeech" / "dev-clean"]
    for d in dirs:
        assert (d / COMPLETE_MARKER).is_file()
        assert sorted(p.name for p in (d / "1" / "2").iterdir()) == [
            "1-2-0000.flac",
            "1-2-0001.flac",
            "1-2-0002.flac",
            "1-2.trans.txt",
        ]
    assert (dest / "LibriSpeech" / "SPEAKERS.TXT").is_file()
    assert sorted(p.name for p in dest.iterdir()) == ["LibriSpeech"]  # no archives, .part, tmp dirs
    utts = list(iter_openslr(dest, "dev-clean"))
    assert [(u.key, u.transcript) for u in utts] == [(f"1-2-{i:04d}", f"TEXT {i}") for i in range(3)]
    assert utts[0].duration == pytest.approx(4.0)
    assert [r for r in server.requests] == [("/train-clean-100.tar.gz", None), ("/dev-clean.tar.gz", None)]

    n = len(server.requests)
    download_openslr("dev-clean", dest, base_url=server.url, md5s=_md5s(tarballs), progress=False)
    assert len(server.requests) == n  # second run does nothing


def test_checksum_mismatch(tmp_path, server):
    dest = tmp_path / "data"
    with pytest.raises(ChecksumError, match="dev-clean: checksum mismatch"):
        download_openslr("dev-clean", dest, base_url=server.url, md5s={"dev-clean": "0" * 32}, progress=False)
    assert not (dest / "LibriSpeech" / "dev-clean").exists()
    assert list(dest.iterdir()) == []  # .part deleted, nothing extracted
    with pytest.raises(ChecksumError, match="sha256 expected"):
        download_openslr(
            "dev-clean", dest, base_url=server.url, md5s=None, sha256s={"dev-clean": "f" * 64}, progress=False
        )


def test_resume_after_dropped_connection(tmp_path, server, tarballs):
    dest = tmp_path / "data"
    server.mode = "drop_once"
    download_openslr("dev-clean", dest, base_url=server.url, md5s=_md5s(tarballs), progress=False)
    assert is_extracted(dest, "dev-clean")
    assert len(server.requests) == 2 and server.requests[0] == ("/dev-clean.tar.gz", None)
    # resumed from what was written before the drop: whole 64 KiB blocks of the first half
    half = len(tarballs["dev-clean"]) // 2
    start = int(server.requests[1][1].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= half and half - start < 1 << 16


def test_resume_across_runs(tmp_path, server, tarballs):
    dest = tmp_path / "data"
    server.mode = "drop_once"
    with pytest.raises(DownloadError, match="rerun to resume"):
        download_openslr(
            "dev-clean", dest, base_url=server.url, md5s=_md5s(tarballs), retries=0, progress=False
        )
    part = dest / "dev-clean.tar.gz.part"
    size = part.stat().st_size
    assert 0 < size <= len(tarballs["dev-clean"]) // 2
    download_openslr("dev-clean", dest, base_url=server.url, md5s=_md5s(tarballs), progress=False)
    assert is_extracted(dest, "dev-clean")
    assert server.requests[-1] == ("/dev-clean.tar.gz", f"bytes={size}-")
    assert not part.exists()


def test_server_ignoring_range_restarts(tmp_path, server, tarballs):
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "dev-clean.tar.gz.part").write_bytes(b"garbage that is not a prefix of the file")
    server.mode = "ignore_range"
    download_openslr("dev-clean", dest, base_url=server.url, md5s=_md5s(tarballs), progress=False)
    assert is_extracted(dest, "dev-clean")
    assert server.requests == [("/dev-clean.tar.gz", "bytes=40-")]  # answered 200: restarted


def test_complete_part_gets_416(tmp_path, server, tarballs):
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "dev-clean.tar.gz.part").write_bytes(tarballs["dev-clean"])
    download_openslr("dev-clean", dest, base_url=server.url, md5s=_md5s(tarballs), progress=False)
    assert is_extracted(dest, "dev-clean")


def test_unsafe_archive_rejected(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        _add(tf, "LibriSpeech/dev-clean/1/2/1-2.trans.txt", b"x\n")
        _add(tf, "LibriSpeech/../../evil.txt", b"pwned")
    data = buf.getvalue()
    dest = tmp_path / "a" / "b"
    with Server({"/dev-clean.tar.gz": data}) as srv:
        with pytest.raises(UnsafeArchiveError, match="evil"):
            download_openslr("dev-clean", dest, base_url=srv.url, md5s={}, progress=False)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "a" / "evil.txt").exists()
    assert not (dest / "LibriSpeech" / "dev-clean").exists()
    assert not list(dest.glob(".extract-*"))


def test_http_error(tmp_path, server):
    with pytest.raises(DownloadError, match="404"):
        download_openslr("test-other", tmp_path, base_url=server.url, md5s={}, progress=False)


def test_read_checksum_file(tmp_path):
    p = tmp_path / "md5sum.txt"
    p.write_text("42e2234ba48799c1f50f24a7926300a1  dev-clean.tar.gz\nabcd *info.txt\n")
    assert read_checksum_file(p) == {"dev-clean": "42e2234ba48799c1f50f24a7926300a1", "info.txt": "abcd"}


def test_cli(tmp_path, server, tarballs, capsys):
    dest = tmp_path / "data"
    md5 = _md5s(tarballs)["dev-clean"]
    args = ["--subsets", "dev-clean", "--dest", str(dest), "--base-url", server.url, "--no-progress"]
    assert cli.main(args + ["--md5", f"dev-clean={md5}"]) == 0
    assert is_extracted(dest, "dev-clean")
    assert cli.main(args + ["--subsets", "train.100", "--md5", "train-clean-100=" + "1" * 32]) == 2
    assert "checksum mismatch" in capsys.readouterr().err


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077], ids=["umask022", "umask002", "umask077"])
def test_downloaded_files_honour_umask(tmp_path, server, tarballs, mask):
    """The partial download, the kept archive, every extracted file and the marker get 0666 & ~umask
    (directories 0777 & ~umask), not the archive's member modes (0644 here) or mkstemp's 0600."""
    dest = tmp_path / "data"
    server.mode = "drop_once"
    old = os.umask(mask)
    try:
        with pytest.raises(DownloadError):
            download_openslr(
                "dev-clean", dest, base_url=server.url, md5s=_md5s(tarballs), retries=0, progress=False
            )
        part_mode = _mode(dest / "dev-clean.tar.gz.part")
        download_openslr(
            "dev-clean", dest, base_url=server.url, md5s=_md5s(tarballs), keep_archive=True, progress=False
        )
    finally:
        os.umask(old)
    assert oct(part_mode) == oct(0o666 & ~mask)
    files = {p.relative_to(dest).as_posix(): oct(_mode(p)) for p in dest.rglob("*") if p.is_file()}
    assert {"dev-clean.tar.gz", "LibriSpeech/SPEAKERS.TXT", "LibriSpeech/dev-clean/.complete"} <= set(files)
    assert "LibriSpeech/dev-clean/1/2/1-2-0000.flac" in files and len(files) == 3 + 4
    assert files == {name: oct(0o666 & ~mask) for name in files}
    dirs = {p.relative_to(dest).as_posix(): oct(_mode(p)) for p in dest.rglob("*") if p.is_dir()}
    assert dirs == {name: oct(0o777 & ~mask) for name in dirs} and len(dirs) == 4


def _sha256s(tarballs):
    return {s: hashlib.sha256(d).hexdigest() for s, d in tarballs.items()}


def _marker(dest: Path, subset: str) -> dict:
    return json.loads((dest / "LibriSpeech" / subset / COMPLETE_MARKER).read_text())


def test_sha256_verification(tmp_path, tarballs, capsys):
    """sha256 works everywhere md5 does: --sha256 SUBSET=HEX / FILE=HEX, a published sha256sum file
    fetched from the server (or a local one mixing md5 and sha256 lines), and the built-in sums."""
    sha, md5 = _sha256s(tarballs), _md5s(tarballs)
    published = f"{sha['dev-clean']}  dev-clean.tar.gz\n{sha['train-clean-100']} *train-clean-100.tar.gz\n"
    files = {f"/{s}.tar.gz": data for s, data in tarballs.items()}
    with Server({**files, "/sha256sum.txt": published.encode()}) as srv:

        def run(dest: str, *args: str) -> int:
            return cli.main(["--base-url", srv.url, "--no-progress", "--dest", str(tmp_path / dest), *args])

        # the published checksum file by URL: it replaces the built-in sums of the subsets it lists
        published_url = srv.url + "/sha256sum.txt"
        assert run("a", "--subsets", "dev-clean", "train.100", "--checksum-file", published_url) == 0
        assert ("/sha256sum.txt", None) in srv.requests
        for subset in ("dev-clean", "train-clean-100"):
            assert is_extracted(tmp_path / "a", subset)
            m = _marker(tmp_path / "a", subset)
            assert m["verified"] and m["verified_with"] == ["sha256"] and m["sha256"] == sha[subset]
        # --sha256 with a file name (or a subset name)
        sha_flag = f"dev-clean.tar.gz={sha['dev-clean'].upper()}"
        assert run("b", "--subsets", "dev-clean", "--sha256", sha_flag) == 0
        assert _marker(tmp_path / "b", "dev-clean")["verified_with"] == ["sha256"]
        # a wrong sha256 is caught even when the md5 given alongside matches
        wrong = ("0" if sha["dev-clean"][0] != "0" else "1") + sha["dev-clean"][1:]
        md5_flag = f"dev-clean={md5['dev-clean']}"
        assert run("c", "--subsets", "dev-clean", "--md5", md5_flag, "--sha256", f"dev-clean={wrong}") == 2
        err = capsys.readouterr().err
        assert "checksum mismatch" in err and f"sha256 expected {wrong}" in err and "md5 expected" not in err
        assert not is_extracted(tmp_path / "c", "dev-clean") and not list((tmp_path / "c").glob("*.tar.gz*"))
        # a local checksum file mixing both kinds
        mixed = tmp_path / "sums.txt"
        mixed.write_text(
            f"{md5['dev-clean']}  dev-clean.tar.gz\n{sha['train-clean-100']}  x/train-clean-100.tar.gz\n"
        )
        assert run("d", "--subsets", "dev-clean", "train-clean-100", "--checksum-file", str(mixed)) == 0
        assert _marker(tmp_path / "d", "dev-clean")["verified_with"] == ["md5"]
        assert _marker(tmp_path / "d", "train-clean-100")["verified_with"] == ["sha256"]
        # by default both built-in sums (OpenSLR's md5 and torchaudio's sha256) are checked
        with pytest.raises(ChecksumError, match=r"md5 expected 42e2.*sha256 expected 76f87d09"):
            download_openslr("dev-clean", tmp_path / "e", base_url=srv.url, progress=False)
        assert KNOWN_SHA256["dev-clean"].startswith("76f87d09")
        # a checksum file URL that is not there is a clean error
        assert run("f", "--subsets", "dev-clean", "--checksum-file", srv.url + "/nope.txt") == 2
        assert "nope.txt: HTTP 404" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--sha256", "dev-clean=abc", "64 hex digits"),
        ("--md5", "dev-clean=" + "a" * 64, "32 hex digits"),
        ("--sha256", "dev-clean=" + "g" * 64, "64 hex digits"),
        ("--sha256", "dev-clean", "SUBSET=HEX"),
        ("--sha256", "train.960=" + "a" * 64, "one checksum per tarball"),
        ("--md5", "dev-dirty=" + "a" * 32, "unknown LibriSpeech subset 'dev-dirty'"),
    ],
)
def test_bad_checksum_flags_are_usage_errors(tmp_path, capsys, flag, value, message):
    offline = ["--base-url", "http://127.0.0.1:9"]  # a mistake here meets a closed loopback port
    with pytest.raises(SystemExit) as e:
        cli.main(["--subsets", "dev-clean", "--dest", str(tmp_path), *offline, flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_conflicting_checksums_for_one_subset(tmp_path, server):
    with pytest.raises(ValueError, match="two different sha256 checksums for dev-clean"):
        download_openslr(
            "dev-clean", tmp_path, base_url=server.url, md5s={"dev-clean": "a" * 64},
            sha256s={"dev-clean": "b" * 64}, progress=False,
        )  # fmt: skip


def is_extracted(dest: Path, subset: str) -> bool:
    d = dest / "LibriSpeech" / subset
    return (d / COMPLETE_MARKER).is_file() and len(list(d.glob("*/*/*.flac"))) == 3


# ------------------------------------------------------------------------------------- Hugging Face


def _hf_dataset():
    import datasets

    rows = [("19-198-0000", 19, 198, 0.5), ("19-198-0001", 19, 198, 0.75), ("26-495-0000", 26, 495, 1.0)]
    audio = [{"bytes": _flac_bytes(d, i), "path": f"{k}.flac"} for i, (k, _, _, d) in enumerate(rows)]
    ds = datasets.Dataset.from_dict(
        {
            "audio": audio,
            "speaker_id": [r[1] for r in rows],
            "chapter_id": [r[2] for r in rows],
            "id": [r[0] for r in rows],
            "text": [f"TEXT {r[0]}" for r in rows],
        }
    )
    return ds.cast_column("audio", datasets.Audio(decode=False)), rows


def _check_hf(utts, rows, subset):
    assert [u.key for u in utts] == [r[0] for r in rows]
    for u, (key, spk, ch, dur) in zip(utts, rows):
        assert (u.speaker, u.chapter, u.subset, u.transcript) == (str(spk), str(ch), subset, f"TEXT {key}")
        assert u.path == f"{key}.flac"
        assert u.duration == pytest.approx(dur)
        x, sr = sf.read(io.BytesIO(u.audio_bytes))
        assert sr == SR and len(x) == int(dur * SR)


def test_hf_save_to_disk_and_parquet(tmp_path):
    import datasets

    ds, rows = _hf_dataset()
    ds.save_to_disk(str(tmp_path / "single"))
    _check_hf(list(iter_hf_dataset(str(tmp_path / "single"), "dev-clean")), rows, "dev-clean")

    datasets.DatasetDict({"validation": ds, "train-clean-100": ds}).save_to_disk(str(tmp_path / "dict"))
    _check_hf(list(iter_hf_dataset(str(tmp_path / "dict"), "dev-clean")), rows, "dev-clean")  # mapped name
    _check_hf(list(iter_hf_dataset(str(tmp_path / "dict"), "train.100")), rows, "train-clean-100")
    with pytest.raises(KeyError, match="test-clean"):
        list(iter_hf_dataset(str(tmp_path / "dict"), "test-clean"))

    ds.to_parquet(str(tmp_path / "pq" / "data.parquet"))
    cache = str(tmp_path / "cache")
    _check_hf(
        list(iter_hf_dataset(str(tmp_path / "pq" / "data.parquet"), "dev-clean", cache_dir=cache)),
        rows,
        "dev-clean",
    )
    # hub-like directory: <dir>/<config>/<split>/*.parquet
    ds.to_parquet(str(tmp_path / "hub" / "clean" / "validation" / "0000.parquet"))
    utts = list(iter_hf_dataset(str(tmp_path / "hub"), "dev-clean", cache_dir=cache, streaming=True))
    _check_hf(utts, rows, "dev-clean")


def test_hf_hub_split_mapping(monkeypatch):
    import datasets

    ds, rows = _hf_dataset()
    calls = []

    def fake_load_dataset(name, config=None, split=None, streaming=False, cache_dir=None):
        calls.append((name, config, split))
        return ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    utts = list(iter_hf_dataset("openslr/librispeech_asr", "train.460"))
    assert calls == [
        ("openslr/librispeech_asr", "clean", "train.100"),
        ("openslr/librispeech_asr", "clean", "train.360"),
    ]
    assert [u.subset for u in utts] == ["train-clean-100"] * 3 + ["train-clean-360"] * 3
    calls.clear()
    list(iter_hf_dataset("openslr/librispeech_asr", "train-other-500"))
    list(iter_hf_dataset("openslr/librispeech_asr", "dev-clean", config="all"))
    list(iter_hf_dataset("openslr/librispeech_asr", "test-other"))
    assert calls == [
        ("openslr/librispeech_asr", "other", "train.500"),
        ("openslr/librispeech_asr", "all", "validation.clean"),
        ("openslr/librispeech_asr", "other", "test"),
    ]
    with pytest.raises(ValueError, match="'other'"):
        list(iter_hf_dataset("openslr/librispeech_asr", "dev-clean", config="other"))
    assert ls._resolve_hf_splits("validation", "clean")[0].subset == "dev-clean"


def test_cli_hf_save_to_disk(tmp_path, capsys):
    ds, rows = _hf_dataset()
    ds.save_to_disk(str(tmp_path / "src"))
    out = tmp_path / "copy"
    assert (
        cli.main(["--hf", str(tmp_path / "src"), "--subsets", "dev-clean", "--save-to-disk", str(out)]) == 0
    )
    assert "dev-clean: 3 utterances, 2 speakers" in capsys.readouterr().out
    _check_hf(list(iter_hf_dataset(str(out), "dev-clean")), rows, "dev-clean")
