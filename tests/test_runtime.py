"""spkr.runtime: the huge-page allocator setting is opt-in and only set before torch is imported; the
rank / world size of torchrun's environment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import os, sys; {first}import spkr; print(os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset'))"


@pytest.mark.parametrize(
    "env, first, expect",
    [
        ({}, "", "unset"),  # default: spkr changes nothing
        ({"SPKR_HUGEPAGES": "1"}, "", "1"),  # opt-in, before torch loads
        ({"SPKR_HUGEPAGES": "1"}, "import torch; ", "unset"),  # too late: torch already read it
        ({"SPKR_HUGEPAGES": "1", "THP_MEM_ALLOC_ENABLE": "0"}, "", "0"),  # the user's own value wins
    ],
)
def test_hugepages_opt_in(env, first, expect):
    base = {k: v for k, v in os.environ.items() if k not in ("SPKR_HUGEPAGES", "THP_MEM_ALLOC_ENABLE")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(first=first)], env={**base, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expect


def test_env_rank_world(monkeypatch):
    from spkr.runtime import env_rank_world
    from spkr.stream import default_rank_world

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert env_rank_world() == default_rank_world() == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert env_rank_world() == default_rank_world() == (3, 4)  # no process group: the environment
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(ValueError, match="WORLD_SIZE='four' is not an integer"):
        env_rank_world()
