"""Errors a user can act on.

Every error that reaches the command-line boundary as a :class:`UDAError` is printed as a
single line (what went wrong and what to do next) and the process exits with
``exit_code``. Anything else is a bug: it is reported as an internal error, and
``UDA_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'steps'?)`` for the choice closest to a mistyped ``name``, or ``""``
    when none is close. Case and ``-`` / ``_`` are ignored (``batch-size`` finds
    ``batch_size``); the suggestion is spelled as the choice is."""
    choices = list(choices)

    def norm(s: str) -> str:
        return s.lower().replace("-", "_")

    by_norm = {norm(c): c for c in choices}
    key = norm(name)
    if key in by_norm and by_norm[key] != name:
        return f" (did you mean {by_norm[key]!r}?)"
    close = difflib.get_close_matches(key, list(by_norm), n=1, cutoff=0.5)
    return f" (did you mean {by_norm[close[0]]!r}?)" if close else ""


class UDAError(Exception):
    """A problem the user can fix; the message is one line that says how."""

    exit_code = 1


class ConfigError(UDAError):
    """Invalid options, config files or method hyperparameters."""

    exit_code = 2


class DataError(UDAError):
    """A dataset is missing, incomplete, or not in the expected format."""


class DownloadError(DataError):
    """A download failed or its checksum did not match."""


class CheckpointError(UDAError):
    """A checkpoint is missing, truncated, or was not written by uda."""


class OutputError(UDAError):
    """A file or folder of ours could not be written: no space, no permission, a file in the way."""


@contextmanager
def os_errors(action: str, path: Path | str, advice: str, cls: type[UDAError] = OutputError):
    """Turn an OSError on the user's own files into one line of ``cls``:
    ``could not ACTION PATH: why; ADVICE`` (the file the system names, where it is another)."""
    try:
        yield
    except OSError as e:
        why = e.strerror or str(e)
        if isinstance(e, FileExistsError):  # mkdir(exist_ok=True) over a file
            why = "a file of that name is in the way"
        elif e.filename is not None and str(e.filename) != str(path):
            why = f"{e.filename}: {why}"
        raise cls(f"could not {action} {path}: {why}; {advice}") from None


class NotBuiltError(UDAError):
    """A command exists in the interface but is not built yet."""
