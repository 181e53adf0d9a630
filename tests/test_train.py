"""spkr.train units: the schedule, config loading, checkpoints (weights_only, tampering refused),
bad-input errors, resume checks against other shards."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from spkr import checkpoint as ck
from spkr.config import ConfigError
from spkr.features import FeatureConfig, mel_centres
from spkr.run.configs import TrainConfig, load_configs
from spkr.run.mel_augment import eq_augment, noise_augment, spec_augment
from spkr.run.trainer import lr_factor
from spkr.train import main, parse_args

REPO = Path(__file__).resolve().parents[1]


def fails(argv: list[str], pattern: str, capsys) -> None:
    """``spkr.train`` refuses ``argv`` the CLI way: exit status 2, one ``[train] error:`` line matching
    ``pattern`` on stderr, no traceback."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("[train] error: "))
    assert re.search(pattern, line) and "Traceback" not in err, err


# --------------------------------------------------------------------------- schedule


def test_lr_schedule_warmup_then_cosine():
    total, warm, floor = 110, 10, 0.1
    f = [lr_factor(s, total, warm, floor) for s in range(total + 5)]
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0)  # cosine starts at the peak
    assert f[60] == pytest.approx(floor + (1 - floor) * 0.5)  # half way: cos(pi/2) = 0
    assert f[110] == pytest.approx(floor) and f[114] == pytest.approx(floor)  # clamped at the floor
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay
    assert lr_factor(0, 50, 0, 0.0) == pytest.approx(1.0)
    assert lr_factor(25, 50, 0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_lr_schedule_drives_adamw_through_lambdalr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 20, 4, 0.0))
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0])


def test_spec_augment_masks_within_lengths_only():
    mel = torch.ones(4, 60, 80)
    lengths = torch.tensor([60, 40, 20, 5])
    assert spec_augment(mel, lengths, TrainConfig()) is mel  # off by default
    torch.manual_seed(0)
    cfg = TrainConfig(freq_masks=2, freq_mask_width=10, time_masks=2, time_mask_width=20)
    out = spec_augment(mel, lengths, cfg)
    assert out.shape == mel.shape and set(out.unique().tolist()) <= {0.0, 1.0}
    masked = out == 0
    # a frequency mask spans whole rows of bins; at most 2 x 10 bins are masked in every frame
    full_bins = masked.all(dim=1).sum(dim=1)
    assert (full_bins <= 20).all()
    # time masks never exceed a fifth of the utterance each and never touch padding positions' meaning
    full_frames = masked.all(dim=2).sum(dim=1)
    assert (full_frames <= 2 * (lengths // 5) + (60 - lengths)).all()


def _eq_batch(B=6, T=50, n_freq=80):
    torch.manual_seed(1)
    mel = 0.5 * torch.randn(B, T, n_freq)
    lengths = torch.tensor([50, 40, 30, 20, 10, 1])
    stats = {
        "mean": torch.linspace(-30.0, -60.0, n_freq).tolist(),
        "std": torch.linspace(5.0, 15.0, n_freq).tolist(),
    }
    return mel, lengths, stats


def _in_db(mel, stats):
    return mel * torch.tensor(stats["std"]) + torch.tensor(stats["mean"])


def test_eq_augment_adds_one_smooth_curve_in_db_per_utterance_within_lengths():
    mel, lengths, stats = _eq_batch()
    features = FeatureConfig()
    assert eq_augment(mel, lengths, TrainConfig(), stats, features) is mel  # off by default
    torch.manual_seed(0)
    out = eq_augment(mel, lengths, TrainConfig(eq_db=6.0), stats, features)
    offset = _in_db(out, stats) - _in_db(mel, stats)  # dB
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(out[b, n:], mel[b, n:])  # padding untouched
        rows = offset[b, :n]
        assert torch.allclose(rows, rows[0].expand_as(rows), atol=1e-4)  # one curve for the utterance
        curve = rows[0]
        assert 0.1 < curve.abs().max() <= 6.0 * (1 + 3) + 1e-3  # tilt + 3 bumps, each <= eq_db
        assert curve.diff().abs().max() < 6.0  # smooth: no bin-to-bin jump of a whole gain
    assert not torch.allclose(offset[0, 0], offset[1, 0])  # a different curve per utterance
    torch.manual_seed(0)
    assert torch.equal(eq_augment(mel, lengths, TrainConfig(eq_db=6.0), stats, features), out)  # torch RNG


def test_noise_augment_adds_noise_at_the_drawn_snr_in_the_power_spectrum():
    mel, lengths, stats = _eq_batch()
    features = FeatureConfig()
    assert noise_augment(mel, lengths, TrainConfig(), stats, features) is mel  # off by default
    before = _in_db(mel, stats)

    def power(db: torch.Tensor) -> torch.Tensor:  # summed over bins, mean over frames
        return torch.pow(10.0, db / 10).sum(dim=1).mean()

    for snr in (0.0, 10.0, 25.0):
        torch.manual_seed(0)
        cfg = TrainConfig(noise=1.0, noise_snr_min_db=snr, noise_snr_max_db=snr)
        out = noise_augment(mel, lengths, cfg, stats, features)
        after = _in_db(out, stats)
        for b, n in enumerate(lengths.tolist()):
            assert torch.equal(out[b, n:], mel[b, n:])  # padding untouched
            assert (after[b, :n] >= before[b, :n] - 1e-3).all()  # noise only adds power
            speech, added = power(before[b, :n]), power(after[b, :n]) - power(before[b, :n])
            assert abs(10 * torch.log10(speech / added).item() - snr) < 0.05  # the drawn SNR, realised
        assert not torch.allclose(after[0, 0] - before[0, 0], after[1, 0] - before[1, 0])  # its own noise
    torch.manual_seed(0)
    half = noise_augment(mel, lengths, TrainConfig(noise=0.5), stats, features)
    changed = [not torch.equal(half[b], mel[b]) for b in range(len(lengths))]
    assert any(changed) and not all(changed)  # a share of the utterances
    torch.manual_seed(0)
    assert torch.equal(
        noise_augment(mel, lengths, TrainConfig(noise=0.5), stats, features), half
    )  # torch RNG
    with pytest.raises(ValueError, match="noise"):
        TrainConfig(noise=1.5)
    with pytest.raises(ValueError, match="noise SNRs"):
        TrainConfig(noise_snr_min_db=20.0, noise_snr_max_db=10.0)


def test_eq_augment_band_limits_attenuate_the_band_edges_down_to_the_floor():
    mel, lengths, stats = _eq_batch()
    features = FeatureConfig()  # 80 mels, 20-7600 Hz, top_db 80
    hz = mel_centres(features)
    assert hz.shape == (80,) and 20 < hz[0] < hz[-1] < 7600
    torch.manual_seed(0)
    cfg = TrainConfig(eq_lowpass_hz=500.0, eq_highpass_hz=300.0)
    out = eq_augment(mel, lengths, cfg, stats, features)
    before, after = _in_db(mel, stats), _in_db(out, stats)
    for b, n in enumerate(lengths.tolist()):
        drop = (before[b, :n] - after[b, :n]).min(dim=0).values  # least attenuation per bin, dB
        assert (drop >= -1e-3).all()  # a filter only removes energy
        assert drop[-1] > 3.0 and drop[0] > 3.0  # both edges lie beyond their cutoffs (<= f_max, >= f_min)
        peak = before[b, :n].max()
        assert after[b, :n].min() >= peak - features.top_db - 1e-3  # floored like the features
        mid = int((hz - 400).abs().argmin())  # inside [highpass <= 300, lowpass >= 500] for every draw
        assert drop[mid] < 6.1  # two 4th-order edges: at most 3 dB each at the band's edges
        assert torch.equal(out[b, n:], mel[b, n:])
    with pytest.raises(ValueError, match="eq_lowpass_hz"):
        TrainConfig(eq_lowpass_hz=-1.0)
    with pytest.raises(ValueError, match="eq_db"):
        TrainConfig(eq_db=-1.0)


# --------------------------------------------------------------------------- config


def write_cfg(tmp_path, train: str, model: str = "") -> Path:
    text = (REPO / "configs" / "tiny.toml").read_text()
    head = text.split("[train]")[0]
    p = tmp_path / "cfg.toml"
    p.write_text(head + model + "\n[train]\n" + train)
    return p


def test_config_file_and_cli_overrides(tmp_path):
    cfg = write_cfg(tmp_path, "epochs = 3\nlr = 0.01\ncompile = false\n")
    args = parse_args(["--shards", "x", "--out", "y", "--config", str(cfg), "--lr", "0.5", "--compile"])
    _, t = load_configs(args)
    assert (t.epochs, t.lr, t.compile) == (3, 0.5, True)
    args = parse_args(
        ["--shards", "x", "--out", "y", "--config", str(cfg), "--dtype", "fp32", "--no-compile"]
    )
    _, t = load_configs(args)
    assert (t.dtype, t.compile) == ("fp32", False)


def test_unknown_train_key_is_a_config_error(tmp_path, capsys):
    cfg = write_cfg(tmp_path, "epochs = 3\nlearning_rate = 0.01\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_configs(parse_args(["--shards", "x", "--out", "y", "--config", str(cfg)]))
    fails(
        ["--shards", str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(cfg)],
        "unknown key.*learning_rate",
        capsys,
    )


def test_bad_values_are_config_errors(tmp_path):
    from spkr.config import from_dict

    with pytest.raises(ConfigError, match="dtype"):
        from_dict(TrainConfig, {"dtype": "int8"}, "t")
    with pytest.raises(ConfigError, match="batch_size"):
        from_dict(TrainConfig, {"batch_size": 0}, "t")
    with pytest.raises(ConfigError, match="epochs"):
        from_dict(TrainConfig, {"epochs": "ten"}, "t")


def test_repo_configs_train_tables_load():
    for path in sorted((REPO / "configs").glob("*.toml")):
        load_configs(parse_args(["--shards", "x", "--out", "y", "--config", str(path)]))


# --------------------------------------------------------------------------- bad input


def test_missing_and_empty_shards_dir(tmp_path, capsys):
    cfg = str(REPO / "configs" / "tiny.toml")
    fails(
        ["--shards", str(tmp_path / "nope"), "--out", str(tmp_path / "run"), "--config", cfg],
        "not found",
        capsys,
    )
    (tmp_path / "empty").mkdir()
    fails(
        ["--shards", str(tmp_path / "empty"), "--out", str(tmp_path / "run"), "--config", cfg],
        "empty",
        capsys,
    )
    (tmp_path / "nomanifest" / "train").mkdir(parents=True)
    fails(
        ["--shards", str(tmp_path / "nomanifest"), "--out", str(tmp_path / "run"), "--config", cfg],
        "manifest",
        capsys,
    )


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    fails(
        ["--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "run"), "--resume"],
        "no checkpoint",
        capsys,
    )


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_roundtrip_weights_only(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    state = ck.rng_state()
    expect = (torch.rand(3), np.random.rand(3), random.random())
    obj = {
        "format": ck.FORMAT,
        "version": ck.VERSION,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": [state],
        "loader": [ck.to_plain({"epoch": np.int64(2), "batches": 3, "arr": np.arange(3)})],
        "labels": ["19", "26"],
        "feature_config": {"n_mels": 80},
        "step": 7,
    }
    path = tmp_path / "ckpt.pt"
    ck.save_atomic(obj, path, tmp_path / "copy.pt")
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left
    back = ck.load(path)
    torch.load(tmp_path / "copy.pt", weights_only=True)
    assert torch.equal(back["model"]["weight"], model.state_dict()["weight"])
    assert back["optimizer"]["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert back["loader"][0] == {"epoch": 2, "batches": 3, "arr": [0, 1, 2]}
    torch.rand(5), np.random.rand(5), random.random()  # move every generator on
    ck.set_rng_state(back["rng"][0])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1]) and got[2] == expect[2]


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_tampered_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": ck.FORMAT, "version": ck.VERSION, "model": {}, "x": _Evil(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(ck.CheckpointError, match="refusing to load"):
        ck.load(path)
    assert not marker.exists()
    # the CLIs refuse it too, cleanly
    from spkr.evaluate import main as eval_main
    from spkr.predict import main as predict_main

    assert eval_main(["--checkpoint", str(path), "--shards", str(tmp_path)]) == 2
    assert predict_main(["x.flac", "--checkpoint", str(path)]) == 2
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(ck.CheckpointError, match="cannot read|refusing"):
        ck.load(tmp_path / "junk.pt")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ck.CheckpointError, match="not an spkr checkpoint"):
        ck.load(tmp_path / "other.pt")
    with pytest.raises(ck.CheckpointError, match="not found"):
        ck.load(tmp_path / "missing.pt")


# --------------------------------------------------------------------------- resume checks (reuse the e2e run)


def _altered_shards(src: Path, dst: Path, edit) -> Path:
    """A copy of the shards whose manifest is edited, then made coherent again (fingerprint and
    dataset_id recomputed), as a shard set made that way would be."""
    from spkr.features import FeatureConfig
    from spkr.shards.format import Manifest, dataset_id
    from spkr.shards.writer import write_manifest

    shutil.copytree(src, dst)
    m = json.loads(Manifest.load(str(dst)).to_json())  # per-sample lists inline, to edit
    edit(m)
    m["feature_fingerprint"] = FeatureConfig.from_dict(m["feature_config"]).fingerprint()
    keys = {name: [k for s in sd["shards"] for k in s["keys"]] for name, sd in m["splits"].items()}
    m["dataset_id"] = dataset_id(m["feature_fingerprint"], m["feature_backend"], m["labels"], keys)
    write_manifest(str(dst), m)  # index files + manifest.json, as the shard tool writes them
    return dst


@pytest.mark.slow
def test_resume_refuses_other_labels_or_features(tmp_path, tmp_path_factory, capsys):
    from tests.runkit import demo_shards, killed_run

    base = tmp_path_factory.getbasetemp()
    info = killed_run(base)
    shards = demo_shards(base)
    cfg = str(REPO / "configs" / "tiny.toml")

    def swap_labels(m):
        m["labels"][0], m["labels"][1] = m["labels"][1], m["labels"][0]

    def other_features(m):
        m["feature_config"]["f_max"] = 7000.0

    for name, edit, pattern in [
        ("labels", swap_labels, "label map"),
        ("feats", other_features, "feature config"),
    ]:
        alt = _altered_shards(shards, tmp_path / name, edit)
        run = tmp_path / f"run-{name}"
        run.mkdir()
        shutil.copy(Path(info["run"]) / "last.pt", run / "last.pt")
        fails(
            ["--shards", str(alt), "--out", str(run), "--config", cfg, "--resume", "--no-compile"],
            pattern,
            capsys,
        )
        # evaluate names the mismatch too
        from spkr.evaluate import main as eval_main

        assert (
            eval_main(
                ["--checkpoint", str(run / "last.pt"), "--shards", str(alt), "--out", str(run / "e.json")]
            )
            == 2
        )


@pytest.mark.slow
def test_other_split_is_refused_and_evaluation_uses_the_checkpoint_statistics(
    tmp_path, tmp_path_factory, capsys
):
    """Regression (issue 10.2): the same corpus re-sharded with --seed 1 has the same labels and
    sizes, but most of its test utterances were training utterances of the seed-0 model. Resume,
    evaluate, chart_losses and a mid-epoch loader state now refuse it (evaluate/chart_losses warn with
    --allow-other-dataset); evaluation normalises with the checkpoint's statistics, whatever the shards say."""
    from spkr.evaluate import main as eval_main
    from spkr.shards.format import Manifest
    from spkr.stream import SpeakerLoader
    from spkr.tools.chart_losses import main as chart_main
    from spkr.tools.shard import main as shard_main
    from tests.runkit import demo_shards, killed_run

    base = tmp_path_factory.getbasetemp()
    info = killed_run(base)
    shards = demo_shards(base)
    reseeded = tmp_path / "seed1"
    args = ["--source", str(base / "demo_corpus"), "--subsets", "train.100", "--no-progress"]
    assert shard_main(args + ["--out", str(reseeded), "--seed", "1"]) == 0
    m0, m1 = Manifest.load(str(shards)), Manifest.load(str(reseeded))
    assert m0.labels == m1.labels and m0.split("test").num_samples == m1.split("test").num_samples
    assert m0.dataset_id != m1.dataset_id
    train0 = {k for s in m0.split("train").shards for k in s.keys}
    assert {k for s in m1.split("test").shards for k in s.keys} & train0  # the leak this guards against

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(Path(info["run"]) / "last.pt", run / "last.pt")
    cfg = str(REPO / "configs" / "tiny.toml")
    fails(
        ["--shards", str(reseeded), "--out", str(run), "--config", cfg, "--resume", "--no-compile"],
        r"cannot resume .* not the dataset of checkpoint",
        capsys,
    )
    ckpt = str(run / "last.pt")
    capsys.readouterr()
    assert eval_main(["--checkpoint", ckpt, "--shards", str(reseeded), "--out", str(run / "e.json")]) == 2
    assert "not the dataset of the checkpoint" in capsys.readouterr().err
    assert eval_main(["--checkpoint", ckpt, "--shards", str(reseeded), "--out", str(run / "e.json"), "--no-verification", "--allow-other-dataset"]) == 0  # fmt: skip
    assert "may have been training utterances" in capsys.readouterr().err
    assert json.loads((run / "e.json").read_text())["same_dataset"] is False
    assert chart_main(["--run", info["run"], "--shards", str(reseeded), "--splits", "test"]) == 2

    # a mid-epoch loader state of the seed-0 run does not load into the seed-1 shards
    ld0 = SpeakerLoader(str(shards), "train", 8, rank=0, world_size=1)
    ld0.set_epoch(1)
    it = iter(ld0)
    next(it)
    state = ld0.state_dict()
    ld1 = SpeakerLoader(str(reseeded), "train", 8, rank=0, world_size=1)
    with pytest.raises(ValueError, match="loader state is for dataset"):
        ld1.load_state_dict(state)

    # normalisation: the checkpoint's statistics, not the shard directory's (shift them by 6 dB)
    def shift(m):
        m["stats"]["mean"] = [x + 6.0 for x in m["stats"]["mean"]]

    shifted = _altered_shards(shards, tmp_path / "shifted", shift)
    assert Manifest.load(str(shifted)).dataset_id == m0.dataset_id
    outs = []
    for d in (shards, shifted):
        out = run / f"eval-{d.name}.json"
        assert eval_main(["--checkpoint", ckpt, "--shards", str(d), "--split", "test", "--out", str(out), "--no-verification"]) == 0  # fmt: skip
        res = json.loads(out.read_text())
        outs.append((res["loss"], res["acc"], res["n"]))
    assert outs[0] == outs[1]


def test_auto_dtype_follows_the_device_capability(monkeypatch):
    """bf16 autocast only where the CPU computes bf16 natively; fp32 where it would be emulated (a
    CPU of the other kind is simulated by the capability probe: both exist, only one is here)."""
    import spkr.run.distributed as rd

    cpu = torch.device("cpu")
    assert rd.resolve_dtype("fp32", cpu)[0] == torch.float32
    assert rd.resolve_dtype("bf16", cpu)[0] == torch.bfloat16
    native = rd.cpu_has_native_bf16()
    flags = open("/proc/cpuinfo").read()
    assert native == any(f in flags.split() for f in ("avx512_bf16", "amx_bf16", "bf16"))
    assert rd.resolve_dtype("auto", cpu)[0] == (torch.bfloat16 if native else torch.float32)
    for has, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(rd, "cpu_has_native_bf16", lambda has=has: has)
        dtype, why = rd.resolve_dtype("auto", cpu)
        assert dtype == want and "auto" in why
    with pytest.raises(ValueError, match="dtype must be one of auto, bf16, fp16, fp32"):
        rd.resolve_dtype("int8", cpu)


@pytest.mark.slow
def test_training_uses_the_models_weight_decay_groups(tmp_path_factory):
    """Issue 13: the optimizer of a real run is built from model.param_groups: its saved state has the
    named groups, Mamba-1's 2-D A_log (and D, norms, biases) in the weight_decay 0 group."""
    from spkr.checkpoint import load
    from tests.runkit import tiny_run

    info = tiny_run(tmp_path_factory.getbasetemp())
    ckpt = load(Path(info["run"]) / "last.pt")
    groups = ckpt["optimizer"]["param_groups"]
    wd = ckpt["train_config"]["weight_decay"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, wd] and wd > 0
    no_decay = next(g for g in groups if g["weight_decay"] == 0.0)["param_names"]
    decay = next(g for g in groups if g["weight_decay"] == wd)["param_names"]
    assert any(n.endswith("A_log") and ckpt["model"][n].dim() == 2 for n in no_decay)
    assert all(n.rsplit(".", 1)[-1] not in ("A_log", "D") and not n.endswith("bias") for n in decay)
    assert "embedding.weight" in decay and sorted(no_decay + decay) == sorted(ckpt["model"])


def test_resume_refuses_shards_with_other_statistics_or_class_weights(tmp_path):
    """The same dataset_id with other feature statistics or class weights (a manifest edited, then made
    coherent again: digest recomputed) cannot continue a run: it would train under another
    normalisation than the checkpoint's, which evaluation and prediction use."""
    from spkr.models import build_model
    from spkr.models.config import ModelConfig
    from spkr.run import TrainError
    from spkr.run.checkpoint import Position, check_resumable, pack
    from spkr.shards.format import Manifest
    from spkr.shards.writer import write_manifest
    from tests.shardkit import make_shards

    src = make_shards(tmp_path / "shards", [4, 3], n_mels=16)
    m = Manifest.load(str(src))
    model_cfg = ModelConfig(d_model=16, n_layers=1, frontend_channels=[16], embedding_dim=8)
    model = build_model(model_cfg, m.feature_config.n_mels, len(m.labels))
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = pack(
        model=model, optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
        scaler=torch.amp.GradScaler("cpu", enabled=False), position=Position(), rngs=[], loaders=[], world=1,
        manifest=m, model_cfg=model_cfg, train_cfg=TrainConfig(), shards=str(src),
    )  # fmt: skip
    check_resumable(ckpt, m, model_cfg, 1, "last.pt")  # its own shards: resumable

    def stats(d):
        d["stats"]["mean"][3] += 5.0

    def weights(d):
        d["class_weights"][0] = 100.0

    for name, edit, says in [
        ("stats", stats, r"feature statistics \(mean\) differ from the checkpoint's \(entry 3: "),
        ("weights", weights, r"class weights differ from the checkpoint's \(entry 0: 100\.0 vs 1\.0\)"),
    ]:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        data = json.loads(m.to_json())
        edit(data)
        write_manifest(str(dst), data)
        other = Manifest.load(str(dst))
        assert other.dataset_id == m.dataset_id
        with pytest.raises(TrainError, match=r"^cannot resume from last\.pt: the shards' " + says):
            check_resumable(ckpt, other, model_cfg, 1, "last.pt")


def test_select_valid_keeps_the_first_best_validation():
    """``select = "valid"`` records the validation to test with: valid accuracy (higher is better) without
    a verification split of role valid, its EER (lower) with one; a tie keeps the earlier, an unusable
    trial list (an error entry) selects nothing; ``select = "last"`` records nothing."""
    from types import SimpleNamespace

    from spkr.run.checkpoint import Position
    from spkr.run.distributed import DistEnv
    from spkr.run.trainer import Trainer

    def trainer(select: str, verify: bool) -> Trainer:
        t = Trainer.__new__(Trainer)  # only what the selection reads
        t.cfg, t.best = TrainConfig(select=select), None
        t.env = DistEnv(ddp=False, rank=0, world=1, local_rank=0, device=torch.device("cpu"))
        t.data = SimpleNamespace(valid_verify=object() if verify else None)
        return t

    def run(t: Trainer, rows: list[dict]) -> list[bool]:
        return [
            t.track_best(Position(step=10 * e, epoch=e), {**r, "weights": f"w{e}"})
            for e, r in enumerate(rows)
        ]

    t = trainer("valid", verify=False)
    assert run(t, [{"acc": a} for a in (0.5, 0.7, 0.7, 0.6)]) == [True, True, False, False]
    assert t.best == {
        "metric": "valid accuracy",
        "value": 0.7,
        "score": 0.7,
        "epoch": 1,
        "step": 10,
        "weights": "w1",
    }
    t = trainer("valid", verify=True)
    rows = [{"verification": {"split": "valid-verify", "eer": e}} for e in (0.3, 0.2, 0.2, 0.25)]
    assert run(t, [*rows, {"verification": {"error": "bad trials"}}]) == [True, True, False, False, False]
    assert (t.best["metric"], t.best["value"], t.best["epoch"], t.best["weights"]) == (
        "valid-verify EER",
        0.2,
        1,
        "w1",
    )
    t = trainer("last", verify=True)
    assert run(t, rows) == [False] * 4 and t.best is None
    with pytest.raises(ValueError, match='select must be "last" or "valid"'):
        TrainConfig(select="best")
