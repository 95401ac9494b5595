"""Free space: a download that would not fit on the disk does not start."""

from __future__ import annotations

import shutil
from pathlib import Path

from uda_cli.data.download.common import human_size
from uda_cli.data.download.state import _done, _part_path
from uda_cli.data.download.types import Dataset
from uda_cli.errors import DownloadError


def space_needed(ds: Dataset, folder: Path, include_optional: bool = True, force: bool = False) -> int:
    """Bytes of free space the missing part of ``ds`` needs at its peak (an estimate where sizes are).

    Files are fetched one after the other, and an archive is deleted once extracted, so the
    peak is while the last archive still sits beside everything extracted so far: the sum of
    what each file adds on disk (extracted size for an archive, the file for the rest) plus the
    largest archive still to fetch. An archive already on disk (put there by hand) needs only
    the room for its contents; a ``.part`` needs only its remaining bytes.
    """
    peak = kept = 0
    for r in ds.resources:
        if not r.required and not include_optional:
            continue
        done = _done(r, folder)
        if done and not force:
            continue
        target = folder / r.filename
        fetch = 0
        if force or not target.exists():
            part = _part_path(target)
            have = part.stat().st_size if (part.exists() and not force) else 0
            fetch = max(0, r.download_size - have)
        grows = 0 if done else r.unpacked_size  # a forced redo overwrites files in place
        if r.extract:
            peak = max(peak, kept + fetch + grows)
            kept += grows
        else:
            peak = max(peak, kept + fetch)  # a forced redo fetches beside the old file
            kept += 0 if done else fetch
    return peak


def check_disk_space(ds: Dataset, folder: Path, include_optional: bool = True, force: bool = False) -> None:
    """Refuse (a one-line DownloadError) when the free space under ``folder`` is too small."""
    need = space_needed(ds, folder, include_optional, force)
    if not need:
        return
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise DownloadError(
            f"{ds.name} needs about {human_size(need)} of free disk space under {probe} "
            f"(its archives and their extracted files), but only {human_size(free)} is free; "
            "free some space or pass another --data-root"
        )
