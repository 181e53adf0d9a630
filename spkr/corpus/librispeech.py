"""LibriSpeech: subset names, the OpenSLR directory layout and Hugging Face datasets as sources.

Two sources yield the same :class:`Utterance` records:

* :func:`iter_openslr` walks an extracted OpenSLR tree
  ``<root>/LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac``;
* :func:`iter_hf_dataset` reads a Hugging Face dataset (``save_to_disk`` directory, parquet files or a hub
  name such as ``openslr/librispeech_asr``) without the ``datasets`` audio decoder (which needs torchcodec):
  the encoded bytes are handed over in ``Utterance.audio_bytes`` and decoded later with soundfile.
"""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

SUBSETS: tuple[str, ...] = (
    "train-clean-100",
    "train-clean-360",
    "train-other-500",
    "dev-clean",
    "dev-other",
    "test-clean",
    "test-other",
)
TRAIN_SUBSETS: tuple[str, ...] = ("train-clean-100", "train-clean-360", "train-other-500")

# Combined training names (as used by the original research scripts and ESPnet/Kaldi recipes).
COMBINED: dict[str, tuple[str, ...]] = {
    "train.100": ("train-clean-100",),
    "train.460": ("train-clean-100", "train-clean-360"),
    "train.960": ("train-clean-100", "train-clean-360", "train-other-500"),
}

DEV_SUBSET = "dev-clean"
TEST_SUBSET = "test-clean"
AUDIO_EXTENSIONS: tuple[str, ...] = (".flac", ".wav")

# Hugging Face ``openslr/librispeech_asr``: our subset -> (config, split) in the "clean"/"other" configs,
# and the split name in the "all" config.
HF_CONFIG_SPLIT: dict[str, tuple[str, str]] = {
    "train-clean-100": ("clean", "train.100"),
    "train-clean-360": ("clean", "train.360"),
    "train-other-500": ("other", "train.500"),
    "dev-clean": ("clean", "validation"),
    "dev-other": ("other", "validation"),
    "test-clean": ("clean", "test"),
    "test-other": ("other", "test"),
}
HF_ALL_SPLIT: dict[str, str] = {
    "train-clean-100": "train.clean.100",
    "train-clean-360": "train.clean.360",
    "train-other-500": "train.other.500",
    "dev-clean": "validation.clean",
    "dev-other": "validation.other",
    "test-clean": "test.clean",
    "test-other": "test.other",
}


@dataclass(frozen=True)
class Utterance:
    key: str  # "<speaker>-<chapter>-<utt>" e.g. "19-198-0001" (LibriSpeech utterance id)
    speaker: str  # "19"
    chapter: str  # "198"
    subset: str  # "train-clean-100", "dev-clean", ...
    path: str  # absolute path of the audio file (flac/wav), or "" when audio is given as bytes
    duration: float  # seconds (from soundfile.info; 0.0 if unknown)
    transcript: str | None
    audio_bytes: bytes | None = None  # HF datasets source: the encoded file bytes (decoded with soundfile)


@dataclass(frozen=True)
class SpeakerInfo:
    """One line of LibriSpeech's ``SPEAKERS.TXT``."""

    id: str
    sex: str  # "F" / "M"
    subset: str  # e.g. "train-clean-100"
    minutes: float
    name: str


# --------------------------------------------------------------------------------------------- names


def expand_subsets(names: str | Iterable[str]) -> list[str]:
    """Expand subset names and combined names into a de-duplicated list of LibriSpeech subsets.

    ``"train.960" -> ["train-clean-100", "train-clean-360", "train-other-500"]``. A string may also hold
    several names separated by commas or whitespace. Order is preserved; duplicates are dropped.
    Raises ``ValueError`` naming the unknown name and the valid ones.
    """
    if isinstance(names, str):
        items = names.replace(",", " ").split()
    else:
        items = []
        for n in names:
            items.extend(str(n).replace(",", " ").split())
    if not items:
        raise ValueError("no LibriSpeech subset given")
    out: list[str] = []
    for name in items:
        if name in COMBINED:
            parts: tuple[str, ...] = COMBINED[name]
        elif name in SUBSETS:
            parts = (name,)
        else:
            raise ValueError(
                f"unknown LibriSpeech subset {name!r}; valid subsets: {', '.join(SUBSETS)}; "
                f"combined names: {', '.join(COMBINED)}"
            )
        for p in parts:
            if p not in out:
                out.append(p)
    return out


def training_combination(name: str | Iterable[str]) -> tuple[list[str], str, str]:
    """``(train_subsets, dev_subset, test_subset)`` for a training combination.

    ``training_combination("train.460") -> (["train-clean-100", "train-clean-360"], "dev-clean",
    "test-clean")``. Only training subsets are allowed in ``name`` (dev/test are always dev-clean and
    test-clean, as in the original scripts).
    """
    train = expand_subsets(name)
    bad = [s for s in train if s not in TRAIN_SUBSETS]
    if bad:
        raise ValueError(
            f"{', '.join(bad)} is not a training subset; a training combination is built from "
            f"{', '.join(TRAIN_SUBSETS)} or {', '.join(COMBINED)}"
        )
    return train, DEV_SUBSET, TEST_SUBSET


def numeric_sort_key(value: str) -> tuple:
    """Sort key ordering numeric ids numerically ("2" < "10"), dash-separated ids part-wise
    ("19-198-0001"), and anything else lexicographically after numeric ones."""
    parts = value.split("-")
    if all(p.isdigit() for p in parts):
        return (0, tuple(int(p) for p in parts), value)
    return (1, (), value)


# ------------------------------------------------------------------------------------------ OpenSLR


def read_speakers_txt(path: str | os.PathLike) -> dict[str, SpeakerInfo]:
    """Parse LibriSpeech's ``SPEAKERS.TXT`` (``ID | SEX | SUBSET | MINUTES | NAME``; ``;`` comments).

    Names may themselves contain ``|`` (speaker 60 is ``|CBW|Simon``), so only the first four bars split.
    """
    out: dict[str, SpeakerInfo] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith(";"):
                continue
            fields = [x.strip() for x in line.split("|", 4)]
            if len(fields) != 5:
                raise ValueError(f"{path}:{lineno}: expected 'ID | SEX | SUBSET | MINUTES | NAME': {line!r}")
            sid, sex, subset, minutes, name = fields
            try:
                mins = float(minutes)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: bad MINUTES field {minutes!r}") from None
            out[sid] = SpeakerInfo(id=sid, sex=sex, subset=subset, minutes=mins, name=name)
    return out


def find_speakers_txt(root: str | os.PathLike) -> Path | None:
    """``SPEAKERS.TXT`` under ``root/LibriSpeech`` or ``root``, or None."""
    for cand in (Path(root) / "LibriSpeech" / "SPEAKERS.TXT", Path(root) / "SPEAKERS.TXT"):
        if cand.is_file():
            return cand
    return None


def subset_dir(root: str | os.PathLike, subset: str) -> Path:
    """The directory of ``subset`` under ``root`` (``root/LibriSpeech/<subset>`` or ``root/<subset>``)."""
    root = Path(root)
    candidates = [root / "LibriSpeech" / subset, root / subset]
    for cand in candidates:
        if cand.is_dir():
            return cand
    raise FileNotFoundError(
        f"LibriSpeech subset {subset!r} not found: looked for {candidates[0]} and {candidates[1]} "
        f"(download it with: python -m spkr.tools.download --subsets {subset} --dest {root})"
    )


def _read_transcripts(chapter_dir: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for tpath in sorted(chapter_dir.glob("*.trans.txt")):
        with open(tpath, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                key, _, text = line.partition(" ")
                out[key] = text.strip()
    return out


def _sorted_dirs(parent: Path) -> list[Path]:
    dirs = [p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(dirs, key=lambda p: numeric_sort_key(p.name))


def iter_openslr(
    root: str | os.PathLike, subsets: str | Iterable[str], *, with_duration: bool = True
) -> Iterator[Utterance]:
    """Yield the utterances of ``subsets`` (names or combined names) from an OpenSLR-layout tree.

    Layout: ``<root>/LibriSpeech/<subset>/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac`` (or ``<root>/<subset>``)
    with ``<spk>-<chapter>.trans.txt`` per chapter; ``.wav`` files are accepted too. Order is deterministic:
    subsets in the given order, then speakers, chapters and utterances sorted numerically. ``duration``
    comes from ``soundfile.info`` (0.0 when ``with_duration=False``). A file without a transcript line is
    yielded with ``transcript=None``. A missing subset directory raises ``FileNotFoundError`` naming it
    (checked for all subsets before anything is yielded).
    """
    names = expand_subsets(subsets)
    dirs = [(s, subset_dir(root, s)) for s in names]
    for subset, sdir in dirs:
        for spk_dir in _sorted_dirs(sdir):
            for ch_dir in _sorted_dirs(spk_dir):
                transcripts = _read_transcripts(ch_dir)
                files = [
                    p
                    for p in ch_dir.iterdir()
                    if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS and not p.name.startswith(".")
                ]
                for p in sorted(files, key=lambda p: numeric_sort_key(p.stem)):
                    path = p.resolve()
                    duration = float(sf.info(str(path)).duration) if with_duration else 0.0
                    yield Utterance(
                        key=p.stem,
                        speaker=spk_dir.name,
                        chapter=ch_dir.name,
                        subset=subset,
                        path=str(path),
                        duration=duration,
                        transcript=transcripts.get(p.stem),
                    )


# ------------------------------------------------------------------------------------- Hugging Face


@dataclass(frozen=True)
class _HFSplit:
    subset: str  # the value of Utterance.subset
    config: str | None  # hub config
    split: str  # hub split name
    candidates: tuple[str, ...]  # names to look for in a DatasetDict / parquet directory


def _resolve_hf_splits(split: str, config: str | None) -> list[_HFSplit]:
    """Map our subset names (and combined names) to the hub's config/split names.

    Anything that is not one of our names is passed through as a hub split name (``"validation"``,
    ``"train.clean.100"`` ...); ``Utterance.subset`` is then our name when the mapping is known.
    """
    try:
        ours = expand_subsets(split)
    except ValueError:
        ours = None
    if ours is None:
        subset = split
        for s, (cfg, sp) in HF_CONFIG_SPLIT.items():
            if (sp == split and cfg == config) or HF_ALL_SPLIT[s] == split:
                subset = s
        return [_HFSplit(subset, config, split, (split, subset))]
    out = []
    for s in ours:
        cfg, sp = HF_CONFIG_SPLIT[s]
        if config == "all":
            cfg, sp = "all", HF_ALL_SPLIT[s]
        elif config is not None and config != cfg:
            raise ValueError(
                f"subset {s} is in the {cfg!r} (or 'all') config of openslr/librispeech_asr, not {config!r}"
            )
        out.append(_HFSplit(s, cfg, sp, (s, sp, HF_ALL_SPLIT[s], f"{cfg}/{sp}")))
    return out


def _parquet_files(path: Path, hs: _HFSplit) -> list[str]:
    """Parquet files for one split: a file, a glob, or a directory (per-split sub-directories
    ``<dir>/<config>/<split>/``, ``<dir>/<split>/``, hub-style ``<dir>/data/<split>-*.parquet``, else all
    ``*.parquet`` directly in ``<dir>``)."""
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        return sorted(glob.glob(str(path)))
    for cand in hs.candidates:
        for pattern in (f"{cand}/*.parquet", f"{cand}/**/*.parquet", f"data/{cand}-*.parquet"):
            files = sorted(glob.glob(str(path / pattern), recursive=True))
            if files:
                return files
    return sorted(glob.glob(str(path / "*.parquet")))


def _is_parquet_source(path_or_name: str) -> bool:
    p = Path(path_or_name)
    if p.is_file() and p.suffix == ".parquet":
        return True
    if "*" in path_or_name and path_or_name.endswith(".parquet"):
        return True
    return p.is_dir() and any(p.rglob("*.parquet"))


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any(
        (path / n).is_file() for n in ("dataset_dict.json", "state.json", "dataset_info.json")
    )


def load_hf_split(
    path_or_name: str,
    split: str,
    *,
    config: str | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
):
    """Load one split as ``[(subset, dataset), ...]`` with the audio column cast to ``Audio(decode=False)``.

    ``split`` is one of our names (``train-clean-100``, ``train.960``, ``dev-clean`` ...; a combined name
    gives several entries) or a native split name of the dataset.
    """
    import datasets
    from datasets import Audio

    splits = _resolve_hf_splits(split, config)
    path = Path(path_or_name)
    out = []
    if _is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            for hs in splits:
                key = next((c for c in hs.candidates if c in loaded), None)
                if key is None:
                    raise KeyError(
                        f"split {hs.subset!r} not in {path} (looked for {', '.join(hs.candidates)}; "
                        f"it has {', '.join(loaded.keys())})"
                    )
                out.append((hs.subset, loaded[key]))
        else:  # a single saved Dataset is the requested split
            out.append((splits[0].subset if len(splits) == 1 else split, loaded))
    elif _is_parquet_source(path_or_name):
        for hs in splits:
            files = _parquet_files(path, hs)
            if not files:
                raise FileNotFoundError(f"no parquet files for split {hs.subset!r} under {path_or_name}")
            ds = datasets.load_dataset(
                "parquet", data_files=files, split="train", streaming=streaming, cache_dir=cache_dir
            )
            out.append((hs.subset, ds))
    elif path.exists():
        raise ValueError(
            f"{path} is neither a dataset saved with save_to_disk nor parquet files"
            " (expected dataset_dict.json/state.json or *.parquet)"
        )
    else:  # hub name
        for hs in splits:
            ds = datasets.load_dataset(
                path_or_name, hs.config, split=hs.split, streaming=streaming, cache_dir=cache_dir
            )
            out.append((hs.subset, ds))
    result = []
    for subset, ds in out:
        cols = ds.column_names if ds.column_names is not None else list(ds.features or {})
        if cols and "audio" not in cols:  # (a streaming dataset may not know its columns yet)
            raise ValueError(f"{path_or_name} split {subset!r} has no 'audio' column (columns: {cols})")
        result.append((subset, ds.cast_column("audio", Audio(decode=False))))
    return result


def _row_to_utterance(row: dict, subset: str, with_duration: bool) -> Utterance:
    audio = row["audio"] or {}
    data = audio.get("bytes")
    orig = audio.get("path") or row.get("file") or ""
    path = ""
    if data is None:
        # No embedded bytes (e.g. a dataset pointing at local files): fall back to the file itself.
        if orig and os.path.isfile(orig):
            path = os.path.abspath(orig)
        else:
            raise ValueError(f"utterance {row.get('id')!r}: no audio bytes and no readable file {orig!r}")
    else:
        data = bytes(data)
        path = orig
    key = row.get("id") or Path(orig).stem
    duration = 0.0
    if with_duration:
        try:
            duration = float(sf.info(io.BytesIO(data) if data is not None else path).duration)
        except Exception:  # undecodable audio: the shard tool reports it when it decodes
            duration = 0.0
    return Utterance(
        key=str(key),
        speaker=str(row["speaker_id"]),
        chapter=str(row["chapter_id"]),
        subset=subset,
        path=path,
        duration=duration,
        transcript=row.get("text"),
        audio_bytes=data,
    )


def iter_hf_dataset(
    path_or_name: str,
    split: str,
    *,
    streaming: bool = False,
    config: str | None = None,
    cache_dir: str | None = None,
    with_duration: bool = True,
) -> Iterator[Utterance]:
    """Yield :class:`Utterance` records from a Hugging Face LibriSpeech-style dataset.

    ``path_or_name``: a directory written by ``save_to_disk`` (a ``DatasetDict`` keyed by our subset names
    or the hub's split names, or a single ``Dataset``), parquet file(s)/glob/directory, or a hub name such
    as ``openslr/librispeech_asr``. ``split``: our subset/combined name (mapped to the hub's
    ``config``/split: ``train-clean-100`` -> ``clean``/``train.100``, ``dev-clean`` -> ``clean``/``validation``,
    ``train-other-500`` -> ``other``/``train.500``; with ``config="all"`` -> ``train.clean.100`` ...) or a
    native split name.

    Columns used: ``audio`` (cast to ``Audio(decode=False)``), ``speaker_id``, ``chapter_id``, ``id``,
    ``text``. The encoded audio is in ``audio_bytes`` (decode with soundfile); ``path`` then holds the
    dataset's original file name (informational, usually not a readable file) -- always prefer
    ``audio_bytes`` when it is not None.
    """
    for subset, ds in load_hf_split(
        path_or_name, split, config=config, streaming=streaming, cache_dir=cache_dir
    ):
        for row in ds:
            yield _row_to_utterance(row, subset, with_duration)
