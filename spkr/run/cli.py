"""The one error/exit convention of spkr's run CLIs (train, evaluate, predict, enroll, chart_losses,
and the tools: shard, download, chart_dataset).

    def main(argv=None) -> int:
        args = parse_args(argv)              # usage errors: argparse, exit 2
        return cli_main("evaluate", run, args)

A problem the user can fix (:data:`spkr.errors.KNOWN_ERRORS`: every spkr error — bad config,
manifest, shard, checkpoint, gallery, trial list, audio —, a missing file, a malformed value) is one
line ``[prog] error: <message>`` on stderr and exit status 2, never a traceback; anything else is a
bug and propagates. ``cleanup`` runs in every case.

Under torchrun the failing rank also records its error in the process group's store before it
leaves (:func:`~spkr.run.distributed.announce_failure`); another rank that its exit releases from a
collective with a transport error prints ``[prog] error: rank R failed, so rank Q stopped: <message>``
and exits 2 as well, instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from spkr.errors import EXIT_ERROR, KNOWN_ERRORS, one_line
from spkr.run.distributed import announce_failure, peer_failure


def cli_main(prog: str, body: Callable, *args, cleanup: Callable[[], None] | None = None) -> int:
    """``body(*args)`` (its return value, 0 for None); a known error -> ``[prog] error: ...`` on stderr
    and :data:`EXIT_ERROR`, also for a rank stopped by another rank's known error."""
    try:
        return body(*args) or 0
    except KNOWN_ERRORS as e:
        line = one_line(prog, e)
        print(line, file=sys.stderr, flush=True)
        announce_failure(line.split(" error: ", 1)[1])
        return EXIT_ERROR
    except Exception:
        stopped = peer_failure()
        if stopped is None:
            raise
        print(f"[{prog}] error: {stopped}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    finally:
        if cleanup is not None:
            cleanup()


__all__ = ["EXIT_ERROR", "KNOWN_ERRORS", "cli_main"]
