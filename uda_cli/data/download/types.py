"""The declarations: a :class:`Dataset` lists :class:`Resource` s (and may name a
:class:`LoginForm` and an audit). Plain frozen dataclasses, standard library only, so that a
dataset module (digits, office, gta5, synthia, cityscapes) can declare its files at import
time without loading the download machinery."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

GB = 1_000_000_000
MB = 1_000_000


@dataclass(frozen=True)
class Resource:
    """One file of a dataset.

    ``sha256`` is preferred; ``md5`` is accepted where only an md5 has been published;
    ``md5_url`` names a page (behind the dataset's login) whose first word is the md5. Where no
    checksum is published at all, ``unpublished`` says so and the first download's sha256 is
    recorded instead. ``size`` (bytes) is exact, when known: it sizes the progress bar and lets
    a complete ``.part`` be checked without asking the server again. ``approx_size`` and
    ``extracted_size`` are estimates, used for ``--list`` and the free-space check.
    """

    filename: str
    urls: tuple[str, ...] = ()
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    extract: bool = False  # a tar/zip/rar archive, extracted into the dataset folder once verified
    required: bool = True  # False: skipped by --no-optional
    unpublished: str = ""  # why no checksum is declared (shown by --list); the sha256 is recorded on first use
    md5_url: str | None = None
    approx_size: int | None = None
    extracted_size: int | None = None
    # The folder (relative to the dataset folder) the archive's files belong in: members that
    # are not already under it are extracted into it, so a part archive that holds bare files
    # and one that holds ``images/...`` end up in the same place.
    into: str = ""
    # Folders this archive fills: the skip check and --verify look only at its files under them
    # (loose files such as the README that several Cityscapes zips share are extracted but not
    # owned by any one archive). Empty: every file it held.
    owns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (self.sha256 or self.md5 or self.md5_url or self.unpublished):
            raise ValueError(
                f"{self.filename}: declare a sha256 (or an md5 where only that is published), an md5_url, "
                "or why no checksum is published (unpublished=...)"
            )
        if not self.filename or self.filename in (".", "..") or re.search(r"[/\\]", self.filename):
            raise ValueError(f"{self.filename!r}: a resource's filename is a plain file name")

    @property
    def checksum(self) -> tuple[str, str] | None:
        """``(algorithm, lowercase hex digest)`` as published and declared here, or None."""
        if self.sha256:
            return "sha256", self.sha256.lower()
        if self.md5:
            return "md5", self.md5.lower()
        return None

    @property
    def download_size(self) -> int:
        """Bytes to fetch: exact where known, else the estimate, else 0 (unknown)."""
        return self.size or self.approx_size or 0

    @property
    def unpacked_size(self) -> int:
        """Bytes on disk once in place: the extracted files of an archive, else the file itself."""
        if self.extract:
            return self.extracted_size or self.download_size
        return self.download_size


@dataclass(frozen=True)
class LoginForm:
    """A site that hands out files only after a form login (Cityscapes).

    The form at ``url`` is fetched once (for its session cookie), then POSTed the credentials
    and ``fields``; a redirect, or a page without a password field, means success, and the
    same page again means failure. URLs starting with ``protects`` are fetched with the
    session's cookies.
    """

    site: str  # the name said in messages: "Cityscapes"
    url: str
    protects: str
    user_env: str
    password_env: str
    user_field: str = "username"
    password_field: str = "password"
    fields: tuple[tuple[str, str], ...] = (("submit", "Login"),)
    register_url: str = ""


@dataclass(frozen=True)
class Credentials:
    """A user name and password; the password never shows in a repr, a message or a log."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class AuditResult:
    """What an audit found: ``found`` complete items of ``expected``, and the problems."""

    what: str  # "image/label pairs", "images"
    found: int
    expected: int
    problems: tuple[str, ...] = ()  # one line each, a few examples at most

    @property
    def ok(self) -> bool:
        return not self.problems and self.found == self.expected

    def summary(self) -> str:
        text = f"{self.found:,} of {self.expected:,} {self.what}"
        return text if not self.problems else f"{text}; " + "; ".join(self.problems)


@dataclass(frozen=True)
class Dataset:
    """A downloadable dataset: its files live in ``<data root>/<folder>/``."""

    name: str  # what `uda download` takes
    folder: str  # folder under the data root (the readers look there)
    mirror_dir: str  # folder under a --mirror base that holds the files
    resources: tuple[Resource, ...]
    description: str = ""
    licence: str = ""
    homepage: str = ""
    # Said when a file has no known URL and no --mirror was given.
    mirror_hint: str = ""
    login: LoginForm | None = None
    audit: Callable[[Path], AuditResult] | None = None
