"""Checksums: the published ones (sha256 or md5, declared with each resource) and, where none
is published, the sha256 recorded at first download in ``.uda-sha256.json`` (trust on first
use)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from uda_cli.data.download.common import CHUNK, _local
from uda_cli.data.download.types import Dataset, Resource

SIDECAR = ".uda-sha256.json"  # first-use sha256s of files that have no published checksum


def file_checksum(path: Path, algorithm: str) -> str:
    return file_checksums(path, (algorithm,))[algorithm]


def file_checksums(path: Path, algorithms: Iterable[str]) -> dict[str, str]:
    """Several digests in one pass over the file."""
    hashes = {a: hashlib.new(a, usedforsecurity=False) for a in dict.fromkeys(algorithms)}
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            for h in hashes.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hashes.items()}


def verify(path: Path, resource: Resource) -> bool:
    """True when ``path`` matches the resource's published checksum (False when none is published)."""
    if resource.checksum is None:
        return False
    algorithm, expected = resource.checksum
    return path.is_file() and file_checksum(path, algorithm) == expected


def _recorded(folder: Path) -> dict[str, str]:
    """First-use sha256s recorded in the dataset folder: file name -> sha256."""
    try:
        record = json.loads((folder / SIDECAR).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in record.items() if isinstance(v, str)} if isinstance(record, dict) else {}


def _record(folder: Path, filename: str, sha256: str) -> None:
    record = _recorded(folder)
    record[filename] = sha256
    path = folder / SIDECAR
    tmp = path.with_name(path.name + ".tmp")
    with _local(path, "write"):
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)


def _remember(folder: Path, resource: Resource, digests: dict[str, str]) -> None:
    """Record the sha256 of a file checked against a checksum read from its site (Cityscapes'
    md5), so that a later --verify, which stays offline, has something to compare with."""
    if not resource.checksum and resource.filename not in _recorded(folder):
        _record(folder, resource.filename, digests["sha256"])


def _static_checksum(resource: Resource, folder: Path) -> tuple[str, str, str] | None:
    """The checksum known without the network: ``(algorithm, digest, where it comes from)``."""
    if resource.checksum:
        algorithm, digest = resource.checksum
        return algorithm, digest, algorithm
    recorded = _recorded(folder).get(resource.filename)
    if recorded:
        return "sha256", recorded, "sha256 recorded at first download"
    return None


def checksum_kind(ds: Dataset) -> str:
    """What guards the dataset's files, in words (for --list)."""
    kinds = []
    for r in ds.resources:
        if r.checksum:
            kinds.append(r.checksum[0])
        elif r.md5_url:
            kinds.append("md5 read from the site after login")
        else:
            kinds.append(f"unverified: {r.unpublished} (sha256 recorded on first download)")
    return "; ".join(dict.fromkeys(kinds))
