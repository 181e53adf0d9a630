"""tools/bench_quality.py: the configs it trains and when it reuses a step (the runs themselves are
minutes each: measured by hand, see README "Model quality")."""

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
