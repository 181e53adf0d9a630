"""tools/bench_quality.py: the configs it trains and when it reuses a step (the runs themselves are
minutes each: measured by hand, see README "Model quality")."""

from __future__ import annotations

import importlib.util
import json
import sys
import tomllib
from pathlib import Path

from spkr.models import ModelConfig

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


def test_a_step_is_reused_only_for_an_identical_spec(tmp_path):
    out, log = tmp_path / "step", tmp_path / "log"
    marker = tmp_path / "ran"
    cmd = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"]
    spec = {"cmd": cmd, "src": "abc"}
    assert bq.run_step(out, spec, cmd, log) is not None and marker.read_text() == "x"
    assert bq.run_step(out, spec, cmd, log) is None and marker.read_text() == "x"  # reused
    assert bq.run_step(out, {**spec, "src": "abd"}, cmd, log) is not None  # other sources: run again
    assert marker.read_text() == "xx" and json.loads((out / "spec.json").read_text())["src"] == "abd"
