"""The catalogue: every dataset ``uda download`` knows, by name.

Each dataset declares its files beside its reader, as torchvision keeps ``resources`` beside
each dataset: the digits in :mod:`uda_cli.data.digits`, Office-31 in
:mod:`uda_cli.data.office`, GTA5, SYNTHIA and Cityscapes in :mod:`uda_cli.data.gta5`,
:mod:`uda_cli.data.synthia` and :mod:`uda_cli.data.cityscapes`. Those modules import only
:mod:`~uda_cli.data.download.types` and :mod:`~uda_cli.data.download.audit` (and no torch),
so that ``uda download --list`` stays fast. Adding a dataset: declare its ``Dataset`` there
and name it below.
"""

from __future__ import annotations

from uda_cli.data import cityscapes, digits, gta5, office, synthia
from uda_cli.data.download.types import Dataset
from uda_cli.errors import ConfigError

DATASETS: dict[str, Dataset] = {}


def _register(ds: Dataset) -> Dataset:
    if ds.name in DATASETS:
        raise ValueError(f"dataset {ds.name!r} registered twice")
    DATASETS[ds.name] = ds
    return ds


for _ds in (
    digits.MNIST_DOWNLOAD,
    digits.USPS_DOWNLOAD,
    digits.SVHN_DOWNLOAD,
    digits.MNISTM_DOWNLOAD,
    office.OFFICE31_DOWNLOAD,
    gta5.GTA5_DOWNLOAD,
    synthia.SYNTHIA_DOWNLOAD,
    cityscapes.CITYSCAPES_DOWNLOAD,
):
    _register(_ds)
del _ds


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")
    return DATASETS[name]


def _resolve(dataset: str | Dataset) -> Dataset:
    return get_dataset(dataset) if isinstance(dataset, str) else dataset

