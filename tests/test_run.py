"""spkr.run parts, each alone on real (tiny) shards and a real model: one training step, the checkpoint
pack/restore round trip and its refusals, the evaluation loader and passes, the precision policy shared
by training and evaluation, and the CLIs' one error/exit convention."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from spkr.checkpoint import load as load_checkpoint
from spkr.models.config import ModelConfig
from spkr.run import TrainError, trainer
from spkr.run.checkpoint import Position
from spkr.run.cli import cli_main
from spkr.run.configs import TrainConfig
from spkr.run.distributed import DistEnv, dtype_name, resolve_dtype, setup
from spkr.run.evaluation import eval_loader, evaluate_distributed, run_split, summarise
from spkr.run.metrics import Logger, TrainWindow, read_metrics
from tests.runkit import TINY_RUN_MODEL

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from tests.shardkit import make_shards

    splits = {"train": [12, 12], "valid": [7], "test": [6]}
    out = tmp_path_factory.mktemp("run_parts") / "shards"
    return make_shards(out, splits=splits, n_mels=16, n_classes=3, mean_frames=30, seed=3)


def _model_cfg(**changes) -> ModelConfig:
    data = tomllib.loads(TINY_RUN_MODEL)["model"]
    return ModelConfig(**{**data, **changes})


def _trainer(shards: Path, out: Path, seed: int = 0, **train) -> trainer.Trainer:
    cfg = TrainConfig(batch_size=4, eval_batch_size=5, num_workers=0, crop_frames=0, warmup_steps=2, **train)
    env = setup("cpu")
    trainer.seed_rank(seed, env.rank)
    data = trainer.build_data(str(shards), cfg, env, {})
    out.mkdir(parents=True, exist_ok=True)
    logger = Logger(out, env.master, progress=False)
    return trainer.Trainer(_model_cfg(), cfg, env, data, torch.float32, logger, out, str(shards))


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_one_training_step_updates_weights_schedule_and_window(shards, tmp_path):
    t = _trainer(shards, tmp_path / "run")
    assert (t.data.micro_per_epoch, t.data.steps_per_epoch) == (6, 6)  # 24 samples / 4
    before = _params(t.raw_model)
    window = TrainWindow(world=1)
    t.data.train.set_epoch(0)
    batches = iter(t.data.train)
    t.train_step(batches, 1, 1, window)
    after = _params(t.raw_model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert t.scheduler.last_epoch == 1 and t.scheduler.get_last_lr()[0] == pytest.approx(1e-3)  # warmup 2/2
    assert (window.steps, window.n, window.samples) == (1, 4, 4) and window.loss > 0
    assert all(p.grad is None for p in t.raw_model.parameters())  # zeroed for the next step
    row = window.row(epoch=0, step=1, lr=1e-3)
    assert row["kind"] == "train" and 0 <= row["acc"] <= 1 and row["samples_per_s"] > 0


def test_gradient_accumulation_sums_the_groups_gradients(shards, tmp_path):
    """Two micro-batches of 4 with accumulation 2 make the same step as their mean (loss / group size)."""
    t = _trainer(shards, tmp_path / "a", grad_clip=0.0, class_weighted=False)
    t.data.train.set_epoch(0)
    batches = list(t.data.train)[:2]
    for batch in batches:
        t.micro_step(batch, group_size=2, sync=True)
    accumulated = {n: p.grad.clone() for n, p in t.raw_model.named_parameters() if p.grad is not None}
    t.optimizer.zero_grad(set_to_none=True)
    for batch in batches:
        t.micro_step(batch, group_size=1, sync=True)
    for n, p in t.raw_model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(accumulated[n] * 2, p.grad, rtol=1e-4, atol=1e-6)


def test_checkpoint_restore_round_trip(shards, tmp_path):
    """Everything a resume needs comes back: weights, optimizer moments, schedule, RNG, position."""
    t = _trainer(shards, tmp_path / "run")
    pos = Position()
    assert t.train_epoch(pos, stop_at_step=3) == "paused"
    assert (pos.step, pos.batches_done) == (3, 3)
    t.save_checkpoint(pos, [t.last])
    rng_after_save = torch.rand(3)

    other = _trainer(shards, tmp_path / "run", seed=7)  # other initial weights and RNG
    restored = other.restore(restart=0)
    assert (restored.step, restored.epoch, restored.batches_done, restored.finished) == (3, 0, 3, False)
    assert restored.loader_state is not None  # mid-epoch: this rank's loader position
    for k, v in t.raw_model.state_dict().items():
        assert torch.equal(v, other.raw_model.state_dict()[k]), k
    assert other.scheduler.last_epoch == t.scheduler.last_epoch == 3
    moments = [s["exp_avg"] for s in t.optimizer.state.values()]
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, other.optimizer.state.values()))
    assert torch.equal(torch.rand(3), rng_after_save)  # the saved RNG state continues identically

    # the restored run finishes the epoch with exactly the batches the first one had not consumed
    assert other.train_epoch(restored) == "end" and restored.batches_done == 6
    ckpt = load_checkpoint(t.last)
    assert ckpt["step"] == 3 and ckpt["model_config"]["d_model"] == 16 and ckpt["scaler"] is None


def test_restore_refuses_another_model_config(shards, tmp_path):
    t = _trainer(shards, tmp_path / "run")
    t.save_checkpoint(Position(), [t.last])
    other = _trainer(shards, tmp_path / "run")
    other.model_cfg = _model_cfg(d_model=24)
    with pytest.raises(TrainError, match=r"\[model\] config differs .*d_model"):
        other.restore(restart=0)


def test_evaluation_passes_agree(shards):
    """eval_loader yields every sample once; run_split, summarise and the (single-process)
    distributed pass give the same numbers; embeddings come with their labels."""
    from spkr.models import build_model

    torch.manual_seed(0)
    model = build_model(_model_cfg(), 16, 3).eval()
    loader = eval_loader(str(shards), "valid", 3)
    sums = run_split(model, loader, CPU)
    assert sums["count"] == loader.manifest.split("valid").num_samples == 7
    env = DistEnv(False, 0, 1, 0, CPU)
    dist_res = evaluate_distributed(model, loader, env, None, embeddings=True)
    assert {k: dist_res[k] for k in ("loss", "acc", "n")} == pytest.approx(summarise(sums))
    assert dist_res["emb"].shape == (7, 16) and dist_res["labels"].shape == (7,)
    keys = [k for b in loader for k in b["keys"]]
    assert len(keys) == len(set(keys)) == 7


def test_evaluate_uses_trainings_precision_policy(shards, tmp_path, capsys):
    """spkr.evaluate --dtype auto (its default) picks what training's auto picks on this CPU, says why,
    and records it; a forced fp32 works too (and gives the same numbers where auto is fp32)."""
    from spkr.evaluate import main as eval_main

    t = _trainer(shards, tmp_path / "run")
    t.save_checkpoint(Position(), [t.last])
    train_auto, why = resolve_dtype(TrainConfig().dtype, CPU)
    results = {}
    for flag in ([], ["--dtype", "fp32"]):
        out = tmp_path / f"eval{len(flag)}.json"
        argv = ["--checkpoint", str(t.last), "--shards", str(shards), "--device", "cpu", "--out", str(out)]
        assert eval_main(argv + ["--no-verification", *flag]) == 0
        results[tuple(flag)] = json.loads(out.read_text())
    err = capsys.readouterr().err
    assert f"[evaluate] dtype {dtype_name(train_auto)}" in err and why in err
    assert results[()]["dtype"] == dtype_name(train_auto)
    assert results[("--dtype", "fp32")]["dtype"] == "float32"
    if train_auto == torch.float32:
        assert results[()]["loss"] == results[("--dtype", "fp32")]["loss"]


def test_cli_main_convention(capsys):
    """Known errors: one line on stderr, exit 2, cleanup ran; a bug propagates (cleanup still runs)."""
    cleaned = []

    def bad_input(_):
        raise FileNotFoundError("shards/x: not found")

    assert cli_main("demo", bad_input, None, cleanup=lambda: cleaned.append(1)) == 2
    assert capsys.readouterr().err == "[demo] error: shards/x: not found\n" and cleaned == [1]
    assert cli_main("demo", lambda: None) == 0

    def bug():
        raise KeyError("bug")

    with pytest.raises(KeyError):
        cli_main("demo", bug, cleanup=lambda: cleaned.append(2))
    assert cleaned == [1, 2]


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n{"kind": "tr')
    assert read_metrics(tmp_path) == [{"kind": "train", "step": 1}]
    assert read_metrics(tmp_path / "none") == []
