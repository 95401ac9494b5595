"""Dense (segmentation) domains: a split is a finite list of named samples read one at a time.

A segmentation domain's reader (``DomainSpec.reader(folder, split)``) returns a
:class:`DenseSource`: ``len(source)`` samples, each with a stem (its file name without the
extension, e.g. ``aachen_000000_000019`` or ``scene-000123``: what pseudo-labels and saved
predictions are named after) and ``read(i) -> (image, label)``:

- ``image``: uint8 tensor ``[3, H, W]`` at the sample's native size;
- ``label``: uint8 tensor ``[H, W]`` of train ids (``labels.IGNORE`` = 255 where unlabelled),
  at the image's size, or ``None`` for a split without labels (Cityscapes test).

Sources are picklable (they hold paths and small tables, never decoded images), so
``DataLoader`` workers read them; ``engine``-side resizing, cropping and augmentation
happen in :mod:`uda_cli.data.streaming`.

Images and labels decode with ``torchvision.io`` (PIL where it cannot);
``benchmarks/segmentation_speed.py`` measures the two decoders side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from uda_cli.errors import DataError


class DenseSource:
    """One split of a segmentation domain. Subclasses implement ``__len__``, ``stem`` and ``read``."""

    name: str = ""  # "gta5:train", for messages
    labelled: bool = True

    def __len__(self) -> int:
        raise NotImplementedError

    def stem(self, i: int) -> str:
        raise NotImplementedError

    def read(self, i: int):
        """``(image uint8 [3, H, W], label uint8 [H, W] or None)`` of sample ``i``, native size."""
        raise NotImplementedError

    def native_size(self, i: int) -> tuple[int, int]:
        """(H, W) of sample ``i`` as stored; by default read from the image."""
        return tuple(self.read(i)[0].shape[-2:])

    @property
    def stems(self) -> list[str]:
        return [self.stem(i) for i in range(len(self))]


def read_image(path: Path):
    """An image file -> uint8 tensor [3, H, W] (grey is repeated, alpha dropped).

    ``torchvision.io`` decodes, PIL where that cannot: on full-size GTA5/Cityscapes-like
    PNGs torchvision took 0.79-0.86 of PIL's time
    (``benchmarks/results/2026-12-06_cpu_session30_segmentation_speed.md``). torchvision 0.29
    deprecates its decoders in favour of TorchCodec: the warning is silenced here, and a
    torchvision without them falls back to PIL.
    """
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from torchvision.io import ImageReadMode, decode_image, read_file
        except ImportError:  # a torchvision without its decoders
            return _read_image_pil(path)
        try:
            x = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError) as e:
            raise DataError(f"cannot read the image {path} ({str(e).splitlines()[0]}); the file is damaged or not an "
                            "image: download it again or remove it") from None
    return x if x.dtype == torch.uint8 else _read_image_pil(path)  # 16-bit: PIL scales, torchvision wraps


def _read_image_pil(path: Path):
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            a = np.array(im.convert("RGB") if im.mode != "RGB" else im)  # a writable copy, as torch wants
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot read the image {path} ({str(e).splitlines()[0]}); the file is damaged or not an "
                        "image: download it again or remove it") from None
    return torch.from_numpy(a).permute(2, 0, 1)


def read_png_unchanged(path: Path) -> np.ndarray:
    """A PNG's stored values, unchanged: [H, W] or [H, W, C], uint8 or uint16 (palette PNGs give indices).

    ``torchvision.io.decode_png``: PIL cannot read 16-bit colour PNGs (SYNTHIA's labels), and
    labels are small next to the images. Its deprecation warning (torchvision 0.29) is silenced
    here; a release without it would need another 16-bit reader for SYNTHIA.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_png, read_file

        try:
            x = decode_png(read_file(str(path)), mode=ImageReadMode.UNCHANGED)
        except (RuntimeError, ValueError) as e:
            raise DataError(f"cannot read the label {path} ({str(e).splitlines()[0]}); the file is damaged or not a "
                            "PNG: download it again or remove it") from None
    a = x.permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


class LookupLabels:
    """A picklable label decoder: a PNG's values (channel ``channel`` of a multi-channel one)
    mapped through ``table`` (id -> train id, 255 ignore). Ids beyond the table are an error."""

    def __init__(self, table: np.ndarray, channel: int = 0, what: str = "label id"):
        self.table, self.channel, self.what = table, channel, what

    def __call__(self, path: Path) -> np.ndarray:
        a = read_png_unchanged(path)
        if a.ndim == 3:
            a = a[..., self.channel]
        if int(a.max(initial=0)) >= len(self.table):
            raise DataError(f"{path} holds {self.what} {int(a.max())}, outside the table's 0..{len(self.table) - 1}; "
                            "is this the dataset's label file?")
        return self.table[a]


class FilePairSource(DenseSource):
    """Image/label file pairs. ``decode_label(path) -> uint8 [H, W] train ids``.

    A label whose size differs from its image is resized to it (nearest), as ADVENT does for
    GTA5's few odd frames; the reader counts those at scan time and warns once.
    """

    def __init__(self, name: str, stems: Sequence[str], images: Sequence[Path], labels: Sequence[Path] | None,
                 decode_label: Callable[[Path], np.ndarray] | None):
        if labels is not None and len(labels) != len(images):
            raise ValueError("images and labels differ in number")
        self.name = name
        self._stems = list(stems)
        self.images = [Path(p) for p in images]
        self.labels = None if labels is None else [Path(p) for p in labels]
        self.decode_label = decode_label
        self.labelled = labels is not None

    def __len__(self) -> int:
        return len(self.images)

    def stem(self, i: int) -> str:
        return self._stems[i]

    def read(self, i: int):
        import torch
        import torch.nn.functional as F

        image = read_image(self.images[i])
        if self.labels is None:
            return image, None
        label = torch.from_numpy(np.ascontiguousarray(self.decode_label(self.labels[i])))
        if tuple(label.shape) != tuple(image.shape[-2:]):
            label = F.interpolate(label[None, None].float(), size=tuple(image.shape[-2:]), mode="nearest")[0, 0]
            label = label.to(torch.uint8)
        return image, label


class SubsetSource(DenseSource):
    """Part of a source, by index (``train[:100]``): the same samples, renumbered."""

    def __init__(self, base: DenseSource, indices: Sequence[int], name: str):
        self.base, self.indices, self.name = base, list(indices), name
        self.labelled = base.labelled

    def __len__(self) -> int:
        return len(self.indices)

    def stem(self, i: int) -> str:
        return self.base.stem(self.indices[i])

    def read(self, i: int):
        return self.base.read(self.indices[i])

    def native_size(self, i: int) -> tuple[int, int]:
        return self.base.native_size(self.indices[i])
