"""Safe extraction of tar, zip and rar archives (every member checked before anything is
written), and the marker an extracted archive leaves behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from uda_cli.data.download.common import CHUNK, _describe, _local, _say
from uda_cli.data.download.state import _marker_path
from uda_cli.data.download.types import Resource
from uda_cli.errors import DownloadError

if TYPE_CHECKING:
    from rich.console import Console

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ARCHIVE_SUFFIXES = (*TAR_SUFFIXES, ".zip", ".rar")

# External unpackers for RAR, in order of preference: (program, list args, extract args).
# Each lists member names one per line ("Path = NAME" for 7z) and extracts into {dest}.
RAR_TOOLS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("bsdtar", ("-tf", "{archive}"), ("-xf", "{archive}", "-C", "{dest}")),
    ("unrar", ("lb", "{archive}"), ("x", "-o+", "-idq", "{archive}", "{dest}/")),
    ("7z", ("l", "-ba", "-slt", "{archive}"), ("x", "-y", "-o{dest}", "{archive}")),
)


class _KeepArchive(DownloadError):
    """Extraction could not start (no unpacker): the verified archive stays for the next run."""


def _extract_and_mark(
    archive: Path, folder: Path, resource: Resource, console: Console, label: str, digests: dict[str, str]
) -> None:
    """Extract a verified archive, record it in its marker, then delete the archive.

    The archive goes once extracted (GTA5's would double the 58 GB it takes); the marker
    keeps its checksums and file list with sizes, so a re-run skips it while those files
    exist. If extraction stops half-way, there is no marker and the archive is still there,
    so a re-run extracts again.
    """
    _say(console, f"{label}: extracting {archive.name}")
    try:
        files = safe_extract(archive, folder, into=resource.into)
    except _KeepArchive:
        raise
    except DownloadError as e:
        archive.unlink(missing_ok=True)  # an unsafe or unreadable archive is of no use here
        raise DownloadError(f"{e}; the archive was deleted") from None
    marker = _marker_path(archive)
    tmp = marker.with_name(marker.name + ".tmp")
    sizes = {}
    for name in files:
        with _local(folder / name, "read"):
            sizes[name] = (folder / name).stat().st_size
    with _local(marker, "write"):
        tmp.write_text(json.dumps({**digests, "files": sizes}))
        os.replace(tmp, marker)
    archive.unlink()
    _say(console, f"{label}: {archive.name} extracted ({len(files):,} files)")


def safe_extract(archive: Path, dest: Path, into: str = "") -> list[str]:
    """Extract a tar, zip or rar archive into ``dest``; return the regular files it wrote.

    Every member is checked before anything is written: an absolute path, a ``..``
    component, a path that resolves outside ``dest`` (through a link already on disk, say),
    a symlink, a hard link or a device/fifo refuses the whole archive with a
    :class:`DownloadError` naming the member. Backslashes in member names (archives made on
    Windows) are folder separators. ``into``: members not already under that folder go into it.
    """
    name = archive.name.lower()
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        if name.endswith(".zip"):
            return _extract_zip(archive, root, into)
        if name.endswith(TAR_SUFFIXES):
            return _extract_tar(archive, root, into)
        if name.endswith(".rar"):
            return _extract_rar(archive, root, into)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise DownloadError(f"{archive.name} is not a readable archive ({_describe(e)}); fetch it again") from None
    except OSError as e:
        raise DownloadError(f"could not extract {archive.name} into {dest}: {_describe(e)}") from None
    kinds = ", ".join(ARCHIVE_SUFFIXES)
    raise DownloadError(f"{archive.name}: unknown archive type; expected one of {kinds}")


def _refuse(archive: Path, member: str, why: str) -> DownloadError:
    return DownloadError(
        f"refusing to extract {archive.name}: member {member!r} {why}; nothing was extracted"
    )


def _clean_name(member: str) -> str:
    return member.replace("\\", "/")


def _prefixer(names: list[str], into: str) -> Callable[[str], str]:
    """``into`` given: a function putting names under it, unless all already are."""
    into = into.strip("/")
    if not into:
        return lambda n: n
    clean = [_clean_name(n).removeprefix("./") for n in names]
    if all(n == into or n.startswith(into + "/") for n in clean if n and n != "."):
        return lambda n: n
    return lambda n: f"{into}/{n}"


def _member_path(archive: Path, root: Path, member: str, display: str | None = None) -> Path:
    """Where ``member`` would land under ``root``, or a DownloadError if that is unsafe."""
    shown = member if display is None else display
    clean = _clean_name(member)
    parts = clean.split("/")
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean):
        raise _refuse(archive, shown, "has an absolute path")
    if ".." in parts:
        raise _refuse(archive, shown, "has a '..' component")
    path = (root / clean).resolve()  # follows links already on disk
    if path != root and root not in path.parents:
        raise _refuse(archive, shown, "would land outside the target folder")
    return path


def _write_member(src, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)


def _extract_tar(archive: Path, root: Path, into: str = "") -> list[str]:
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        # The absolute-path and '..' checks look at the name as stored; `into` only prefixes.
        put = _prefixer([m.name for m in members], into)
        plan: list[tuple[tarfile.TarInfo, Path]] = []
        for m in members:
            if m.issym() or m.islnk():
                raise _refuse(archive, m.name, "is a link")
            if not (m.isfile() or m.isdir()):
                raise _refuse(archive, m.name, "is a device, fifo or other special file")
            _member_path(archive, root, m.name)
            plan.append((m, _member_path(archive, root, put(_clean_name(m.name)), m.name)))
        # We write the bytes ourselves rather than call extractall: no owners, modes or
        # times are taken from the archive, only regular files and folders.
        files = []
        for m, path in plan:
            if m.isdir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            src = tar.extractfile(m)
            assert src is not None  # regular files always have a payload
            with src:
                _write_member(src, path)
            files.append(path.relative_to(root).as_posix())
        return files


def _extract_zip(archive: Path, root: Path, into: str = "") -> list[str]:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        put = _prefixer([i.filename for i in infos], into)
        plan: list[tuple[zipfile.ZipInfo, Path]] = []
        for info in infos:
            mode = info.external_attr >> 16  # Unix mode, when the archiver recorded one
            if stat.S_ISLNK(mode):
                raise _refuse(archive, info.filename, "is a link")
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise _refuse(archive, info.filename, "is a device, fifo or other special file")
            _member_path(archive, root, info.filename)
            plan.append((info, _member_path(archive, root, put(_clean_name(info.filename)), info.filename)))
        files = []
        for info, path in plan:
            if info.is_dir() or info.filename.endswith("\\"):
                path.mkdir(parents=True, exist_ok=True)
                continue
            # zipfile checks each member's CRC-32 as it reads: a damaged member raises
            # BadZipFile, so an archive with no published checksum is still checked here.
            with zf.open(info) as src:
                _write_member(src, path)
            files.append(path.relative_to(root).as_posix())
        return files


def _rar_tool() -> tuple[str, tuple[str, ...], tuple[str, ...]] | None:
    for program, list_args, extract_args in RAR_TOOLS:
        path = program if os.path.isabs(program) and os.access(program, os.X_OK) else shutil.which(program)
        if path:
            return path, list_args, extract_args
    return None


def _run_tool(cmd: list[str], archive: Path) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
    except OSError as e:
        raise _KeepArchive(f"could not run {cmd[0]} to unpack {archive.name}: {_describe(e)}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["no message"])[-1]
        raise DownloadError(f"{Path(cmd[0]).name} could not unpack {archive.name}: {last}")
    return done.stdout


def _extract_rar(archive: Path, root: Path, into: str = "") -> list[str]:
    """RAR needs an external unpacker. Its listing is checked first, like a tar's; it then
    unpacks into a staging folder inside ``root``, which is walked (links refused, Windows
    backslash names turned into folders) before anything moves into place."""
    tool = _rar_tool()
    if tool is None:
        names = ", ".join(p for p, _, _ in RAR_TOOLS)
        raise _KeepArchive(
            f"{archive.name} is a RAR archive, which Python cannot unpack: install one of {names} "
            "(e.g. apt install libarchive-tools, which provides bsdtar) and run the command again; "
            "the verified archive was kept"
        )
    program, list_args, extract_args = tool
    fill = lambda args, dest="": [a.format(archive=str(archive), dest=dest) for a in args]  # noqa: E731
    listing = _run_tool([program, *fill(list_args)], archive)
    names = []
    for line in listing.splitlines():
        if Path(program).name.startswith("7z"):
            if not line.startswith("Path = "):
                continue
            line = line[len("Path = "):]
            if line == str(archive):
                continue
        if line.strip():
            names.append(line.rstrip("\r\n"))
    for n in names:
        _member_path(archive, root, n)
    stage = root / f".unpacking-{archive.name}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        _run_tool([program, *fill(extract_args, str(stage))], archive)
        found: list[tuple[Path, str]] = []
        for dirpath, dirnames, filenames in os.walk(stage):
            for n in [*dirnames, *filenames]:
                p = Path(dirpath) / n
                st = p.lstat()
                rel = p.relative_to(stage).as_posix()
                if stat.S_ISLNK(st.st_mode):
                    raise _refuse(archive, rel, "is a link")
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                    raise _refuse(archive, rel, "is a device, fifo or other special file")
                if stat.S_ISREG(st.st_mode):
                    found.append((p, rel))
        put = _prefixer([rel for _, rel in found], into)
        plan = [(p, _member_path(archive, root, put(_clean_name(rel)), rel)) for p, rel in found]
        files = []
        for p, path in plan:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, path)
            files.append(path.relative_to(root).as_posix())
        return files
    finally:
        shutil.rmtree(stage, ignore_errors=True)
