"""The one error/exit convention of spkr's run CLIs (train, evaluate, predict, chart_losses).

    def main(argv=None) -> int:
        args = parse_args(argv)              # usage errors: argparse, exit 2
        return cli_main("evaluate", run, args)

A problem the user can fix (:data:`KNOWN_ERRORS`: bad config, manifest, checkpoint, audio, a missing
file, an unusable device ...) is one line ``[prog] error: <message>`` on stderr and exit status 2, never
a traceback; anything else is a bug and propagates. ``cleanup`` runs in every case.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from spkr.checkpoint import CheckpointError
from spkr.config import ConfigError
from spkr.run import TrainError
from spkr.shards.format import ManifestError

KNOWN_ERRORS = (TrainError, ConfigError, ManifestError, CheckpointError, ValueError, OSError)
EXIT_ERROR = 2


def cli_main(prog: str, body: Callable, *args, cleanup: Callable[[], None] | None = None) -> int:
    """``body(*args)`` (its return value, 0 for None); a known error -> ``[prog] error: ...`` on stderr
    and :data:`EXIT_ERROR`."""
    try:
        return body(*args) or 0
    except KNOWN_ERRORS as e:
        print(f"[{prog}] error: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if cleanup is not None:
            cleanup()
