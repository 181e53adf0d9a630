"""One small config loader for every stage: TOML file -> plain dict -> dataclass, strictly.

Each stage owns its dataclass (``spkr.models.config.ModelConfig``, ``spkr.run.configs.TrainConfig`` ...);
this module only knows how to fill a dataclass from a mapping and say clearly what is wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from spkr.errors import SpkrError

T = TypeVar("T")


class ConfigError(SpkrError, ValueError):
    """A config file or mapping that does not fit its dataclass (unknown key, wrong type, a value out
    of range or not finite)."""


class NonFinite(SpkrError, ValueError):
    """A NaN or infinite number in a JSON or TOML text (no spkr config or option takes one)."""


class TooDeep(SpkrError, ValueError):
    """A JSON or TOML text nested deeper than its parser can follow (no spkr config nests)."""


def _finite_float(text: str) -> float:
    """``parse_float`` of json and tomllib: the float, unless NaN or infinite (TOML's ``nan``/``inf``,
    JSON's ``1e999``)."""
    value = float(text)
    if not math.isfinite(value):
        raise NonFinite(f"{text} is not a finite number")
    return value


def _no_constant(name: str):
    """``parse_constant`` of json: Python's json reads NaN, Infinity, -Infinity; refuse them."""
    raise NonFinite(f"{name} is not a finite number")


def loads_json(text: str | bytes, object_hook=None) -> Any:
    """``json.loads`` that refuses NaN, Infinity and numbers too large for a float (NonFinite) and
    nesting too deep for its parser (TooDeep), both ValueErrors; other errors as json.loads'."""
    try:
        return json.loads(
            text, object_hook=object_hook, parse_constant=_no_constant, parse_float=_finite_float
        )
    except RecursionError:
        raise TooDeep("JSON nested too deeply") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; errors (not UTF-8, not TOML, nested too deeply, a NaN or infinite number)
    name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with path.open("rb") as f:
            return tomllib.load(f, parse_float=_finite_float)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    except NonFinite as e:
        raise ConfigError(f"{path}: {e} (config values must be finite)") from None


def finite_number(text: str) -> float:
    """``type=`` of every command-line option that takes a number: ``nan``, ``inf`` (which float()
    reads) and non-numbers are an argparse usage error (exit 2, one line)."""
    try:
        return _finite_float(text)
    except (ValueError, NonFinite) as e:
        raise argparse.ArgumentTypeError(
            str(e) if isinstance(e, NonFinite) else f"not a number: {text!r}"
        ) from None


def json_object(text: str) -> dict[str, Any] | None:
    """``type=`` of every command-line option that takes a JSON object (``--storage-options``,
    ``--feature-config``): bad JSON or another JSON value is an argparse usage error (exit 2, one line:
    ``error: argument --storage-options: not a JSON object: ...``), never a traceback. An empty
    value means "not given" (None), as before."""
    if not text.strip():
        return None
    try:  # the value itself is never echoed: storage options may hold credentials
        value = loads_json(text)
    except (json.JSONDecodeError, NonFinite, TooDeep) as e:
        raise argparse.ArgumentTypeError(f"not a JSON object: {e}") from None
    if not isinstance(value, dict):
        kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
        kind = kinds.get(type(value), "a number")
        raise argparse.ArgumentTypeError(f"not a JSON object: got {kind}")
    return value


def add_storage_options(
    parser: argparse.ArgumentParser, help: str = "JSON fsspec options (else $SPKR_STORAGE_OPTIONS)"
) -> None:
    """The ``--storage-options JSON`` option every CLI shares (parsed by :func:`json_object`)."""
    parser.add_argument("--storage-options", type=json_object, default=None, metavar="JSON", help=help)


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not fit {annotation}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int beyond any float
            finite = False
        if not finite:
            raise ConfigError(f"{where}: {value!r} is not a finite number")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError naming
    ``where`` (e.g. ``"configs/tiny.toml [model]"``) and the key."""
    data = dict(data or {})
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} (known: {sorted(fields)})")
    kwargs = {k: _check_type(v, hints[k], f"{where} {k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:  # from check_fields / in_range: it starts with the field's name
        raise ConfigError(f"{where} {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def check_fields(obj: Any) -> None:
    """ConfigError (``<field>: <problem>``) unless every field of dataclass instance ``obj`` fits its
    annotation as :func:`from_dict` checks a mapping (ints are ints, floats finite numbers, ...): for a
    ``__post_init__``, so a config built in code is checked like one read from a file."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        _check_type(getattr(obj, f.name), hints[f.name], f.name)


def in_range(value, where: str, lo=None, hi=None, *, above=None) -> None:
    """ConfigError unless ``lo <= value <= hi`` (and ``value > above``), bounds that are given."""
    if lo is not None and value < lo:
        raise ConfigError(f"{where}: {value!r} is below {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: {value!r} is above {hi}")
    if above is not None and not value > above:
        raise ConfigError(f"{where}: {value!r} is not > {above}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain JSON/TOML-able dict."""
    return dataclasses.asdict(obj)
