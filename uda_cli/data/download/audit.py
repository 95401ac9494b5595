"""A dataset's own audit, run after a download and by ``--verify``: it counts what the
readers will find (image/label pairs, images per domain) and names missing and unreadable
files. Declared beside each dataset (``audit=PairAudit(...)``); standard library only."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from uda_cli.data.download.types import AuditResult

_EXAMPLES = 3  # example file names quoted per kind of problem


def _examples(names: list[str]) -> str:
    shown = ", ".join(names[:_EXAMPLES])
    return shown + (", ..." if len(names) > _EXAMPLES else "")


@dataclass(frozen=True)
class PairAudit:
    """Counts image/label pairs: ``<images>/**/<key><image_suffix>`` with
    ``<labels>/**/<key><label_suffix>``, the key being the path below the folder. A file
    is unreadable when its PNG/JPEG framing is broken (a truncated or unfinished file)."""

    images: str
    image_suffix: str
    labels: str
    label_suffix: str
    expected: int

    def __call__(self, folder: Path) -> AuditResult:
        imgs = _keyed(folder / self.images, self.image_suffix)
        lbls = _keyed(folder / self.labels, self.label_suffix)
        both = sorted(imgs.keys() & lbls.keys())
        no_label = sorted(imgs.keys() - lbls.keys())
        no_image = sorted(lbls.keys() - imgs.keys())
        bad, bad_keys = [], set()
        for k in both:
            for p in (imgs[k], lbls[k]):
                if not image_file_ok(p):
                    bad.append(p)
                    bad_keys.add(k)
        problems = []
        if no_label:
            problems.append(f"{len(no_label):,} images without a label (e.g. {_examples([imgs[k].name for k in no_label])})")
        if no_image:
            problems.append(f"{len(no_image):,} labels without an image (e.g. {_examples([lbls[k].name for k in no_image])})")
        if bad:
            rel = [p.relative_to(folder).as_posix() for p in bad]
            problems.append(f"{len(bad):,} unreadable files (e.g. {_examples(rel)})")
        if not problems and len(both) != self.expected:
            problems.append(f"expected {self.expected:,} pairs")
        return AuditResult("image/label pairs", len(both) - len(bad_keys), self.expected, tuple(problems))


def _keyed(root: Path, suffix: str) -> dict[str, Path]:
    if not root.is_dir():
        return {}
    out = {}
    for p in root.rglob(f"*{suffix}"):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            out[rel[: -len(suffix)]] = p
    return out


@dataclass(frozen=True)
class ClassFolderAudit:
    """Counts images in ``<domain>/<under>/<class>/`` for each domain (Office-31)."""

    domains: tuple[tuple[str, int], ...]  # (folder, expected images)
    classes: int
    under: str = "images"

    def __call__(self, folder: Path) -> AuditResult:
        found, problems = 0, []
        expected = sum(n for _, n in self.domains)
        for domain, n in self.domains:
            root = folder / domain / self.under
            if not root.is_dir():
                problems.append(f"{domain}: folder {root} missing")
                continue
            classes = sorted(p for p in root.iterdir() if p.is_dir())
            files = [f for c in classes for f in sorted(c.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
            bad = [f for f in files if not image_file_ok(f)]
            found += len(files) - len(bad)
            if len(classes) != self.classes:
                problems.append(f"{domain}: {len(classes)} class folders, expected {self.classes}")
            if len(files) != n:
                problems.append(f"{domain}: {len(files):,} images, expected {n:,}")
            if bad:
                problems.append(f"{domain}: {len(bad)} unreadable images (e.g. "
                                f"{_examples([f.relative_to(folder).as_posix() for f in bad])})")
        return AuditResult("images", found, expected, tuple(problems))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_file_ok(path: Path) -> bool:
    """A cheap readability check that needs no decoding: a PNG starts with its signature and an
    IHDR chunk and ends with IEND; a JPEG starts with SOI and has an EOI in its last KiB. This
    catches truncated and unfinished files (the usual damage) in microseconds per file."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if head.startswith(_PNG_SIGNATURE):
                if head[12:16] != b"IHDR":
                    return False
                f.seek(0, os.SEEK_END)
                if f.tell() < 57:  # signature + IHDR + IEND
                    return False
                f.seek(-12, os.SEEK_END)
                return f.read(12)[4:8] == b"IEND"
            if head.startswith(b"\xff\xd8\xff"):
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 1024))
                return b"\xff\xd9" in f.read()
    except OSError:
        return False
    return False
