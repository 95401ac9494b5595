"""Translate a whole source domain with a trained translator and write it as a dataset.

The export is a folder that ``--src folder:DIR`` reads back (``uda_cli/data/folder.py``):

- classification: ``DIR/<class name>/<index>.png`` (``<index>_<k>.png`` with
  ``--samples-per-image K > 1``), ``index`` being the image's position in the source split;
- segmentation (LSD-seg's G(F(x)), i2i's g_y(f_x(x)): any method with ``translates_images`` whose
  ``translate(x, noise)`` returns an image of x's size): ``DIR/images/<stem>.png`` (the
  translation, RGB), ``DIR/labels/<stem>.png`` (the source scene's train ids carried over,
  one channel, 255 where ignored, resized by nearest to the export size) and
  ``DIR/classes.json`` (the source's class names, ids ``0..K-1``, ignore ``[255]``, and its
  palette as ``colors`` when it has one); ``stem`` is the source sample's own (``00001``,
  ``aachen_000000_000019``, ``scene-000000``). Scenes are written at the size the run read
  that domain at (config.json ``sizes``: the run's source at its ``--src-size``, any other
  domain at its ``--tgt-size``, as ``uda tsne`` reads them) or at ``--size WxH``; each side
  must be at least twice the network's coarsest feature stride (a smaller map cannot be
  decoded back into an image). One translation per scene;
- ``DIR/manifest.json``: what was exported, from which checkpoint (path and sha256), with
  which settings (size included), and how many images (scenes) it holds;
- ``DIR/preview.png``: the first source images (top row) above their translations, each row
  named in a left margin ("source", "translated"); for segmentation, a few scenes with their
  labels overlaid in the class colours on both rows, cells at most 256 pixels on a side.

Memory: a classification split is read once as uint8 at the run's size (60,000 MNIST digits
at 32x32 are 61 MB grey, 184 MB colour: less than the float copy of one large batch of a
segmentation run would be) and translated batch by batch; each batch's translations are
written and dropped before the next, so memory does not grow with the export. A
segmentation split is never held whole: a ``DataLoader`` (``--workers``) streams the scenes
still to write from disk, resized to the export size, batch by batch (about a megapixel a
batch by default), and each batch is translated, written and dropped.

Resume: a file that exists (and is not empty) is never written again; a batch whose files
all exist is not even translated. A segmentation scene counts as done when both its image
and its label exist; a missing label alone is copied again without translating. The noise
of sample k of image i comes from a generator seeded by ``(seed, i, k)`` alone, so an
interrupted export finished by a second call writes the same images as an uninterrupted
one, whatever the batch size. A second call must name the same checkpoint (by content),
domain, split, seed, samples per image and size; anything else is refused in one line.

Atomic writes: each PNG is written under a hidden temporary name (``.<name>.tmp-<pid>``,
which the folder reader ignores and the next call deletes) and renamed, so a killed export
never leaves half an image. We do not fsync each PNG (a disk flush per image would make a
60,000-image export take minutes of pure waiting); after a power cut a file may come back
empty, and empty files count as missing, so the next call rewrites them. The manifest (and
``classes.json``) is written with a full fsync.
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
from uda_cli.errors import ConfigError, NotBuiltError, UDAError
from uda_cli.methods.base import Method, RunSpec
from uda_cli.methods.registry import get_method, list_methods
from uda_cli.viz import Progress
from uda_cli.viz.grids import grid, png_bytes

FORMAT = "uda-export/1"
PREVIEW = "preview.png"
PREVIEW_IMAGES = 16  # columns of the preview grid
PREVIEW_SAMPLES = 4  # at most this many translation rows (samples k) in the preview
PREVIEW_SCENES = 4  # columns of a segmentation preview
PREVIEW_SIDE = 256  # a segmentation preview's cells are at most this many pixels on a side
OVERLAY_ALPHA = 0.5  # the label colours' weight over the image in a segmentation preview
CLASSIFICATION_BATCH = 256
MIN_SIDE_STRIDES = 2  # each side of a segmentation export at least this many coarsest feature strides


@dataclass
class ExportResult:
    out: Path
    total: int  # files this call's export covers (images x samples)
    written: int  # files written by this call
    skipped: int  # files that were already there
    manifest: dict[str, Any]
    preview: Path


# ---- layouts: where each translated image goes -----------------------------------------------

def finished_pngs(folder: Path) -> set[str]:
    """Names (without ``.png``) of the finished (non-empty) PNGs in ``folder``; temporary files
    of an interrupted call (``.<name>.tmp-<pid>``) are deleted. A missing folder holds none."""
    done: set[str] = set()
    if not folder.is_dir():
        return done
    for e in os.scandir(folder):
        if e.name.startswith(".") and ".tmp-" in e.name:
            Path(e.path).unlink(missing_ok=True)
        elif e.name.endswith(".png") and e.is_file() and e.stat().st_size > 0:
            done.add(e.name[: -len(".png")])
    return done


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
        return {f"{c}/{name}.png" for c in self.classes for name in finished_pngs(self.root / c)}


class SegmentationLayout(Layout):
    """``images/<stem>.png`` (the translation) beside ``labels/<stem>.png`` (the source's
    labels), one translation per scene; a scene is done when both files are."""

    pattern = "images/<stem>.png + labels/<stem>.png"
    folders = ("images", "labels")

    def __init__(self, root: Path):
        super().__init__(root, 1)

    def image(self, stem: str) -> str:
        return f"images/{stem}.png"

    def label(self, stem: str) -> str:
        return f"labels/{stem}.png"

    def prepare(self) -> None:
        ckpt.make_folder(self.root, "the export folder", "pass --out a folder you can write to")
        for f in self.folders:
            ckpt.make_folder(self.root / f)

    def existing_files(self) -> dict[str, set[str]]:
        """``{"images": stems, "labels": stems}`` of the finished (non-empty) files; temporary
        files of an interrupted call are deleted."""
        return {f: finished_pngs(self.root / f) for f in self.folders}

    def existing(self) -> set[str]:
        """Stems whose image and label are both written."""
        files = self.existing_files()
        return files["images"] & files["labels"]


def layout_for(task: str, root: Path, samples: int, spec: DomainSpec) -> Layout:
    if task == "classification":
        return ClassificationLayout(root, samples, spec.classes)
    if task == "segmentation":
        return SegmentationLayout(root)
    raise NotBuiltError(f"adapt-images does not write {task} exports; it writes classification and segmentation ones")


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
    if run.task == "segmentation":
        return  # scenes are RGB and resized to the export size (--size)
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
    was_size = old.get("image_size")
    if isinstance(was_size, list) and len(was_size) == 2 and was_size != manifest["image_size"]:
        wh = lambda hw: f"{hw[1]}x{hw[0]}"  # noqa: E731
        raise ConfigError(f"{out} was exported at {wh(was_size)}, not {wh(manifest['image_size'])}; pass --size "
                          f"{wh(was_size)} to finish it, or a new --out")
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


# ---- segmentation ------------------------------------------------------------------------------

def export_size(opts: AdaptImagesOptions, meta: dict[str, Any], run: RunSpec, spec: DomainSpec) -> tuple[int, int]:
    """(H, W) a segmentation export is written at: ``--size``, else the size the run read that
    domain at (its source at ``--src-size``, any other domain at ``--tgt-size``), as ``uda tsne``
    resolves it from config.json ``sizes``."""
    from uda_cli.config import parse_size
    from uda_cli.viz.tsne import _run_sizes

    if opts.size:
        return parse_size(opts.size)
    sizes = _run_sizes(meta, run)
    run_src = parse_domain(meta.get("src") or meta["options"]["src"])[0]
    return tuple(sizes["src"] if spec.name == run_src else sizes["tgt"])


def min_side(method: Method) -> int:
    """The smallest side a segmentation translator takes: ``MIN_SIDE_STRIDES`` times the
    coarsest stride of its networks' feature maps (``embed_layout``; 8 when none says), so the
    coarsest map is at least 2x2 (instance norm needs more than one value; G decodes from it
    and resizes to any size above). A method may set ``min_translate_side`` itself."""
    own = getattr(method, "min_translate_side", None)
    if own:
        return int(own)
    strides = [int(st) for net in method.nets.values() if hasattr(net, "embed_layout")
               for _n, _c, st in net.embed_layout()]
    return MIN_SIDE_STRIDES * max(strides, default=8)


def check_size(method: Method, size: tuple[int, int], given: str | None, weights: Path) -> None:
    """One line when ``size`` (H, W) is smaller than the network takes."""
    m = min_side(method)
    h, w = size
    if h >= m and w >= m:
        return
    f = m / min(h, w)
    hint = f"{max(m, round(w * f))}x{max(m, round(h * f))}"
    if given:
        raise ConfigError(f"--size {given} is too small for {weights}'s network: each side must be at least {m} "
                          f"pixels (twice its coarsest feature stride); pass e.g. --size {hint}")
    raise ConfigError(f"the run's size {w}x{h} is too small for its network's translation (each side at least {m} "
                      f"pixels); pass e.g. --size {hint}")


def export_stems(source, n: int) -> list[str]:
    """File stems of the first ``n`` samples: the source's own, made safe as one file name
    (no ``/``, no leading ``.``); two samples of one name are a one-line error."""
    from uda_cli.errors import DataError

    names: list[str] = []
    seen: dict[str, int] = {}
    for i in range(n):
        stem = str(source.stem(i)).replace("/", "_").replace("\\", "_")
        if not stem or stem.startswith("."):
            stem = f"_{stem}"
        if stem in seen:
            raise DataError(f"{source.name}: samples {seen[stem]} and {i} are both named {stem!r}, so their files "
                            "would overwrite each other; export a split whose samples have distinct names")
        seen[stem] = i
        names.append(stem)
    return names


def class_palette(spec: DomainSpec) -> tuple[tuple[int, int, int], ...]:
    """The colours classes are drawn in: the domain's palette, Cityscapes' for its 19 classes,
    else the PASCAL VOC colour map (as ``uda evaluate --save-predictions`` draws them)."""
    from uda_cli.data import labels as L
    from uda_cli.engine.seg_eval import voc_palette

    k = len(spec.classes)
    if len(spec.palette) >= k:
        return tuple(tuple(int(v) for v in c) for c in spec.palette[:k])
    if tuple(spec.classes) == L.CITYSCAPES_CLASSES:
        return L.CITYSCAPES_PALETTE
    return voc_palette(k)


def _write_classes(out: Path, spec: DomainSpec) -> None:
    """``classes.json``: the source's names as train ids 0..K-1, 255 ignored, its palette if any."""
    from uda_cli.data.folder import CLASSES
    from uda_cli.data.labels import IGNORE

    k = len(spec.classes)
    data: dict[str, Any] = {"names": list(spec.classes), "ids": list(range(k)), "ignore": [IGNORE]}
    if len(spec.palette) >= k:
        data["colors"] = [[int(v) for v in c] for c in spec.palette[:k]]
    ckpt.atomic_write_bytes(out / CLASSES, (json.dumps(data) + "\n").encode())


def overlay(image: torch.Tensor, label: torch.Tensor, palette, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 image ``[3, H, W]`` with train ids ``[H, W]`` drawn over it in ``palette`` colours
    (weight ``alpha``; ignored pixels left as they are) -> uint8 ``[H, W, 3]``."""
    from uda_cli.data.labels import IGNORE, colorize

    img = image.permute(1, 2, 0).numpy().astype(np.float32)
    lab = label.numpy()
    colour = colorize(lab, tuple(palette)).astype(np.float32)
    mixed = np.where((lab != IGNORE)[..., None], (1 - alpha) * img + alpha * colour, img)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _dense_preview(out: Path, layout: SegmentationLayout, source, stems: list[str], n: int, size: tuple[int, int],
                   palette) -> Path:
    """The first scenes (source, resized to the export size, on top; their translations below),
    each with its label overlaid; the translations and labels are read back from disk (what was
    written), and the cells are shrunk to at most ``PREVIEW_SIDE`` pixels on a side."""
    from uda_cli.data.dense import read_image, read_png_unchanged
    from uda_cli.data.streaming import resize_pair

    m = min(PREVIEW_SCENES, n)
    h, w = size
    f = min(1.0, PREVIEW_SIDE / max(h, w))
    cell = (max(1, round(h * f)), max(1, round(w * f)))
    top, bottom = [], []
    for i in range(m):
        image, _ = source.read(i)
        image, _ = resize_pair(image, None, size)
        label = torch.from_numpy(np.array(read_png_unchanged(out / layout.label(stems[i]))))
        image, small = resize_pair(image, label, cell)
        translated, _ = resize_pair(read_image(out / layout.image(stems[i])), None, cell)
        top.append(overlay(image, small, palette))
        bottom.append(overlay(translated, small, palette))
    path = out / PREVIEW
    ckpt.atomic_write_bytes(path, png_bytes(grid([np.stack(top), np.stack(bottom)], labels=["source", "translated"])))
    return path


def _export_dense(opts: AdaptImagesOptions, manifest: dict[str, Any], old: dict[str, Any] | None, method: Method,
                  spec: DomainSpec, split: str, size: tuple[int, int], device: torch.device,
                  interactive: bool | None) -> ExportResult:
    """Stream ``spec:split`` from disk, translate the scenes not yet written, write each one's
    image and label; see the module doc."""
    from torch.nn import functional as F

    from uda_cli.data.registry import load_dense
    from uda_cli.data.streaming import DenseDataset, collate
    from uda_cli.engine.setup import default_workers, eval_batch_size

    out = opts.out
    source = load_dense(spec.name, split, opts.data_root)
    if not source.labelled:
        raise ConfigError(f"{spec.name}:{split} has no labels to carry over; pick a labelled split, e.g. "
                          f"--domain {spec.name}:{spec.train_split}")
    n = len(source) if opts.limit is None else min(opts.limit, len(source))
    stems = export_stems(source, n)
    layout = SegmentationLayout(out)
    manifest["layout"] = layout.pattern
    manifest["num_source_images"] = n
    manifest["created"] = (old or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z")

    layout.prepare()
    _write_classes(out, spec)
    _write_manifest(out, manifest)  # first: a later call recognises an interrupted export
    files = layout.existing_files()
    need_image = [s not in files["images"] for s in stems]
    need_label = [s not in files["labels"] for s in stems]
    todo = [i for i in range(n) if need_image[i] or need_label[i]]
    skipped = n - len(todo)
    batch_size = opts.batch_size or eval_batch_size(size)
    # (draw, index) keys, as DenseDataset takes them; no augmentation, so draw is unused.
    batches = [[(i, i) for i in todo[a : a + batch_size]] for a in range(0, len(todo), batch_size)]
    workers = min(default_workers() if opts.workers is None else opts.workers, len(batches))
    loader = torch.utils.data.DataLoader(
        DenseDataset(source, size), batch_sampler=batches, num_workers=workers, collate_fn=collate,
        pin_memory=device.type == "cuda", generator=torch.Generator())
    draw = noise_fn(method, opts.seed)
    written = 0
    with Progress("translate", n, completed=skipped, interactive=interactive, unit="scenes") as progress, \
            torch.no_grad():
        for got in loader:
            if isinstance(got, UDAError):
                raise got
            images, labels, indices = got
            idx = indices.tolist()
            rows = [j for j, i in enumerate(idx) if need_image[i]]
            if rows:
                # fp32, no autocast: as for classification (8-bit output, a cheap pass).
                x = normalize(images[rows].to(device))
                noise = draw([idx[j] for j in rows], 0).to(device) if draw is not None else None
                y = method.translate(x, noise).float()
                if y.shape[-2:] != x.shape[-2:]:
                    y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
                y = _nhwc(denormalize(y).cpu())
                for r, j in enumerate(rows):
                    _write_png(out / layout.image(stems[idx[j]]), png_bytes(y[r]))
            lab = labels.numpy()
            for j, i in enumerate(idx):
                if need_label[i]:
                    _write_png(out / layout.label(stems[i]), png_bytes(lab[j]))
            written += len(idx)
            progress.advance(len(idx))
            del images, labels, lab

    preview = _dense_preview(out, layout, source, stems, n, size, class_palette(spec))
    manifest["num_images"] = len(layout.existing())
    manifest["complete"] = True
    _write_manifest(out, manifest)
    return ExportResult(out=out, total=n, written=written, skipped=skipped, manifest=manifest, preview=preview)


def adapt_images(opts: AdaptImagesOptions, interactive: bool | None = None) -> ExportResult:
    from uda_cli.engine.setup import load_method, run_data_root

    weights = ckpt.resolve_checkpoint(opts.target)
    meta = ckpt.read_metadata(weights)
    check_translator(weights, meta)
    opts = opts.model_copy(update={"data_root": run_data_root(opts.data_root, meta)})
    run = RunSpec.from_json(meta["spec"])
    dense = run.task == "segmentation"
    if not dense:
        for flag in ("size", "workers"):
            if getattr(opts, flag) is not None:
                raise ConfigError(f"--{flag} applies to segmentation runs; {weights} is a {run.task} one "
                                  f"(its images are translated at the run's size)")

    domain_text = opts.domain or meta.get("src") or meta["options"]["src"]
    name, split = parse_domain(domain_text)
    spec = get_domain(name)
    split = resolve_split(spec, split, spec.train_split)
    _check_domain_fits(spec, split, run, weights)

    method_cls = get_method(meta["method"])
    if opts.samples_per_image > 1 and not method_cls.has_noise_input:
        raise ConfigError(f"{meta['method']} has no noise input: every sample would be the same image; "
                          f"use --samples-per-image 1")
    if opts.samples_per_image > 1 and dense:
        raise ConfigError("a segmentation export holds one translation per scene; use --samples-per-image 1")

    size = export_size(opts, meta, run, spec) if dense else tuple(run.image_size)
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
        "image_size": [int(size[0]), int(size[1])],
        "channels": 3 if dense else run.channels,
        "classes": list(spec.classes),
        "num_source_images": 0,
        "num_images": 0,
        "complete": False,
    }
    if dense:
        manifest["size"] = f"{size[1]}x{size[0]}"  # W x H, as --size takes it
    device = resolve_device(opts.device)
    if dense:
        method, _ = load_method(weights, device)
        check_size(method, size, opts.size, weights)
        old = _check_out(out, manifest)
        return _export_dense(opts, manifest, old, method, spec, split, size, device, interactive)

    old = _check_out(out, manifest)
    layout = layout_for(run.task, out, opts.samples_per_image, spec)
    manifest["layout"] = layout.pattern
    batch_size = opts.batch_size or CLASSIFICATION_BATCH

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
        for start, end in _batches(n, batch_size):
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
