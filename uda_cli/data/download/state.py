"""What is already in place, judged from names, sizes and markers, not file contents:
``<file>.part`` for a cut-off transfer, ``.<archive>.extracted`` for an extracted archive
(its checksums and the files it held, with their sizes)."""

from __future__ import annotations

import json
from pathlib import Path

from uda_cli.data.download.checksums import _static_checksum
from uda_cli.data.download.types import Resource


def _part_path(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def _marker_path(archive: Path) -> Path:
    return archive.with_name(f".{archive.name}.extracted")


def _done(resource: Resource, folder: Path) -> bool:
    """Already in place, judged without reading file contents (markers, names and sizes)."""
    target = folder / resource.filename
    if resource.extract:
        return _marker_ok(_marker_path(target), resource, folder)
    if not target.is_file():
        return False
    return resource.size is None or target.stat().st_size == resource.size


def _marker_files(record: dict, resource: Resource) -> dict[str, int | None]:
    """The files a marker lists that ``resource`` owns, with their sizes (None: not recorded)."""
    files = record.get("files", [])
    listed = files.items() if isinstance(files, dict) else ((name, None) for name in files)
    owned = tuple(p.rstrip("/") + "/" for p in resource.owns)
    return {name: size for name, size in listed if not owned or name.startswith(owned)}


def _read_marker(marker: Path) -> dict | None:
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _marker_ok(marker: Path, resource: Resource, folder: Path) -> bool:
    record = _read_marker(marker)
    if record is None:
        return False
    expected = _static_checksum(resource, folder)
    if expected is not None and record.get(expected[0]) != expected[1]:
        return False
    for name, size in _marker_files(record, resource).items():
        path = folder / name
        try:
            if not path.is_file() or (size is not None and path.stat().st_size != size):
                return False
        except OSError:
            return False
    return True
