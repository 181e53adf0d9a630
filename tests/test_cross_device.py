"""Train anywhere, run anywhere: a checkpoint of a mamba_ssm-backend run (what a GPU run
with configs/mamba-ssm.toml writes) evaluates, predicts and charts on CPU through the pure-torch scan
with the same results as the torch-backend model of the same weights; ``--device`` on evaluate,
predict and chart_losses; no spurious "No CUDA runtime is found" warning on CPU runs."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from spkr.checkpoint import build_model_from_checkpoint, load, resolve_device, save_atomic
from spkr.config import from_dict
from spkr.models import BackendUnavailable, ModelConfig, build_model, mamba_ssm_available
from spkr.models.mamba import triton_scan_available
from tests.runkit import subprocess_env

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
N_MELS = 16
CUDA_WARNING = "No CUDA runtime is found"
# (config a GPU run trains with, the pure-torch config of the same architecture)
PAIRS = [("mamba-ssm", "mamba-torch"), ("mamba2-torch", "mamba2-torch")]


def model_config(path) -> ModelConfig:
    """The [model] table of a config file (or bundled name), read the way spkr.train reads --config."""
    from spkr.run.configs import load_configs
    from spkr.train import parse_args

    return load_configs(parse_args(["--shards", "x", "--config", str(path)]))[0]


def _train_config(name: str, dst: Path) -> Path:
    """The bundled config ``name`` with backend "torch" (what trains on this CPU-only machine)."""
    text = (CONFIGS / f"{name}.toml").read_text()
    text = text.replace('backend = "mamba_ssm"', 'backend = "torch"').replace(
        'backend = "auto"', 'backend = "torch"'
    )
    dst.write_text(text)
    assert from_dict(ModelConfig, tomllib.loads(text)["model"], "cfg").backend == "torch"
    return dst


@pytest.fixture(scope="module", params=PAIRS, ids=[p[0] for p in PAIRS])
def gpu_run(request, tmp_path_factory) -> dict:
    """A real run of the config's [model] table (spkr.train, 1 epoch on tiny shards; torch backend,
    the only one that trains here), whose checkpoints are then given the backend fields a CUDA run of
    the mamba_ssm backend records (model_config.backend and backend = "mamba_ssm"); the parameters
    are the same for both backends, which is the claim under test."""
    from spkr.train import main as train_main
    from tests.shardkit import make_shards

    name, torch_name = request.param
    base = tmp_path_factory.mktemp(name)
    splits = {"train": [8, 8], "valid": [6], "test": [9]}
    shards = make_shards(base / "shards", splits=splits, n_mels=N_MELS, n_classes=3, mean_frames=30, seed=7)
    run = base / "run"
    args = [
        "--shards", str(shards), "--config", str(_train_config(name, base / "cfg.toml")), "--out", str(run),
        "--no-progress", "--no-compile", "--dtype", "fp32", "--epochs", "1", "--batch-size", "4",
        "--eval-batch-size", "8", "--warmup-steps", "2", "--crop-frames", "20", "--num-workers", "0",
        "--verify-pairs", "0", "--fresh",
    ]  # fmt: skip
    assert train_main(args) == 0
    paths = sorted(run.glob("*.pt"))
    assert {p.name for p in paths} >= {"ckpt-epoch000.pt", "last.pt"}
    for path in paths:
        ckpt = load(path)
        assert ckpt["backend"] == "torch"
        ckpt["model_config"]["backend"] = "mamba_ssm"
        ckpt["backend"] = "mamba_ssm"
        save_atomic(ckpt, path)
    (run / "metrics.jsonl").unlink()  # chart_losses then evaluates every point itself
    return {"run": run, "ckpt": run / "last.pt", "shards": shards, "torch_config": torch_name}


def _reference(ckpt: dict, torch_config: str):
    """The pure-torch model of the same architecture (its config file, not the checkpoint's) with the
    checkpoint's weights: load_state_dict is strict, so names and shapes must match."""
    cfg = model_config(CONFIGS / f"{torch_config}.toml")
    assert cfg.backend in ("auto", "torch")
    cfg.backend = "torch"  # the pure-torch scan, whatever "auto" would pick on this machine
    model = build_model(cfg, N_MELS, len(ckpt["labels"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def _reference_eval(ckpt: dict, shards: str, split: str, torch_config: str, pairs: int | None) -> dict:
    """The reference model's figures on ``split`` through the one evaluation entry (fp32, one process,
    the checkpoint's statistics, spkr.evaluate's batch size)."""
    from spkr.run.evaluation import EvalOptions, eval_loader, evaluate_split, local_env

    loader = eval_loader(shards, split, 64, stats=ckpt["stats"])
    model = _reference(ckpt, torch_config)
    return evaluate_split(model, loader, local_env("cpu"), EvalOptions(pairs=pairs))


def _wav(path: Path, seconds: float = 0.6, f0: float = 180.0) -> Path:
    import soundfile as sf

    t = np.arange(int(16000 * seconds)) / 16000
    rng = np.random.default_rng(0)
    wave = 0.2 * np.sin(2 * np.pi * f0 * t) + 0.01 * rng.standard_normal(len(t))
    sf.write(path, wave.astype(np.float32), 16000)
    return path


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()


# ------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("name,torch_name", PAIRS)
def test_backends_share_parameter_names_and_shapes(name, torch_name):
    """The mamba_ssm path has no parameters of its own: the [model] table of each config builds the
    same state dict (names, shapes) under every backend, and mamba-ssm.toml the same as mamba-torch.toml."""
    cfg = model_config(CONFIGS / f"{name}.toml")
    ref = build_model(model_config(CONFIGS / f"{torch_name}.toml"), N_MELS, 5).state_dict()
    want = {k: v.shape for k, v in ref.items()}
    backends = ["torch", "auto"] + (["mamba_ssm"] if mamba_ssm_available() is None else [])
    backends += ["triton"] if triton_scan_available() is None else []
    for backend in backends:
        model = build_model(ModelConfig(**{**cfg.__dict__, "backend": backend}), N_MELS, 5)
        assert {k: v.shape for k, v in model.state_dict().items()} == want, backend
    assert any(k.endswith("A_log") for k in want) and any(k.endswith("out_proj.weight") for k in want)


# ------------------------------------------------------------------------------------------ CPU inference


def test_mamba_ssm_checkpoint_runs_on_cpu_with_the_torch_scan(gpu_run):
    ckpt = load(gpu_run["ckpt"])
    assert ckpt["model_config"]["backend"] == "mamba_ssm"
    cfg = from_dict(ModelConfig, ckpt["model_config"], "ckpt")
    if mamba_ssm_available() is not None:  # what inference did before: build the training backend
        with pytest.raises(BackendUnavailable, match="mamba_ssm"):
            build_model(cfg, N_MELS, len(ckpt["labels"]))
    model, used = build_model_from_checkpoint(ckpt, "cpu")
    assert used.backend == "torch" and model.backend_name() == "torch" and not model.training
    assert {k: v for k, v in used.__dict__.items() if k != "backend"} == {
        k: v for k, v in cfg.__dict__.items() if k != "backend"
    }
    ref = _reference(ckpt, gpu_run["torch_config"])
    torch.manual_seed(1)
    mel, lengths = torch.randn(3, 50, N_MELS), torch.tensor([50, 37, 12])
    with torch.no_grad():
        _close(model(mel, lengths), ref(mel, lengths))
        _close(model.embed(mel, lengths), ref.embed(mel, lengths))
    # insisting on the kernels where they cannot run stays a clear error
    with pytest.raises(BackendUnavailable, match="mamba_ssm"):
        build_model_from_checkpoint(ckpt, "cpu", backend="mamba_ssm")


def test_mamba_ssm_checkpoint_evaluates_on_cpu(gpu_run, tmp_path, capsys):
    from spkr.evaluate import evaluate_checkpoint
    from spkr.evaluate import main as eval_main
    from spkr.run.evaluation import EvalOptions

    ckpt = load(gpu_run["ckpt"])
    shards = str(gpu_run["shards"])
    res = evaluate_checkpoint(ckpt, shards, "test", EvalOptions(pairs=0), device="cpu")
    ref = _reference_eval(ckpt, shards, "test", gpu_run["torch_config"], pairs=0)
    assert res["backend"] == "torch" and res["device"] == "cpu" and res["n"] == 9
    assert res["acc"] == ref["acc"] and res["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
    for k in ("eer", "min_dcf", "trials"):
        assert res["verification"][k] == pytest.approx(ref["verification"][k], abs=1e-6), k

    out = tmp_path / "eval.json"
    argv = ["--checkpoint", str(gpu_run["ckpt"]), "--device", "cpu", "--out", str(out), "--dtype", "fp32"]
    assert eval_main(argv) == 0  # fp32: the reference's precision
    text = capsys.readouterr().out
    assert "device cpu, backend torch (checkpoint trained with backend mamba_ssm)" in text
    written = json.loads(out.read_text())
    assert written["backend"] == "torch" and written["device"] == "cpu"
    assert written["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)


def test_mamba_ssm_checkpoint_predicts_on_cpu(gpu_run, tmp_path, capsys):
    from spkr.predict import Predictor
    from spkr.predict import main as predict_main

    wav = _wav(tmp_path / "a.wav")
    pred = Predictor(gpu_run["ckpt"], device="cpu")
    assert pred.device == torch.device("cpu") and pred.model.backend_name() == "torch"
    probs, emb = pred(wav)
    ref = _reference(pred.ckpt, gpu_run["torch_config"])
    feats = torch.from_numpy(pred.features(wav))[None]
    with torch.no_grad():
        ref_emb = ref.embed(feats, torch.tensor([feats.shape[1]]))
        ref_probs = torch.softmax(ref.head(ref_emb).float(), dim=-1)[0]
    _close(torch.from_numpy(emb), ref_emb[0])
    _close(torch.from_numpy(probs), ref_probs)

    assert predict_main([str(wav), "--checkpoint", str(gpu_run["ckpt"]), "--device", "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    top = json.loads(captured.out)["top"]
    assert top[0]["prob"] == pytest.approx(float(ref_probs.max()), abs=1e-5)
    assert "device cpu, backend torch (checkpoint trained with backend mamba_ssm)" in captured.err


def test_mamba_ssm_run_charts_on_cpu(gpu_run, capsys):
    from spkr.tools.chart_losses import main as chart_main

    run = gpu_run["run"]
    assert chart_main(["--run", str(run), "--splits", "valid", "--device", "cpu", "--dtype", "fp32"]) == 0
    assert "device cpu, backend torch (checkpoint trained with backend mamba_ssm)" in capsys.readouterr().out
    (point,) = json.loads((run / "losses.json").read_text())["splits"]["valid"]
    ckpt = load(run / "ckpt-epoch000.pt")
    ref = _reference_eval(ckpt, str(gpu_run["shards"]), "valid", gpu_run["torch_config"], pairs=None)
    assert point["n"] == ref["n"] == 6 and point["acc"] == ref["acc"]
    assert point["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and mamba_ssm_available() is None), reason="needs CUDA and mamba_ssm"
)
def test_torch_checkpoint_runs_with_mamba_ssm_kernels_on_cuda(gpu_run):
    """The other direction: on CUDA the default (auto) inference backend is mamba_ssm's kernels,
    whatever the checkpoint was trained with; same logits as the CPU torch scan within kernel tolerance."""
    ckpt = load(gpu_run["ckpt"])
    ckpt["model_config"]["backend"] = ckpt["backend"] = "torch"
    gpu, used = build_model_from_checkpoint(ckpt, "cuda")
    assert used.backend == "mamba_ssm" and gpu.backend_name() == "mamba_ssm"
    cpu, _ = build_model_from_checkpoint(ckpt, "cpu")
    torch.manual_seed(1)
    mel, lengths = torch.randn(3, 300, N_MELS), torch.tensor([300, 170, 40])
    with torch.no_grad():
        out = gpu(mel.cuda(), lengths.cuda()).cpu()
        ref = cpu(mel, lengths)
    assert torch.allclose(out, ref, rtol=2e-3, atol=2e-3), (out - ref).abs().max()


def test_training_mamba_ssm_backend_on_cpu_is_a_clear_error(tmp_path, capsys):
    """Training explicitly with backend mamba_ssm where it cannot run stays an error: one line, no traceback."""
    if torch.cuda.is_available() and mamba_ssm_available() is None:
        pytest.skip("mamba_ssm runs here")
    from spkr.train import main as train_main
    from tests.shardkit import make_shards

    shards = make_shards(tmp_path / "shards", splits={"train": [4], "valid": [2], "test": [2]}, n_mels=N_MELS)
    config = str(CONFIGS / "mamba-ssm.toml")
    args = ["--shards", str(shards), "--config", config, "--out", str(tmp_path / "r"), "--device", "cpu"]
    assert train_main(args + ["--no-progress", "--no-compile", "--epochs", "1"]) == 2
    msg = capsys.readouterr().err.strip().splitlines()[-1]
    assert msg.startswith("[train] error: backend='mamba_ssm'") and "Traceback" not in msg, msg


# ------------------------------------------------------------------------------------------ --device


def test_resolve_device():
    assert (
        resolve_device(None)
        == resolve_device("auto")
        == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(torch.device("cpu"))
    for bad in ("gpu0", "meta"):
        with pytest.raises(ValueError, match=f"--device {bad}: not"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: CUDA is not available here"):
            resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_device_is_a_one_line_error(tmp_path, capsys):
    from spkr.evaluate import main as eval_main
    from spkr.predict import main as predict_main
    from spkr.tools.chart_losses import main as chart_main
    from tests.runkit import untrained_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    ckpt = untrained_checkpoint(run / "ckpt-epoch000.pt")
    wav = _wav(tmp_path / "a.wav")
    for what, main, argv in [
        ("evaluate", eval_main, ["--checkpoint", str(ckpt), "--shards", str(tmp_path)]),
        ("predict", predict_main, [str(wav), "--checkpoint", str(ckpt)]),
        ("chart_losses", chart_main, ["--run", str(run)]),
    ]:
        assert main(argv + ["--device", "cuda"]) == 2, what
        err = capsys.readouterr().err
        assert err.startswith(f"[{what}] error: --device cuda: CUDA is not available here"), err
        assert err.count("\n") == 1 and "Traceback" not in err, err
    # the same checkpoint and audio on the CPU: works
    assert predict_main([str(wav), "--checkpoint", str(ckpt), "--device", "cpu"]) == 0
    # and as a real command line
    r = subprocess.run(
        [sys.executable, "-m", "spkr.predict", str(wav), "--checkpoint", str(ckpt), "--device", "cuda"],
        capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("[predict] error: --device cuda:") and r.stderr.count("\n") == 1, r.stderr


# ------------------------------------------------------------------------------------------ CUDA warning

needs_cuda_build_without_gpu = pytest.mark.skipif(
    not torch.version.cuda or torch.cuda.is_available(),
    reason="torch logs the warning only as a CUDA build on a machine without a usable GPU",
)


@needs_cuda_build_without_gpu
def test_no_cuda_home_warning_from_cpp_extension(tmp_path):
    """torch.compile's CPU backend imports torch.utils.cpp_extension, which logs "No CUDA runtime is
    found, using CUDA_HOME=..." when a CUDA toolkit is in sight (CUDA_HOME here, /usr/local/bin/nvcc on
    this machine). torch alone prints it; any process that imported spkr does not."""
    env = subprocess_env(CUDA_HOME=str(tmp_path))
    code = "import torch.utils.cpp_extension"
    bare = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bare.returncode == 0 and CUDA_WARNING in bare.stderr, bare.stderr
    r = subprocess.run(
        [sys.executable, "-c", "import spkr; " + code], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0 and CUDA_WARNING not in r.stderr, r.stderr
    # only that message: the module's other warnings still get through
    code = "import spkr, logging; logging.getLogger('torch.utils.cpp_extension').warning('other news')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "other news" in r.stderr


@pytest.mark.slow
@needs_cuda_build_without_gpu
def test_compiled_cpu_training_cli_prints_no_cuda_warning(tmp_path):
    """The real case: ``python -m spkr.train`` with torch.compile on CPU (inductor imports
    cpp_extension for its C++ headers) used to print the warning once per rank."""
    from tests.runkit import TINY_MODEL
    from tests.shardkit import make_shards

    shards = make_shards(tmp_path / "shards", splits={"train": [4], "valid": [2], "test": [2]}, n_mels=N_MELS)
    (tmp_path / "tiny.toml").write_text(TINY_MODEL)
    cmd = [
        sys.executable, "-m", "spkr.train", "--shards", str(shards), "--config", str(tmp_path / "tiny.toml"),
        "--out", str(tmp_path / "run"), "--device", "cpu", "--compile", "true", "--dtype", "fp32",
        "--epochs", "1", "--batch-size", "4", "--verify-pairs", "0", "--no-progress",
    ]  # fmt: skip
    r = subprocess.run(
        cmd, env=subprocess_env(CUDA_HOME=str(tmp_path)), capture_output=True, text=True, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compile on" in r.stderr + r.stdout
    assert CUDA_WARNING not in r.stderr + r.stdout, r.stderr
