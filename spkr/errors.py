"""The base of every error spkr documents, and the one-line convention of its command-line tools.

Every stage may import this module (it imports nothing from spkr). Each documented error class
(``ShardError``, ``ManifestError``, ``ConfigError``, ``CheckpointError``, ``GalleryError``,
``TrialListError``, ``AudioError``, ``AugmentError``, ``ReadFailed``, ``TrainError``, the download
errors ...) derives from :class:`SpkrError` and keeps its builtin base (``ValueError``,
``RuntimeError``, ``OSError``) for callers that catch those.

The contract that lets an error cross a process boundary: ``type(e)(str(e))`` is the same error, its
own type and the same message, so a DataLoader worker's error is rebuilt as itself (torch rebuilds a
worker's exception as ``exc_type(message)``; :class:`~spkr.stream.loader.SpeakerLoader` hands the
worker's error over whole) and an error pickled to another process unpickles.
"""

from __future__ import annotations

EXIT_ERROR = 2  # the exit status of every spkr CLI for an error the user can fix


class SpkrError(Exception):
    """An error the user can fix, whose message names the file (or URL, or option) and what is wrong.
    Subclasses accept one preformatted message as their only argument (see the module docstring)."""


# What a CLI reports as one line and :data:`EXIT_ERROR`: spkr's errors, and the builtin kinds a bad
# argument or file raises (a missing file, a malformed number). Anything else is a bug: a traceback.
KNOWN_ERRORS: tuple[type[BaseException], ...] = (SpkrError, ValueError, OSError)


def one_line(prog: str, error: BaseException) -> str:
    """``[prog] error: <message>`` on one line (line breaks inside the message become spaces)."""
    message = " ".join(str(error).split("\n")) or type(error).__name__
    return f"[{prog}] error: {message}"


__all__ = ["EXIT_ERROR", "KNOWN_ERRORS", "SpkrError", "one_line"]
