"""Where artefacts live: a local directory or any fsspec URL (s3://, gs://, http(s)://, ...).

Both the write side and the read side go through these few functions, so a path and an
``s3://bucket/prefix`` behave the same everywhere.

Options for the filesystem (endpoint, credentials, anonymous access) come, in this order, from the
``storage_options`` argument, from the ``SPKR_STORAGE_OPTIONS`` environment variable (a JSON
object, e.g. ``{"anon": true}`` or ``{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}``),
and from each backend's usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...).
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

import fsspec


def is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def storage_options_from_env(options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Explicit options win over SPKR_STORAGE_OPTIONS."""
    merged: dict[str, Any] = {}
    env = os.environ.get("SPKR_STORAGE_OPTIONS")
    if env:
        try:
            merged.update(json.loads(env))
        except json.JSONDecodeError as e:
            raise ValueError(f"SPKR_STORAGE_OPTIONS is not a JSON object: {e}") from None
    merged.update(options or {})
    return merged


def get_fs(url: str, storage_options: dict[str, Any] | None = None):
    """(filesystem, path-within-filesystem) for a local path or URL."""
    url = str(url)
    protocol = url.split("://", 1)[0] if is_url(url) else "file"
    opts = storage_options_from_env(storage_options) if protocol != "file" else {}
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join URL or path components with '/'."""
    if is_url(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)
