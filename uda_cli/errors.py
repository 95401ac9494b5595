"""Errors a user can act on.

Every error that reaches the command-line boundary as a :class:`UDAError` is printed as a
single line (what went wrong and what to do next) and the process exits with
``exit_code``. Anything else is a bug: it is reported as an internal error, and
``UDA_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations


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


class NotBuiltError(UDAError):
    """A command exists in the interface but is not built yet."""
