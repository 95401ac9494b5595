"""Fetching one file from one URL: HTTP ``Range`` resume of a ``.part``, a cut-off transfer
resumed while it makes progress, a web page instead of the file refused; and the URLs to try
(``--mirror`` bases first, then the official ones). :func:`_open` is the one place that
touches the network (tests replace it here, with :data:`TIMEOUT_S`)."""

from __future__ import annotations

import http.client
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from uda_cli.data.download.common import CHUNK, _describe, _local, _say
from uda_cli.data.download.types import Dataset, Resource

if TYPE_CHECKING:
    from rich.console import Console

TIMEOUT_S = 30.0  # per socket operation (connect, each read), not for the whole file
ATTEMPTS_PER_URL = 5  # resumes of a cut-off transfer before moving on to the next URL
USER_AGENT = "uda-download/0.1 (python-urllib)"


def mirror_url(mirror: str, mirror_dir: str, filename: str) -> str:
    """``{mirror}/{mirror_dir}/{filename}``; a mirror without a scheme is a local folder."""
    if "://" not in mirror:
        mirror = Path(mirror).expanduser().resolve().as_uri()
    return f"{mirror.rstrip('/')}/{mirror_dir}/{urllib.parse.quote(filename)}"


def candidate_urls(dataset: Dataset, resource: Resource, mirrors: Iterable[str] = ()) -> list[str]:
    """Mirrors first, then the resource's own URLs, without repeats."""
    urls = [mirror_url(m, dataset.mirror_dir, resource.filename) for m in mirrors]
    return list(dict.fromkeys([*urls, *resource.urls]))


class _UrlFailed(Exception):
    """This URL cannot give us the file now; the next one is tried."""


def _open(request: urllib.request.Request, opener=None):
    """The one place that touches the network (tests wrap it to keep to 127.0.0.1)."""
    if opener is None:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    return opener.open(request, timeout=TIMEOUT_S)


def _fetch_url(url: str, part: Path, resource: Resource, progress, console: Console, label: str,
               opener=None) -> None:
    """Make ``part`` hold the whole file from ``url``, resuming what is already there.

    Returns when the transfer looks complete (the checksum then decides); raises
    :class:`_UrlFailed` when this URL cannot finish it. A cut-off transfer is resumed at
    once while each attempt makes progress.
    """
    reason = "no attempt made"
    for _ in range(ATTEMPTS_PER_URL):
        have = part.stat().st_size if part.exists() else 0
        if resource.size is not None and have >= resource.size:
            if have == resource.size:
                return  # a complete .part from an earlier run: no need to ask the server
            part.unlink()  # longer than the file can be: not a prefix of it
            have = 0
        try:
            if _fetch_once(url, part, have, resource, progress, console, label, opener):
                return
            reason = "the transfer was cut off"
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:
                return  # "Range Not Satisfiable": nothing lies past `have`, so the part is whole
            raise _UrlFailed(f"HTTP {e.code}") from None
        except urllib.error.URLError as e:  # before any data: DNS, refused, missing file://
            raise _UrlFailed(_describe(e.reason)) from None
        except (OSError, http.client.HTTPException) as e:  # mid-transfer: reset, timeout
            reason = f"the transfer was cut off: {_describe(e)}"
        now = part.stat().st_size if part.exists() else 0
        if now <= have:
            break  # no progress: resuming from here would only repeat this
        _say(console, f"  {url}: {reason} at {now:,} bytes; resuming", "dim")
    raise _UrlFailed(reason)


def _fetch_once(
    url: str, part: Path, have: int, resource: Resource, progress, console: Console, label: str, opener=None
) -> bool:
    """One request; append to or rewrite ``part``. True when all the bytes announced arrived."""
    from rich.markup import escape

    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    with _open(request, opener) as response:
        status = getattr(response, "status", None)  # None for file:// URLs
        content_type = (response.headers.get("Content-Type") or "").lower()
        if content_type.startswith(("text/html", "application/xhtml")) and not resource.filename.endswith(
            (".html", ".htm")
        ):
            # A login, consent or "too large to scan" page instead of the file: this URL will not
            # give the file, and its bytes must not be appended to a partial download.
            raise _UrlFailed("the server sent a web page, not the file")
        total = _int_or_none(response.headers.get("Content-Length"))
        if have and status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != have:
                raise _UrlFailed(f"the server resumed at byte {start}, not {have}")
            mode = "ab"
        else:
            # A 200 (or a file:// URL) carries the whole file whatever the Range said.
            if have:
                _say(console, f"  {url}: resuming is not supported there; starting again from zero", "dim")
            have, mode = 0, "wb"
        total = total or resource.size
        _say(console, f"{label}: fetching from {url}" + (f" (resuming at {have:,} bytes)" if have else ""))
        task = progress.add_task(escape(label), total=total, completed=have)
        try:
            # read1, not read: read(n) waits for all n bytes, so a timeout would lose what
            # had arrived. Both return b"" when the connection closes, even if bytes are
            # missing, hence the length check below.
            read = getattr(response, "read1", response.read)
            with _local(part, "write"):  # a full disk is not the server's fault
                f = open(part, mode)
            with f:
                while block := read(CHUNK):
                    with _local(part, "write"):
                        f.write(block)
                    progress.advance(task, len(block))
        finally:
            progress.remove_task(task)
    return total is None or part.stat().st_size >= total


def _parse_content_range(value: str | None) -> tuple[int, int | None]:
    """``"bytes 100-999/1000"`` -> ``(100, 1000)``; the total may be ``*`` (unknown)."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if not m:
        raise _UrlFailed(f"a partial response with an unreadable Content-Range {value!r}")
    return int(m.group(1)), (None if m.group(2) == "*" else int(m.group(2)))


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
