"""What the download modules share: the console line, the chunk size, error wording."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from uda_cli.errors import DownloadError, os_errors

if TYPE_CHECKING:
    from rich.console import Console

CHUNK = 1 << 20


def _say(console: Console, text: str, style: str | None = None) -> None:
    """One plain line: file names and URLs are not rich markup, and logs get no hard wraps."""
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


def _local(path: Path, action: str):
    """An OSError on our own files as a DownloadError, which no URL fallback catches."""
    return os_errors(action, path, "check that the data root is writable and has space, or pass another --data-root",
                     DownloadError)


def _describe(e: object) -> str:
    """A short reason: "No such file or directory", not the errno and path around it."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def human_size(n: int) -> str:
    """Decimal units, as the dataset sites give them: 241 MB, 11 GB, 9.9 MB."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:,.0f} {unit}"
    return f"{n} B"
