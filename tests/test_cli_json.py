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
