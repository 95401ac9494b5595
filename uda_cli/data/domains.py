"""The built-in domains. Adding one is a `register_domain` call here."""

from __future__ import annotations

from uda_cli.data import digits
from uda_cli.data.registry import DIGIT_CLASSES, DomainSpec, register_domain

DIGITS_SIZE = (32, 32)


def _digits(name: str, channels: int, dataset: str | None, reader, description: str) -> None:
    register_domain(DomainSpec(
        name=name, task="classification", classes=DIGIT_CLASSES, channels=channels, image_size=DIGITS_SIZE,
        splits=("train", "test"), train_split="train", eval_split="test", dataset=dataset, reader=reader,
        description=description,
    ))


_digits("mnist", 1, "mnist", digits.read_mnist, "MNIST handwritten digits, 60,000 train / 10,000 test, 28x28 grey")
_digits("usps", 1, "usps", digits.read_usps, "USPS postal digits, 7,291 train / 2,007 test, 16x16 grey")
_digits("svhn", 3, "svhn", digits.read_svhn, "SVHN cropped house numbers, 73,257 train / 26,032 test, 32x32 colour")
_digits("mnistm", 3, "mnistm", digits.read_mnistm,
        "MNIST-M: MNIST blended with BSDS500 patches, 59,001 train / 9,001 test, 32x32 colour")
_digits("mnist2000", 1, None, lambda _folder, split: digits.read_embedded("mnist2000", split),
        "ADDA protocol: 2,000 MNIST train digits (fixed seed); test: 2,000 MNIST test digits. Ships with uda")
_digits("usps1800", 1, None, lambda _folder, split: digits.read_embedded("usps1800", split),
        "ADDA protocol: 1,800 USPS train digits (fixed seed); test: the full USPS test set (2,007). Ships with uda")

# Office-31: one split, "all", used for training and evaluation as every Office-31 UDA paper
# does. The reader resizes each image to 224x224 while reading (the photos vary in size), and
# the registry keeps a domain in memory as uint8: all three domains together, 4,110 images x
# 3x224x224, are about 620 MB (amazon alone 424 MB).
from uda_cli.data import office  # noqa: E402

for _domain in office.OFFICE31_DOMAINS:
    register_domain(DomainSpec(
        name=f"office31-{_domain}", task="classification", classes=office.OFFICE31_CLASSES, channels=3,
        image_size=office.OFFICE_SIZE, splits=office.SPLITS, train_split="all", eval_split="all",
        dataset="office31", reader=office.reader(_domain),
        description=(f"Office-31 {_domain}: {office.OFFICE31_SIZES[_domain]:,} photos, 31 office object classes, "
                     "resized to 224x224 colour; one split, all"),
    ))
del _domain
from uda_cli.data import cityscapes, gta5, synthia  # noqa: E402,F401  (register the segmentation domains)
from uda_cli.data import scenes  # noqa: E402,F401  (register the digit scenes)
