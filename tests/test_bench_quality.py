"""tools/bench_quality.py: the configs it trains and when it reuses a step (the runs themselves are
minutes each: measured by hand, see docs/results.md)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest

from spkr.models import ModelConfig
from spkr.run.configs import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "tools" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module
    spec.loader.exec_module(module)
    return module


bq = _load_tool()


def test_model_spec_overrides_only_the_named_model_keys():
    base = tomllib.loads((REPO / "spkr" / "configs" / "tiny.toml").read_text())
    got = tomllib.loads(bq.model_config("tiny@input_norm=utterance@aam_margin=0.3", "aam"))
    assert got["train"] == base["train"]
    want = {**base["model"], "head": "aam", "input_norm": "utterance", "aam_margin": 0.3}
    assert got["model"] == want
    ModelConfig(**got["model"])  # a valid model config
    tt = tomllib.loads(bq.model_config("tiny-transformer", "softmax"))
    assert tt["model"]["arch"] == "transformer" and tt["train"] == base["train"]
    eq = tomllib.loads(bq.model_config("tiny@eq_db=6@input_norm=utterance", "aam"))  # each key to its table
    assert eq["train"] == {**base["train"], "eq_db": 6} and eq["model"]["input_norm"] == "utterance"
    TrainConfig(**eq["train"])
    for bad in ("tiny@thunder=3", "tiny@eq_db"):
        with pytest.raises(SystemExit, match="is not key=value of"):
            bq.model_config(bad, "aam")


def test_seed_runs_keep_their_own_directories_and_are_averaged():
    assert [bq.run_name("tiny", s) for s in (0, 1)] == ["tiny", "tiny-seed1"]
    cell = ("open", ("speed", 8))
    figs = [{"eer": 0.02, "eer_as_norm": 0.01}, {"eer": 0.04, "eer_as_norm": 0.03}]
    rows = [bq.row("b", *cell, "baseline", {"eer": 0.05}, "d", "s", None)]
    rows += [bq.row("b", *cell, "tiny", f, "d", "s", 9.0, seed) for seed, f in enumerate(figs)]
    rows.append(bq.row("b", "open", ("mixed", 8), "tiny", {"eer": 0.5}, "d", "s", 9.0, 0))  # another cell
    (mean,) = bq.seed_means(rows, "b", *cell)
    assert mean["seed"] == "mean" and mean["seeds"] == [0, 1] and mean["model"] == "tiny"
    assert mean["eer"] == pytest.approx(0.03) and mean["eer_range"] == [0.02, 0.04]
    assert mean["eer_as_norm"] == pytest.approx(0.02) and "acc" not in mean


def test_a_step_is_reused_only_for_an_identical_spec(tmp_path):
    out, log = tmp_path / "step", tmp_path / "log"
    marker = tmp_path / "ran"
    cmd = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"]
    spec = {"cmd": cmd, "src": "abc"}
    assert bq.run_step(out, spec, cmd, log) is not None and marker.read_text() == "x"
    assert bq.run_step(out, spec, cmd, log) is None and marker.read_text() == "x"  # reused
    assert bq.run_step(out, {**spec, "src": "abd"}, cmd, log) is not None  # other sources: run again
    assert marker.read_text() == "xx" and json.loads((out / "spec.json").read_text())["src"] == "abd"


def test_augment_entries_name_their_recipe_and_cell():
    assert bq.parse_augment("0,3,speed:6") == [("mixed", 0), ("mixed", 3), ("speed", 6)]
    assert [bq.cell_name("open", r, k) for r, k in bq.parse_augment("0,3,speed:6,speed:0")] == [
        "open-aug0", "open-aug3", "open-speed6", "open-aug0"
    ]  # fmt: skip
    for bad in ("speed", "thunder:3", "speed:x"):
        with pytest.raises(SystemExit, match=re.escape(repr(bad))):
            bq.parse_augment(bad)
    speeds = bq.RECIPES["speed"][bq.RECIPES["speed"].index("--augment-speeds") + 1]
    assert len(speeds.split(",")) == 18 and "1" not in speeds.split(",") and speeds.startswith("0.6,0.65,")


def _tree(root: Path, subsets: dict[str, list[int]]) -> Path:
    lines = [";ID  |SEX| SUBSET           |MINUTES| NAME"]
    for sub, ids in subsets.items():
        for sid in ids:
            (root / "LibriSpeech" / sub / str(sid) / "1").mkdir(parents=True)
            lines.append(f"{sid} | F | {sub:<16} |  1.00 | v{sid}")
    (root / "LibriSpeech" / "SPEAKERS.TXT").write_text("\n".join(lines) + "\n")
    return root


def _placed(view: Path) -> dict[str, list[str]]:
    tree = view / "LibriSpeech"
    return {sub: sorted(p.name for p in (tree / sub).iterdir()) for sub in bq.SUBSETS}


def test_corpus_view_cuts_the_first_training_speakers_by_id(tmp_path):
    corpus = _tree(tmp_path / "c", {"train-clean-100": [9, 10, 100, 11, 12, 13, 14], "dev-clean": [20],
                                    "test-clean": [30, 31]})  # fmt: skip
    view = bq.corpus_view(corpus, tmp_path / "v", 3, "open")
    assert _placed(view) == {
        "train-clean-100": ["10", "11", "9"],
        "dev-clean": ["20"],
        "test-clean": ["30", "31"],
    }
    assert (view / "LibriSpeech" / "train-clean-100" / "9" / "1").is_dir()  # a link to the speaker's tree
    speakers = (view / "LibriSpeech" / "SPEAKERS.TXT").read_text()
    assert "\n100 " not in speakers and "\n9 | F | train-clean-100" in speakers
    view = bq.corpus_view(corpus, tmp_path / "v", 5, "open")  # rebuilt for another N: nested
    assert _placed(view)["train-clean-100"] == ["10", "11", "12", "13", "9"]
    closed = bq.corpus_view(corpus, tmp_path / "w", 6, "closed-session")  # the N speakers alone
    assert _placed(closed) == {
        "train-clean-100": ["10", "12", "13", "14"],
        "dev-clean": ["9"],
        "test-clean": ["11"],
    }
    assert "\n11 | F | test-clean" in (closed / "LibriSpeech" / "SPEAKERS.TXT").read_text()
    with pytest.raises(SystemExit, match="has 7 speakers"):
        bq.corpus_view(corpus, tmp_path / "x", 8, "open")


def test_scaling_rows_average_within_their_population_size():
    cell = ("open", ("mixed", 0))
    rows = [bq.row("p", *cell, "tiny", {"eer": e}, "d", "s", 1.0, seed, n)
            for n, seed, e in ((50, 0, 0.2), (50, 1, 0.4), (100, 0, 0.1), (100, 1, 0.3))]  # fmt: skip
    means = bq.seed_means(rows, "p", *cell, 50) + bq.seed_means(rows, "p", *cell, 100)
    assert [(m["train_speakers"], round(m["eer"], 6)) for m in means] == [(50, 0.3), (100, 0.2)]


def test_a_run_with_best_pt_is_evaluated_on_it_and_on_last_pt(tmp_path, monkeypatch):
    """``@select=valid`` runs write best.pt: the row's figures are best.pt's (the weights the run's own
    test measured), and a ``[last]`` row has last.pt's; a run without best.pt is evaluated on last.pt.
    Each evaluation is its own reusable step (its spec names the checkpoint)."""
    steps = []

    def fake_step(out, spec, cmd, log, env=None):  # records the command; writes what evaluate would
        steps.append((out.name, cmd[cmd.index("--checkpoint") + 1], spec["cmd"] == cmd[1:]))
        Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps({"kind": "verification", "verification": {
            "eer": 0.1 if Path(cmd[cmd.index("--checkpoint") + 1]).name == "best.pt" else 0.2, "min_dcf_0.01": 0.5, "trials": 8}}))  # fmt: skip

    monkeypatch.setattr(bq, "run_step", fake_step)
    run = tmp_path / "run"
    run.mkdir()
    shards, spec = tmp_path / "shards", {"cmd": ["train"]}
    first = bq.evaluate_run(run, run / "eval-test.json", shards, "open", spec, tmp_path / "a.log", {})
    assert first["checkpoint"] == "last.pt" and first["eer"] == 0.2
    (run / "best.pt").write_bytes(b"")
    best = bq.evaluate_run(run, run / "eval-test.json", shards, "open", spec, tmp_path / "b.log", {})
    last = bq.evaluate_run(
        run, run / "eval-last.json", shards, "open", spec, tmp_path / "c.log", {}, last=True
    )
    assert (best["checkpoint"], best["eer"]) == ("best.pt", 0.1)
    assert (last["checkpoint"], last["eer"]) == ("last.pt", 0.2)
    assert steps == [
        ("eval-step", str(run / "last.pt"), True),
        ("eval-step", str(run / "best.pt"), True),
        ("eval-last-step", str(run / "last.pt"), True),
    ]
