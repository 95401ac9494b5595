"""Translate a whole source domain with a trained translator and write it as a dataset.

The export is a folder that ``--src folder:DIR`` reads back (``uda_cli/data/folder.py``):

- classification: ``DIR/<class name>/<index>.png`` (``<index>_<k>.png`` with
  ``--samples-per-image K > 1``), ``index`` being the image's position in the source split;
- ``DIR/manifest.json``: what was exported, from which checkpoint (path and sha256), with
  which settings, and how many images it holds;
- ``DIR/preview.png``: the first source images (top row) above their translations, each row
  named in a left margin ("source", "translated").

Segmentation (LSD-seg's generator, a later issue) plugs in as another :class:`Layout`
(``images/<name>.png`` with the label map copied to ``labels/<name>.png``) and another
batch source; the loop, the resume logic and the manifest stay as they are.

Memory: the split is read once as uint8 at the run's size (60,000 MNIST digits at 32x32 are
61 MB grey, 184 MB colour: less than the float copy of one large batch of a segmentation
run would be) and translated batch by batch; each batch's translations are written and
dropped before the next, so memory does not grow with the export.

Resume: a file that exists (and is not empty) is never written again; a batch whose files
all exist is not even translated. The noise of sample k of image i comes from a generator
seeded by ``(seed, i, k)`` alone, so an interrupted export finished by a second call writes
the same images as an uninterrupted one, whatever the batch size.

Atomic writes: each PNG is written under a hidden temporary name (``.<name>.tmp-<pid>``,
which the folder reader ignores and the next call deletes) and renamed, so a killed export
never leaves half an image. We do not fsync each PNG (a disk flush per image would make a
60,000-image export take minutes of pure waiting); after a power cut a file may come back
empty, and empty files count as missing, so the next call rewrites them. The manifest is
written with a full fsync.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from uda_cli import __version__
from uda_cli.config import AdaptImagesOptions
from uda_cli.data.folder import MANIFEST, read_manifest
from uda_cli.data.registry import DomainSpec, get_domain, load_domain, parse_domain, resolve_split
from uda_cli.data.transforms import denormalize, normalize
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine.runtime import resolve_device
from uda_cli.errors import ConfigError, NotBuiltError
from uda_cli.methods.base import Method, RunSpec
from uda_cli.methods.registry import get_method, list_methods
from uda_cli.viz import Progress
from uda_cli.viz.grids import grid, png_bytes

FORMAT = "uda-export/1"
PREVIEW = "preview.png"
PREVIEW_IMAGES = 16  # columns of the preview grid
PREVIEW_SAMPLES = 4  # at most this many translation rows (samples k) in the preview


@dataclass
class ExportResult:
    out: Path
    total: int  # files this call's export covers (images x samples)
    written: int  # files written by this call
    skipped: int  # files that were already there
    manifest: dict[str, Any]
    preview: Path


# ---- layouts: where each translated image goes -----------------------------------------------

class Layout:
    """Where translation k of source image i goes, and what is already there."""

    pattern: str = ""

    def __init__(self, root: Path, samples: int):
        self.root, self.samples = root, samples

    def relpath(self, index: int, label: int, k: int) -> str:
        raise NotImplementedError

    def prepare(self) -> None:
        raise NotImplementedError

    def existing(self) -> set[str]:
        raise NotImplementedError


class ClassificationLayout(Layout):
    """``<class>/<index>.png``, or ``<class>/<index>_<k>.png`` when K > 1."""

    def __init__(self, root: Path, samples: int, classes: tuple[str, ...]):
        super().__init__(root, samples)
        self.classes = classes
        self.pattern = "<class>/<index>.png" if samples == 1 else "<class>/<index>_<k>.png"

    def relpath(self, index: int, label: int, k: int) -> str:
        name = f"{index}.png" if self.samples == 1 else f"{index}_{k}.png"
        return f"{self.classes[label]}/{name}"

    def prepare(self) -> None:
        ckpt.make_folder(self.root, "the export folder", "pass --out a folder you can write to")
        for c in self.classes:
            ckpt.make_folder(self.root / c)

    def existing(self) -> set[str]:
        """Finished files (non-empty); temporary files of an interrupted call are deleted."""
        done: set[str] = set()
        for c in self.classes:
            folder = self.root / c
            if not folder.is_dir():
                continue
            for e in os.scandir(folder):
                if e.name.startswith(".") and ".tmp-" in e.name:
                    Path(e.path).unlink(missing_ok=True)
                elif e.name.endswith(".png") and e.is_file() and e.stat().st_size > 0:
                    done.add(f"{c}/{e.name}")
        return done


def layout_for(task: str, root: Path, samples: int, spec: DomainSpec) -> Layout:
    if task == "classification":
        return ClassificationLayout(root, samples, spec.classes)
    raise NotBuiltError(f"adapt-images writes {task} exports in a later release (images/ + labels/); classification only so far")


# ---- noise -----------------------------------------------------------------------------------

def image_seed(seed: int, index: int, k: int) -> int:
    """A 63-bit seed for sample k of image i: independent streams, stable across calls."""
    return int(np.random.SeedSequence([seed, index, k]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def noise_fn(method: Method, seed: int) -> Callable[[list[int], int], torch.Tensor] | None:
    """``(indices, k) -> noise [B, ...]`` for methods with a noise input, else None.

    A method has a noise input when it sets ``has_noise_input`` (PixelDA's z). Each
    image's noise is drawn by the method itself (so its distribution stays the method's
    business) from torch's CPU generator seeded by :func:`image_seed`; ``fork_rng`` keeps
    the caller's random state untouched.
    """
    if not method.has_noise_input:
        return None
    sample = method.sample_noise
    like = torch.empty(0)  # CPU: the same numbers whatever device translates

    def draw(indices: list[int], k: int) -> torch.Tensor:
        zs = []
        with torch.random.fork_rng(devices=[]):
            for i in indices:
                torch.manual_seed(image_seed(seed, i, k))
                zs.append(sample(1, like))
        return torch.cat(zs)

    return draw


# ---- checks ------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_translator(weights: Path, meta: dict[str, Any], needed_by: str = "adapt-images") -> None:
    """A one-line error unless the checkpoint's method translates images (``needed_by`` names the reader)."""
    cls = get_method(meta["method"])
    if not cls.translates_images:
        able = [m for m in list_methods() if get_method(m).translates_images]
        raise ConfigError(f"{weights} is a {meta['method']} checkpoint, which does not translate images; "
                          f"{needed_by} needs one of: {', '.join(able)}")


def _check_domain_fits(spec: DomainSpec, split: str, run: RunSpec, weights: Path) -> None:
    where = f"{spec.name}:{split}"
    if spec.task != run.task:
        raise ConfigError(f"{where} is a {spec.task} domain but {weights} was trained on {run.task}; pick a {run.task} domain")
    if spec.classes != run.classes:
        raise ConfigError(f"{where} has classes {list(spec.classes)}, the checkpoint {list(run.classes)}; pick a domain of the same classes")
    if tuple(spec.image_size) != tuple(run.image_size):
        raise ConfigError(f"{where} has {spec.image_size[0]}x{spec.image_size[1]} images, the checkpoint "
                          f"{run.image_size[0]}x{run.image_size[1]}; pick a domain of the run's image size")
    if spec.channels > run.channels and spec.name not in run.domains:
        # Grey into a colour translator is what its run did (grey repeated), and so is colour
        # into a grey one when the run turned that very domain grey (i2i's grayscale=true on
        # SVHN): load_domain makes the same luma images here. Any other colour domain would
        # feed the translator images it never saw.
        raise ConfigError(f"{where} is colour but {weights} translates grey images and was trained on "
                          f"{' and '.join(run.domains) or 'other domains'}; pick a grey source domain or one of those")


def _check_out(out: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The earlier manifest when ``out`` holds a compatible export; None when ``out`` is new or empty.

    Compatible: the same checkpoint (by content), domain, split, seed and samples per image,
    which together decide every image; ``--limit`` and ``--batch-size`` may change.
    """
    if not out.exists() or not any(out.iterdir()):
        return None
    old = read_manifest(out)
    if old is None or old.get("format") != FORMAT:
        raise ConfigError(f"{out} exists and is not a uda export (no {MANIFEST}); pass a new or empty --out")
    if old.get("checkpoint_sha256") != manifest["checkpoint_sha256"]:
        raise ConfigError(f"{out} holds an export of another checkpoint ({old.get('checkpoint', '?')}); "
                          f"pass a new --out, or delete {out} to replace it")
    was, now = f"{old.get('domain')}:{old.get('split')}", f"{manifest['domain']}:{manifest['split']}"
    if was != now:
        raise ConfigError(f"{out} is an export of {was}, not {now}; pass --domain {was} to finish it, or a new --out")
    for key, flag in (("seed", "--seed"), ("samples_per_image", "--samples-per-image")):
        if old.get(key) != manifest[key]:
            raise ConfigError(f"{out} was exported with {flag} {old.get(key)}, not {manifest[key]}; "
                              f"repeat the first call's arguments to finish it, or pass a new --out")
    return old


# ---- writing -----------------------------------------------------------------------------------

def _write_png(path: Path, data: bytes) -> None:
    """Atomic (readers see the whole PNG or none), without fsync: see the module doc."""
    ckpt.atomic_write_bytes(path, data, durable=False)


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _batches(n: int, batch_size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    ckpt.atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def _preview(out: Path, layout: Layout, images: torch.Tensor, labels: list[int], n: int) -> Path:
    """Source images on top, their translations (read back from disk: what was written) below,
    each row named in a left margin ("source", "translated" or "translated k" per sample)."""
    from PIL import Image

    m = min(PREVIEW_IMAGES, n)
    rows = [_nhwc(images[:m])]
    for k in range(min(layout.samples, PREVIEW_SAMPLES)):
        row = []
        for i in range(m):
            with Image.open(layout.root / layout.relpath(i, labels[i], k)) as im:
                a = np.asarray(im)
            row.append(a if a.ndim == 3 else a[:, :, None])
        rows.append(np.stack(row))
    k = len(rows) - 1
    names = ["source"] + (["translated"] if k == 1 else [f"translated {i + 1}" for i in range(k)])
    path = out / PREVIEW
    ckpt.atomic_write_bytes(path, png_bytes(grid(rows, labels=names)))
    return path


def adapt_images(opts: AdaptImagesOptions, interactive: bool | None = None) -> ExportResult:
    from uda_cli.engine.setup import load_method, run_data_root

    weights = ckpt.resolve_checkpoint(opts.target)
    meta = ckpt.read_metadata(weights)
    check_translator(weights, meta)
    opts = opts.model_copy(update={"data_root": run_data_root(opts.data_root, meta)})
    run = RunSpec.from_json(meta["spec"])

    domain_text = opts.domain or meta.get("src") or meta["options"]["src"]
    name, split = parse_domain(domain_text)
    spec = get_domain(name)
    split = resolve_split(spec, split, spec.train_split)
    _check_domain_fits(spec, split, run, weights)

    method_cls = get_method(meta["method"])
    if opts.samples_per_image > 1 and not method_cls.has_noise_input:
        raise ConfigError(f"{meta['method']} has no noise input: every sample would be the same image; "
                          f"use --samples-per-image 1")

    out = opts.out
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "uda_version": __version__,
        "task": run.task,
        "layout": "",
        "checkpoint": str(weights.resolve()),
        "checkpoint_sha256": sha256_file(weights),
        "method": meta["method"],
        "step": meta["step"],
        "config": meta["config"],
        "domain": spec.name,
        "split": split,
        "seed": opts.seed,
        "samples_per_image": opts.samples_per_image,
        "limit": opts.limit,
        "image_size": list(run.image_size),
        "channels": run.channels,
        "classes": list(spec.classes),
        "num_source_images": 0,
        "num_images": 0,
        "complete": False,
    }
    old = _check_out(out, manifest)
    layout = layout_for(run.task, out, opts.samples_per_image, spec)
    manifest["layout"] = layout.pattern

    device = resolve_device(opts.device)
    method, _ = load_method(weights, device)
    # Whole split once, uint8, at the run's channels and size (see the module doc).
    images, labels = load_domain(spec.name, split, opts.data_root, channels=run.channels, size=run.image_size)
    n = images.shape[0] if opts.limit is None else min(opts.limit, images.shape[0])
    label = labels[:n].tolist()  # python ints: looked up once per file below
    manifest["num_source_images"] = n
    manifest["created"] = (old or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z")

    layout.prepare()
    _write_manifest(out, manifest)  # first: a later call recognises an interrupted export
    done = layout.existing()
    draw = noise_fn(method, opts.seed)
    K = opts.samples_per_image
    total, written = n * K, 0
    skipped = sum(1 for i in range(n) for k in range(K) if layout.relpath(i, label[i], k) in done)
    with Progress("translate", total, completed=skipped, interactive=interactive, unit="images") as progress, \
            torch.no_grad():
        for start, end in _batches(n, opts.batch_size):
            idx = list(range(start, end))
            names = {(i, k): layout.relpath(i, label[i], k) for i in idx for k in range(K)}
            todo = {key: p for key, p in names.items() if p not in done}
            if not todo:
                continue  # a finished batch is not even translated
            # fp32, no autocast: images are stored at 8 bits and bf16 (8-bit mantissa) would
            # cost up to a grey level near white; the pass is cheap next to training.
            x = normalize(images[start:end].to(device))
            for k in range(K):
                keys = [(i, k) for i in idx if (i, k) in todo]
                if not keys:
                    continue
                noise = draw(idx, k).to(device) if draw is not None else None
                y = _nhwc(denormalize(method.translate(x, noise).float()).cpu())
                for i, _k in keys:
                    _write_png(out / todo[(i, _k)], png_bytes(y[i - start]))
                written += len(keys)
                progress.advance(len(keys))

    preview = _preview(out, layout, images, label, n)
    manifest["num_images"] = len(layout.existing())
    manifest["complete"] = True
    _write_manifest(out, manifest)
    return ExportResult(out=out, total=total, written=written, skipped=skipped, manifest=manifest, preview=preview)
