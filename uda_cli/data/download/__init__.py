"""Fetch dataset files: declared as data, resumed, verified, safely extracted, audited.

A :class:`Dataset` lists :class:`Resource` s; a resource is one file with the URLs it may be
fetched from (tried in order) and its checksum. :func:`download` brings a dataset's folder
under the data root up to date:

- it refuses to start when the disk lacks the space the missing files need, saying how much;
- a file that is already there and verifies is skipped; an archive that was already
  extracted is skipped by its marker file (``.<archive>.extracted``, which records the
  archive's checksums and the files it held, with their sizes);
- otherwise the file is fetched to ``<file>.part``, resuming a partial ``.part`` with an HTTP
  ``Range`` request, and is renamed to its final name only after its checksum matches, so a
  file under its final name has always been verified;
- ``--mirror`` base URLs (or local folders) are tried before the official URLs, as
  ``{mirror}/{dataset.mirror_dir}/{filename}``; a URL that fails (404, refused, a web page
  instead of the file) falls through to the next;
- archives are extracted only if every member stays inside the dataset folder (no absolute
  paths, no ``..``, no links or device files); otherwise nothing is extracted at all;
- a dataset with an audit (GTA5, SYNTHIA, Cityscapes, Office-31) is counted afterwards:
  image/label pairs or images per domain, missing and unreadable files reported.

Checksums. Where the publisher gives one, it is declared with the resource (sha256, or md5 where
only that exists) or, for Cityscapes, read from the site after login. Where none is published (GTA5,
SYNTHIA, Office-31) the sha256 of the first download is recorded in ``.uda-sha256.json`` in
the dataset folder (trust on first use): a later download or ``--verify`` that finds other
bytes says so. ``uda download --list`` shows which kind each dataset has.

Logins. A dataset behind a login (Cityscapes) declares a :class:`LoginForm`; credentials
come from environment variables (or a prompt, in the command) and are used only in a POST
body: never in a URL, a message, a log line or an exception.

Only the standard library's urllib is used (``http``, ``https`` and ``file`` URLs). RAR
archives (SYNTHIA) need an external unpacker: bsdtar, unrar or 7z.

The package, by concern (each module imports only those above it):

- :mod:`.types`: the declarations (``Resource``, ``Dataset``, ``LoginForm``, ``Credentials``,
  ``AuditResult``); :mod:`.audit`: ``PairAudit``, ``ClassFolderAudit``, ``image_file_ok``.
  Both are standard library only: the dataset modules import them to declare their files.
- :mod:`.catalogue`: ``DATASETS`` by name, collected from the dataset modules
  (:mod:`uda_cli.data.digits`, ``office``, ``gta5``, ``synthia``, ``cityscapes``), which keep
  each dataset's URLs, checksums, sizes, licence and audit beside its reader.
- :mod:`.common`: the console line, error wording, ``human_size``;
  :mod:`.checksums`: digests and the first-use record; :mod:`.state`: ``.part`` files and
  extraction markers; :mod:`.space`: the free-space check.
- :mod:`.transfer`: one file from one URL (``Range`` resume, fall-through, mirrors);
  :mod:`.auth`: the Cityscapes login; :mod:`.archives`: safe extraction.
- :mod:`.fetch`: :func:`download`; :mod:`.status`: ``--list`` and ``--verify``.

The names below are importable from the package itself. Only :mod:`.types` and :mod:`.audit`
load with it; the rest load on first use, so that a dataset module importing
``uda_cli.data.download.types`` does not pull in the catalogue, which imports that dataset
module. Settings read at run time live in their own module (set them there):
``transfer.TIMEOUT_S``, ``transfer._open`` (the one call that touches the network),
``archives.RAR_TOOLS``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from uda_cli.data.download.audit import IMAGE_SUFFIXES, ClassFolderAudit, PairAudit, image_file_ok
from uda_cli.data.download.types import GB, MB, AuditResult, Credentials, Dataset, LoginForm, Resource

if TYPE_CHECKING:
    from uda_cli.data.download.archives import ARCHIVE_SUFFIXES, TAR_SUFFIXES, safe_extract
    from uda_cli.data.download.auth import credentials_from_env, login
    from uda_cli.data.download.catalogue import DATASETS, get_dataset, list_datasets
    from uda_cli.data.download.checksums import SIDECAR, checksum_kind, file_checksum, file_checksums, verify
    from uda_cli.data.download.common import human_size
    from uda_cli.data.download.fetch import download
    from uda_cli.data.download.space import check_disk_space, space_needed
    from uda_cli.data.download.status import (
        dataset_sizes, dataset_status, needs_credentials, print_catalogue, verify_dataset,
    )
    from uda_cli.data.download.transfer import USER_AGENT, candidate_urls, mirror_url

# name -> the module that holds it, loaded on first use
_LAZY = {
    **dict.fromkeys(("ARCHIVE_SUFFIXES", "TAR_SUFFIXES", "safe_extract"), "archives"),
    **dict.fromkeys(("credentials_from_env", "login"), "auth"),
    **dict.fromkeys(("DATASETS", "get_dataset", "list_datasets"), "catalogue"),
    **dict.fromkeys(("SIDECAR", "checksum_kind", "file_checksum", "file_checksums", "verify"), "checksums"),
    "human_size": "common",
    "download": "fetch",
    **dict.fromkeys(("check_disk_space", "space_needed"), "space"),
    **dict.fromkeys(
        ("dataset_sizes", "dataset_status", "needs_credentials", "print_catalogue", "verify_dataset"), "status"
    ),
    **dict.fromkeys(("USER_AGENT", "candidate_urls", "mirror_url"), "transfer"),
}

__all__ = [
    "GB", "MB", "AuditResult", "Credentials", "Dataset", "LoginForm", "Resource",
    "IMAGE_SUFFIXES", "ClassFolderAudit", "PairAudit", "image_file_ok",
    *_LAZY,
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
