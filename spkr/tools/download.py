"""Download LibriSpeech (OpenSLR tarballs) or inspect/materialise a Hugging Face copy.

    python -m spkr.tools.download --subsets train.100 dev-clean test-clean --dest data
    python -m spkr.tools.download --subsets dev-clean --dest data --md5 dev-clean=42e2...
    python -m spkr.tools.download --subsets dev-clean --dest data --checksum-file https://.../sha256sum.txt
    python -m spkr.tools.download --hf openslr/librispeech_asr --subsets train.100 dev-clean test-clean \
        --save-to-disk data/hf-librispeech
"""

from __future__ import annotations

import argparse
import sys

from spkr.corpus.download import (
    KNOWN_MD5,
    KNOWN_SHA256,
    OPENSLR_BASE_URL,
    DownloadError,
    download_openslr,
    read_checksum_file,
    subset_of_file,
)
from spkr.corpus.librispeech import expand_subsets, load_hf_split
from spkr.run.cli import cli_main


def _parse_assignments(
    values: list[str] | None, flag: str, parser: argparse.ArgumentParser
) -> dict[str, str]:
    """``SUBSET=HEX`` / ``FILE.tar.gz=HEX`` flags -> {subset: hex}; anything else is a usage error."""
    digits = {"--md5": 32, "--sha256": 64}[flag]
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, digest = v.partition("=")
        digest = digest.strip().lower()
        if not sep or not name or len(digest) != digits or any(c not in "0123456789abcdef" for c in digest):
            parser.error(
                f"{flag} expects SUBSET=HEX (or SUBSET.tar.gz=HEX) with {digits} hex digits, got {v!r}"
            )
        try:
            subsets = expand_subsets(subset_of_file(name))
        except ValueError as e:
            parser.error(f"{flag} {v!r}: {e}")
        if len(subsets) != 1:
            parser.error(f"{flag} {v!r}: one checksum per tarball, not for the combined name {name!r}")
        out[subsets[0]] = digest
    return out


def expected_checksums(args, parser: argparse.ArgumentParser) -> tuple[dict[str, str], dict[str, str]]:
    """(md5s, sha256s) to verify: the built-in OpenSLR md5 and torchaudio sha256 sums (unless
    --no-verify), replaced per subset by those given (--checksum-file, --md5, --sha256)."""
    md5s: dict[str, str] = {} if args.no_verify else dict(KNOWN_MD5)
    sha256s: dict[str, str] = {} if args.no_verify else dict(KNOWN_SHA256)
    given_md5: dict[str, str] = {}
    given_sha256: dict[str, str] = {}
    if args.checksum_file:
        for subset, digest in read_checksum_file(args.checksum_file).items():
            (given_sha256 if len(digest) == 64 else given_md5)[subset] = digest
    given_md5.update(_parse_assignments(args.md5, "--md5", parser))
    given_sha256.update(_parse_assignments(args.sha256, "--sha256", parser))
    for subset in set(given_md5) | set(given_sha256):
        md5s.pop(subset, None)
        sha256s.pop(subset, None)
    md5s.update(given_md5)
    sha256s.update(given_sha256)
    return md5s, sha256s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spkr.tools.download", description=__doc__.split("\n")[0])
    p.add_argument(
        "--subsets",
        nargs="+",
        default=["train.100", "dev-clean", "test-clean"],
        help="subsets or combined names (train.100, train.460, train.960); default: %(default)s",
    )
    p.add_argument("--dest", default="data", help="destination directory (gets LibriSpeech/<subset>/)")
    p.add_argument("--base-url", default=OPENSLR_BASE_URL, help="OpenSLR mirror (default: %(default)s)")
    p.add_argument("--md5", action="append", metavar="SUBSET=HEX", help="expected md5 (repeatable)")
    p.add_argument("--sha256", action="append", metavar="SUBSET=HEX", help="expected sha256 (repeatable)")
    p.add_argument(
        "--checksum-file",
        metavar="FILE_OR_URL",
        help="md5sum/sha256sum-style file or http(s) URL, either kind of sum (e.g. "
        "https://www.openslr.org/resources/12/md5sum.txt); sums given here or with --md5/--sha256 "
        "replace the built-in ones of their subsets",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="do not use the built-in md5/sha256 sums (the computed ones are printed)",
    )
    p.add_argument("--keep-archive", action="store_true", help="keep the .tar.gz after extraction")
    p.add_argument("--retries", type=int, default=5)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--hf", metavar="NAME_OR_PATH", help="Hugging Face dataset: load it and report counts")
    p.add_argument("--hf-config", help="HF config (clean/other/all); default: derived from the subset")
    p.add_argument(
        "--save-to-disk", metavar="DIR", help="with --hf: save a local copy (DatasetDict by subset)"
    )
    return p


def _run_hf(args) -> int:
    import datasets

    saved = {}
    for subset in expand_subsets(args.subsets):
        for name, ds in load_hf_split(args.hf, subset, config=args.hf_config):
            speakers = len(set(ds.unique("speaker_id"))) if "speaker_id" in ds.column_names else "?"
            print(f"{name}: {ds.num_rows} utterances, {speakers} speakers")
            saved[name] = ds
    if args.save_to_disk:
        datasets.DatasetDict(saved).save_to_disk(args.save_to_disk)
        print(f"saved to {args.save_to_disk} (read with --hf {args.save_to_disk} / iter_hf_dataset)")
    return 0


def run(args, parser: argparse.ArgumentParser) -> int:
    """The command: a Hugging Face dataset's counts (``--hf``), or download, verify and extract."""
    if args.hf:
        try:
            return _run_hf(args)
        except KeyError as e:  # a split the saved dataset does not have
            raise DownloadError(str(e.args[0])) from e
    if args.save_to_disk:
        raise ValueError("--save-to-disk needs --hf")
    md5s, sha256s = expected_checksums(args, parser)
    dirs = download_openslr(
        args.subsets,
        args.dest,
        base_url=args.base_url,
        md5s=md5s,
        sha256s=sha256s,
        keep_archive=args.keep_archive,
        retries=args.retries,
        progress=not args.no_progress,
    )
    for d in dirs:
        print(d)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Errors: one line ``[download] error: ...`` and exit 2 (:func:`spkr.run.cli.cli_main`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return cli_main("download", run, args, parser)


if __name__ == "__main__":
    sys.exit(main())
