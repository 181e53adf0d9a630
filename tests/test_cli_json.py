"""JSON-valued options (--storage-options, --feature-config) of every CLI: bad JSON or a JSON value that
is not an object is an argparse usage error (exit 2, one line naming the option), never a traceback,
and the value itself (it may hold credentials) is not echoed."""

from __future__ import annotations

import argparse

import pytest

from spkr import evaluate, train
from spkr.config import json_object
from spkr.tools import chart_losses, shard

SECRET = '{"key": "AKIA-SECRET", "secret": oops}'  # invalid: oops is not a JSON value

CLIS = {
    "train": (train.main, ["--shards", "s", "--out", "o"]),
    "evaluate": (evaluate.main, ["--checkpoint", "c.pt"]),
    "chart_losses": (chart_losses.main, ["--run", "r"]),
    "shard": (shard.main, ["--source", "s", "--subsets", "train.100", "--out", "o"]),
}
CASES = [(name, "--storage-options") for name in CLIS] + [("shard", "--feature-config")]


@pytest.mark.parametrize("cli,flag", CASES, ids=[f"{c}{f}" for c, f in CASES])
@pytest.mark.parametrize(
    "value,why",
    [
        (SECRET, "Expecting value"),
        ("[1, 2]", "got an array"),
        ('"s3"', "got a string"),
    ],
    ids=["bad-json", "array", "string"],
)
def test_bad_json_option_is_a_usage_error(cli, flag, value, why, tmp_path, capsys):
    main, argv = CLIS[cli]
    with pytest.raises(SystemExit) as e:
        main([*argv, flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}: not a JSON object: {why}" in err, err
    assert "Traceback" not in err and "AKIA" not in err and "oops" not in err
    assert err.startswith("usage:") and len(err.strip().splitlines()[-1]) < 200


def test_good_json_options_parse_to_dicts():
    opts = '{"key": "k", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}'
    args = train.parse_args(["--shards", "s", "--out", "o", "--storage-options", opts])
    assert args.storage_options == {"key": "k", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert train.parse_args(["--shards", "s", "--out", "o"]).storage_options is None
    # an empty value (e.g. an unset shell variable) means "not given", as before
    assert train.parse_args(["--shards", "s", "--out", "o", "--storage-options", ""]).storage_options is None
    assert evaluate.parse_args(["--checkpoint", "c", "--storage-options", "{}"]).storage_options == {}
    args = shard.parse_args(["--source", "s", "--out", "o", "--feature-config", '{"n_mels": 40}'])
    assert args.feature_config == {"n_mels": 40} and args.storage_options is None
    with pytest.raises(argparse.ArgumentTypeError, match="not a JSON object: got null"):
        json_object("null")
    with pytest.raises(argparse.ArgumentTypeError, match="not a JSON object: got a number"):
        json_object("1.5")


@pytest.mark.parametrize("cli,flag", CASES + [("shard", "--augment-config")], ids=lambda x: str(x))
@pytest.mark.parametrize(
    "value", ['{"top_db": NaN}', '{"x": -Infinity}', '{"x": [1, Infinity]}', '{"x": 1e999}']
)
def test_non_finite_numbers_in_json_options_are_usage_errors(cli, flag, value, capsys):
    """Python's json reads NaN, Infinity and 1e999 (inf); no option takes them."""
    main, argv = CLIS[cli]
    with pytest.raises(SystemExit) as e:
        main(
            [*argv, "--augment-copies", "1", flag, value]
            if flag == "--augment-config"
            else [*argv, flag, value]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}: not a JSON object: " in err and "is not a finite number" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "value, says",
    [
        ('{"n_mels": 0}', "--feature-config n_mels: 0 is below 1"),
        ('{"n_mels": "40"}', "--feature-config n_mels: expected an integer, got '40'"),
        ('{"hop_length": -1}', "--feature-config hop_length: -1 is below 1"),
        ('{"n_fft": 2.5}', "--feature-config n_fft: expected an integer, got 2.5"),
        ('{"top_db": 0}', "--feature-config top_db: 0 is not > 0"),
        ('{"center": 1}', "--feature-config center: expected true/false, got 1"),
        ('{"sample_rate": 16000000000}', "--feature-config sample_rate: 16000000000 is above"),
    ],
)
def test_bad_feature_config_values_stop_the_shard_tool_before_any_work(value, says, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        shard.main(["--source", str(tmp_path / "no-corpus"), "--out", str(out), "--feature-config", value])
        == 2
    )
    err = capsys.readouterr().err
    assert f"[shard] error: {says}" in err and "Traceback" not in err, err
    assert not out.exists()


def test_non_finite_numbers_in_config_files_are_config_errors(tmp_path):
    from spkr.config import ConfigError
    from spkr.run.configs import load_configs
    from spkr.train import parse_args

    for text, says in [
        ("[model]\ndropout = nan\n", "not a finite number"),
        ("[model]\naam_scale = inf\n", "not a finite number"),
        ("[model]\naam_scale = -inf\n", "not a finite number"),
        ("[model]\nd_state = 0\n", "d_state: 0 is below 1"),
        ("[model]\nexpand = -2\n", "expand: -2 is below 1"),
    ]:
        path = tmp_path / "c.toml"
        path.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_configs(parse_args(["--shards", "x", "--config", str(path)]))
        assert str(e.value).startswith(str(path)) and says in str(e.value), str(e.value)


def test_train_config_values_are_checked_like_the_file_and_flags(tmp_path, capsys):
    from spkr.config import ConfigError, from_dict
    from spkr.run.configs import TrainConfig

    for value, says in [
        ({"lr": float("nan")}, "x [train] lr: nan is not a finite number"),
        ({"beta2": 1.0}, "x [train] beta2: 1.0 is not < 1"),
        ({"weight_decay": -0.1}, "x [train] weight_decay: -0.1 is below 0"),
        ({"grad_clip": 10**400}, "is not a finite number"),
    ]:
        with pytest.raises(ConfigError) as e:
            from_dict(TrainConfig, value, "x [train]")
        assert says in str(e.value), str(e.value)
    config = tmp_path / "c.toml"
    config.write_text("[model]\n[train]\nlr = nan\n")
    assert train.main(["--shards", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "nan is not a finite number" in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["shard", "--min-seconds", "nan"],
        ["shard", "--protocol", "open", "--valid-fraction", "inf"],
        ["predict", "--threshold", "inf"],
    ],
)
def test_non_finite_numbers_on_the_command_line_are_usage_errors(argv, capsys):
    from spkr import predict

    mains = {
        "shard": (shard.main, CLIS["shard"][1]),
        "predict": (predict.main, ["x.flac", "--checkpoint", "c.pt"]),
    }
    main, base = mains[argv[0]]
    with pytest.raises(SystemExit) as e:
        main([*base, *argv[1:]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: argument {argv[-2]}: {argv[-1]} is not a finite number" in err, err
