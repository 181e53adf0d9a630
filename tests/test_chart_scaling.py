"""tools/chart_scaling.py: pooling bench_quality rows into curves (means over seeds, one measurement once)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("chart_scaling", REPO / "tools" / "chart_scaling.py")
cs = importlib.util.module_from_spec(spec)
sys.modules["chart_scaling"] = cs
spec.loader.exec_module(cs)


def _row(n, protocol, model, seed, **figures):
    return {"corpus": "pop", "train_speakers": n, "protocol": protocol, "model": model, "seed": seed,
            "augment_copies": 0, "dataset_id": f"d{n}{protocol}", "src": "s", **figures}  # fmt: skip


def test_curves_average_seeds_per_size_and_write_a_chart(tmp_path):
    a = [_row(50, "open", "tiny", 0, eer=0.2), _row(50, "open", "tiny", 1, eer=0.4),
         _row(100, "open", "tiny", 0, eer=0.1), _row(50, "open", "baseline", None, eer=0.3),
         _row(50, "closed-session", "tiny", 0, acc=0.5),
         {**_row(50, "open", "tiny", "mean", eer=0.3), "seeds": [0, 1]},  # recomputed, not read
         {**_row(None, "open", "tiny", 0, eer=0.9)}]  # not a scaling row  # fmt: skip
    b = [_row(100, "open", "tiny", 0, eer=0.1)]  # the same measurement in a second file: pooled once
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    rows = cs.load_rows([tmp_path / "a.json", tmp_path / "b.json"])
    assert len(rows) == 5
    got = cs.curves(rows, "open", "eer")
    assert [(n, round(m, 6), lo, hi, k) for n, m, lo, hi, k in got["tiny"]] == [
        (50, 30.0, 20.0, 40.0, 2),
        (100, 10.0, 10.0, 10.0, 1),
    ]
    assert cs.curves(rows, "closed-session", "acc") == {"tiny": [(50, 50.0, 50.0, 50.0, 1)]}
    assert (
        cs.main([str(tmp_path / "a.json"), "--out", str(tmp_path / "c.png"), "--md", str(tmp_path / "t.md")])
        == 0
    )
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert "| 50 | tiny | 30.00 % (20.00-40.00, 2 seeds) | 50.00 % |" in (tmp_path / "t.md").read_text()


def test_one_measurement_with_two_results_is_an_error(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([_row(50, "open", "tiny", 0, eer=0.2)]))
    (tmp_path / "b.json").write_text(json.dumps([_row(50, "open", "tiny", 0, eer=0.25)]))
    with pytest.raises(SystemExit, match="measured twice with different results"):
        cs.load_rows([tmp_path / "a.json", tmp_path / "b.json"])
    # the same figures on the same data from another source (a reproduction): pooled once, the first kept
    (tmp_path / "c.json").write_text(json.dumps([{**_row(50, "open", "tiny", 0, eer=0.2), "src": "t"}]))
    assert [r["src"] for r in cs.load_rows([tmp_path / "a.json", tmp_path / "c.json"])] == ["s"]
    (tmp_path / "d.json").write_text(
        json.dumps([{**_row(50, "open", "tiny", 0, eer=0.2), "dataset_id": "x"}])
    )
    with pytest.raises(SystemExit, match="measured twice with different results"):
        cs.load_rows([tmp_path / "a.json", tmp_path / "d.json"])  # other data: not the same measurement


def test_labels_name_a_model_and_its_last_epoch_rows(tmp_path):
    rows = [_row(50, "open", "tiny@noise=0.5", 0, eer=0.2), _row(50, "open", "tiny@noise=0.5[last]", 0, eer=0.3),
            _row(50, "open", "baseline", None, eer=0.4)]  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps(rows))
    md = tmp_path / "t.md"
    argv = [str(tmp_path / "a.json"), "--out", str(tmp_path / "c.png"), "--md", str(md)]
    assert cs.main([*argv, "--label", "tiny@noise=0.5=tiny + noise"]) == 0
    text = md.read_text()
    assert "| 50 | tiny + noise | 20.00 % |  |" in text
    assert "| 50 | tiny + noise (last epoch) | 30.00 % |  |" in text
    assert "| 50 | baseline | 40.00 % |  |" in text
    assert cs.main([*argv, "--no-last"]) == 0
    assert "last epoch" not in md.read_text() and "| 50 | tiny@noise=0.5 | 20.00 % |  |" in md.read_text()
    with pytest.raises(SystemExit, match="is not MODEL=NAME"):
        cs.main([*argv, "--label", "tiny"])
