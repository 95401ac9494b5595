"""``--list`` and ``--verify``: what is under the data root, without downloading."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from uda_cli.data.download.audit import _examples
from uda_cli.data.download.catalogue import _resolve, get_dataset, list_datasets
from uda_cli.data.download.checksums import _static_checksum, checksum_kind, file_checksum
from uda_cli.data.download.common import _say, human_size
from uda_cli.data.download.state import _done, _marker_files, _marker_path, _part_path, _read_marker
from uda_cli.data.download.types import Dataset
from uda_cli.errors import DataError

if TYPE_CHECKING:
    from rich.console import Console


def dataset_status(dataset: str | Dataset, data_root: Path | str) -> str:
    """One phrase for ``--list``, from markers, names and sizes (no file is read):
    ``verified``, ``partial: 3 of 20 files``, ``downloaded, not extracted`` or ``absent``."""
    ds = _resolve(dataset)
    folder = Path(data_root) / ds.folder
    if not folder.is_dir():
        return "absent"
    required = [r for r in ds.resources if r.required]
    done = [r for r in required if _done(r, folder)]
    waiting = [r for r in required if r not in done and (folder / r.filename).exists()]
    cut = [r for r in required if r not in done and _part_path(folder / r.filename).exists()]
    if len(done) == len(required):
        return "present, verified"
    if not done and not waiting and not cut:
        return "absent"
    text = f"partial: {len(done)} of {len(required)} files"
    if waiting:
        text += f", {len(waiting)} downloaded but not verified or extracted"
    if cut:
        text += f", {len(cut)} cut off (resumable)"
    return text


def dataset_sizes(ds: Dataset) -> tuple[str, str]:
    """(download, on disk) in words, marked ``≈`` where the sizes are estimates."""
    exact = all(r.size for r in ds.resources if r.required)
    mark = "" if exact else "≈"
    fetch = sum(r.download_size for r in ds.resources if r.required)
    disk = sum(r.unpacked_size for r in ds.resources if r.required)
    return mark + human_size(fetch), mark + human_size(disk)


def print_catalogue(data_root: Path | str, names: Iterable[str] = (), console: Console | None = None) -> None:
    """What ``uda download --list`` prints: a short block per dataset (plain lines, so that
    a narrow terminal wraps them cleanly and grep finds them)."""
    from rich.console import Console

    console = console or Console()
    _say(console, f"datasets under {data_root} (≈: estimated size; status from the files' markers, "
                  "`uda download NAME --verify` re-reads them)")
    for name in (list(names) or list_datasets()):
        ds = get_dataset(name)
        fetch, disk = dataset_sizes(ds)
        _say(console, "")
        _say(console, f"{ds.name}  {dataset_status(ds, data_root)}", "bold")
        _say(console, f"  size       {fetch} to download, {disk} on disk")
        _say(console, f"  checksums  {checksum_kind(ds)}")
        if ds.login is not None:
            _say(console, f"  access     {ds.login.site} login: set {ds.login.user_env} and {ds.login.password_env}, "
                          f"or put the zips in {Path(data_root) / ds.folder}/")
        elif not any(r.urls for r in ds.resources):
            _say(console, "  access     --mirror only (no public URL)")
        _say(console, f"  licence    {ds.licence}")
        if ds.description:
            _say(console, f"  about      {ds.description}")


def verify_dataset(
    dataset: str | Dataset, data_root: Path | str, console: Console | None = None, include_optional: bool = True
) -> Path:
    """Audit the copy under ``data_root`` without downloading: every file against its checksum
    (published, or recorded at first download), every extracted file against the size its
    marker recorded, then the dataset's own audit. Raises :class:`DataError` (one line) listing
    the first problem and how many there are."""
    from rich.console import Console

    ds = _resolve(dataset)
    console = console or Console(stderr=True)
    folder = Path(data_root) / ds.folder
    repair = f"run: uda download {ds.name} --data-root {data_root}"
    if not folder.is_dir():
        raise DataError(f"{ds.name} is not in {data_root} (no folder {folder}); {repair}")
    problems: list[str] = []
    for r in ds.resources:
        if not r.required and not include_optional:
            continue
        target = folder / r.filename
        marker = _marker_path(target)
        expected = _static_checksum(r, folder)
        how = expected[2] if expected else "no checksum known"
        if r.extract and marker.exists():
            record = _read_marker(marker) or {}
            if expected is not None and record.get(expected[0]) != expected[1]:
                problems.append(f"{r.filename}: extracted from an archive whose {expected[0]} is not the {how}")
                continue
            missing, changed = [], []
            for name, size in _marker_files(record, r).items():
                path = folder / name
                if not path.is_file():
                    missing.append(name)
                elif size is not None and path.stat().st_size != size:
                    changed.append(name)
            if missing:
                problems.append(f"{r.filename}: {len(missing):,} extracted files missing (e.g. {_examples(missing)})")
            if changed:
                problems.append(f"{r.filename}: {len(changed):,} extracted files changed size "
                                f"(e.g. {_examples(changed)})")
            if not missing and not changed:
                _say(console, f"{ds.name}: {r.filename} extracted, its files in place ({how})")
        elif target.is_file():
            if expected is None:
                problems.append(f"{r.filename}: present but never checked (no checksum known); {repair}")
                continue
            if file_checksum(target, expected[0]) != expected[1]:
                problems.append(f"{r.filename}: does not match its {how}")
            elif r.extract:
                problems.append(f"{r.filename}: verified but not extracted")
            else:
                _say(console, f"{ds.name}: {r.filename} verified ({how})")
        elif _part_path(target).exists():
            problems.append(f"{r.filename}: download cut off at {_part_path(target).stat().st_size:,} bytes")
        elif not r.required:
            _say(console, f"{ds.name}: optional {r.filename} absent")
        else:
            problems.append(f"{r.filename}: missing")
    if ds.audit is not None:
        result = ds.audit(folder)
        _say(console, f"{ds.name}: audit: {result.summary()}", None if result.ok else "red")
        if not result.ok:
            problems.append(f"audit: {result.summary()}")
    if problems:
        for p in problems:
            _say(console, f"{ds.name}: {p}", "red")
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{ds.name} in {folder} failed verification: {problems[0]}{more}; {repair}")
    _say(console, f"{ds.name}: verified in {folder}", "green")
    return folder


def needs_credentials(dataset: str | Dataset, data_root: Path | str, include_optional: bool = True) -> bool:
    """True when a download would have to log in: some file behind the login is neither in
    place nor put in the folder by hand."""
    ds = _resolve(dataset)
    if ds.login is None:
        return False
    folder = Path(data_root) / ds.folder
    for r in ds.resources:
        if not r.required and not include_optional:
            continue
        if not _done(r, folder) and not (folder / r.filename).exists():
            if any(u.startswith(ds.login.protects) for u in r.urls):
                return True
    return False
