"""``download()``: bring one dataset's folder up to date, file by file (skip what verifies,
fetch what is missing, extract archives), then run its audit."""

from __future__ import annotations

import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from uda_cli.data.download import transfer
from uda_cli.data.download.archives import _extract_and_mark
from uda_cli.data.download.auth import credentials_from_env, login
from uda_cli.data.download.catalogue import _resolve
from uda_cli.data.download.checksums import SIDECAR, _record, _remember, _static_checksum, file_checksums
from uda_cli.data.download.common import _describe, _local, _say
from uda_cli.data.download.space import check_disk_space
from uda_cli.data.download.state import _done, _marker_ok, _marker_path, _part_path
from uda_cli.data.download.transfer import USER_AGENT, _fetch_url, _UrlFailed, candidate_urls
from uda_cli.data.download.types import Credentials, Dataset, Resource
from uda_cli.errors import DownloadError

if TYPE_CHECKING:
    from rich.console import Console


class _NoCredentials(Exception):
    """A URL needs the dataset's login and no credentials were given."""


class _Session:
    """What one download of one dataset shares: its console and mirrors, and its login, made
    once and only when a URL behind it (or its published md5) is needed."""

    def __init__(self, ds: Dataset, folder: Path, console: Console, mirrors: tuple[str, ...],
                 credentials: Credentials | None):
        self.ds, self.folder, self.console, self.mirrors = ds, folder, console, mirrors
        self.credentials = credentials
        self._opener = None

    def opener_for(self, url: str):
        form = self.ds.login
        if form is None or not url.startswith(form.protects):
            return None
        if self._opener is None:
            if self.credentials is None:
                raise _NoCredentials()
            self._opener = login(form, self.credentials, self.console)
        return self._opener

    def published_md5(self, resource: Resource) -> str | None:
        """The md5 the site shows for ``resource`` (after login), or None without credentials."""
        if not resource.md5_url:
            return None
        try:
            opener = self.opener_for(resource.md5_url)
        except _NoCredentials:
            return None
        try:
            with transfer._open(urllib.request.Request(resource.md5_url, headers={"User-Agent": USER_AGENT}), opener) as r:
                text = r.read(4096).decode("utf-8", "replace")
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise DownloadError(f"could not read the md5 of {resource.filename} from {resource.md5_url}: "
                                f"{_describe(reason)}") from None
        words = text.split()
        if not words or not re.fullmatch(r"[0-9a-fA-F]{32}", words[0]):
            raise DownloadError(f"{resource.md5_url} did not answer with the md5 of {resource.filename}; "
                                "try again later")
        return words[0].lower()

    def expected(self, resource: Resource) -> tuple[str, str, str] | None:
        if resource.checksum:
            algorithm, digest = resource.checksum
            return algorithm, digest, algorithm
        md5 = self.published_md5(resource)
        if md5:
            return "md5", md5, f"md5 published by {self.ds.login.site if self.ds.login else 'the site'}"
        return _static_checksum(resource, self.folder)

    def no_credentials(self) -> DownloadError:
        form = self.ds.login
        assert form is not None
        missing = [r.filename for r in self.ds.resources
                   if r.required and not _done(r, self.folder) and not (self.folder / r.filename).exists()]
        files = " and ".join(missing)
        account = f" (an account: {form.register_url})" if form.register_url else ""
        return DownloadError(
            f"{form.site} downloads need a login: set {form.user_env} and {form.password_env}{account}, "
            f"or download {files} from {self.ds.homepage} yourself, put {'them' if len(missing) > 1 else 'it'} "
            f"in {self.folder}/ and run `uda download {self.ds.name}` again to verify and extract "
            f"{'them' if len(missing) > 1 else 'it'}"
        )


def download(
    dataset: str | Dataset,
    data_root: Path | str,
    mirrors: Iterable[str] = (),
    force: bool = False,
    include_optional: bool = True,
    console: Console | None = None,
    credentials: Credentials | None = None,
) -> Path:
    """Fetch, verify and extract ``dataset`` into ``<data_root>/<folder>``; return that folder.

    ``force`` fetches every file again even if it verifies. ``include_optional=False`` skips
    resources declared ``required=False``. ``credentials`` log in where the dataset needs it
    (default: from the dataset's environment variables). Raises :class:`DownloadError` (one
    line) on failure, including an audit that finds missing or unreadable files.
    """
    from rich.console import Console

    ds = _resolve(dataset)
    console = console or Console(stderr=True)
    folder = Path(data_root) / ds.folder
    if credentials is None and ds.login is not None:
        credentials = credentials_from_env(ds.login)
    check_disk_space(ds, folder, include_optional=include_optional, force=force)
    with _local(folder, "create"):
        folder.mkdir(parents=True, exist_ok=True)
    session = _Session(ds, folder, console, tuple(mirrors), credentials)
    for resource in ds.resources:
        if not resource.required and not include_optional:
            _say(console, f"{ds.name}: skipping optional {resource.filename}")
            continue
        _ensure_resource(session, resource, force)
    if ds.audit is not None:
        result = ds.audit(folder)
        if not result.ok:
            raise DownloadError(
                f"{ds.name}: the audit found {result.summary()} in {folder}; "
                f"run `uda download {ds.name}` again, or `uda download {ds.name} --verify` for details"
            )
        _say(console, f"{ds.name}: audit: {result.summary()}")
    _say(console, f"{ds.name}: ready in {folder}", "green")
    return folder


def _ensure_resource(session: _Session, resource: Resource, force: bool) -> None:
    ds, folder, console = session.ds, session.folder, session.console
    target = folder / resource.filename
    part = _part_path(target)
    marker = _marker_path(target)
    if force:
        part.unlink(missing_ok=True)  # a forced download starts from nothing
    else:
        if resource.extract and _marker_ok(marker, resource, folder):
            _say(console, f"{ds.name}: {resource.filename} already extracted and verified, skipping")
            return
        if target.exists():
            expected = session.expected(resource)
            digests = file_checksums(target, ("sha256", *(expected[:1] if expected else ())))
            if expected is None:
                # Nothing to compare with: a file the user put there (a Cityscapes zip fetched by
                # hand, say). It is trusted now and its sha256 recorded; zips also carry a CRC-32
                # per member, which extraction checks.
                _record(folder, resource.filename, digests["sha256"])
                _say(console, f"{ds.name}: {resource.filename} found; no published checksum to compare with, "
                              f"its sha256 {digests['sha256'][:16]}… was recorded (trust on first use)", "yellow")
            elif digests[expected[0]] == expected[1]:
                _remember(folder, resource, digests)
                _say(console, f"{ds.name}: {resource.filename} already verified ({expected[2]}), skipping")
            else:
                # Deleted at once, so that no reader can use it if the fetch below fails.
                target.unlink()
                _say(console, f"{ds.name}: {resource.filename} did not match its {expected[2]} and was deleted; "
                              "fetching it again", "yellow")
                digests = None
            if digests is not None:
                if resource.extract:
                    _extract_and_mark(target, folder, resource, console, ds.name, digests)
                return

    urls = candidate_urls(ds, resource, session.mirrors)
    if not urls:
        hint = ds.mirror_hint or "pass --mirror DIR_OR_URL holding " + f"{ds.mirror_dir}/{resource.filename}"
        raise DownloadError(f"{ds.name}: no download URL is known for {resource.filename}; {hint}")
    digests = _fetch_to(target, resource, urls, session)
    if resource.extract:
        _extract_and_mark(target, folder, resource, console, ds.name, digests)


def _fetch_to(target: Path, resource: Resource, urls: list[str], session: _Session) -> dict[str, str]:
    """Fetch ``target`` from the first URL that works; rename it into place once verified.

    Returns the file's digests (sha256, and the algorithm it was checked with).
    """
    from rich.progress import (
        BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
    )

    console, label, folder = session.console, session.ds.name, session.folder
    part = _part_path(target)
    failures: list[str] = []
    needs_login = False
    # The bar is drawn only on a terminal and vanishes when done; the plain lines printed
    # alongside it are what a log or a pipe sees.
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal,
    )
    with progress:
        for i, url in enumerate(urls):
            try:
                opener = session.opener_for(url)
                _fetch_url(url, part, resource, progress, console, f"{label}: {target.name}", opener)
            except _NoCredentials:
                needs_login = True
                failures.append(f"{url} (needs a login)")
                continue
            except _UrlFailed as e:
                failures.append(f"{url} ({e})")
                if i + 1 < len(urls):
                    _say(console, f"  {url}: {e}; trying the next URL", "dim")
                continue
            expected = session.expected(resource)
            digests = file_checksums(part, ("sha256", *(expected[:1] if expected else ())))
            if expected is not None and digests[expected[0]] != expected[1]:
                part.unlink()
                algorithm, digest, how = expected
                got = digests[algorithm]
                if how.startswith("sha256 recorded"):
                    raise DownloadError(
                        f"{target.name} from {url} differs from the copy first downloaded (sha256 {got[:16]}…, "
                        f"recorded {digest[:16]}…); the new file was deleted; if the publisher changed the file, "
                        f"remove its line from {folder / SIDECAR} and run the command again"
                    )
                raise DownloadError(
                    f"{target.name} from {url}: {algorithm} checksum did not match (got {got[:16]}…, "
                    f"expected {digest[:16]}…); the bad file was deleted; run the command again "
                    "or pass another --mirror"
                )
            os.replace(part, target)  # atomic: the final name only ever holds a checked file
            if expected is None:
                _record(folder, target.name, digests["sha256"])
                _say(console, f"{label}: {target.name} has no published checksum; its sha256 "
                              f"{digests['sha256'][:16]}… was recorded in {SIDECAR} (trust on first use)", "yellow")
            else:
                _remember(folder, resource, digests)
                _say(console, f"{label}: {target.name} verified ({expected[2]})")
            return digests
    if needs_login and not (part.exists() and part.stat().st_size):
        raise session.no_credentials()
    kept = ""
    if part.exists() and part.stat().st_size:
        kept = f"; the partial file {part} was kept: run the command again to resume"
    raise DownloadError(f"could not download {target.name}: tried {', '.join(failures)}{kept}")
