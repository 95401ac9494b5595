"""`uda download`: fetch dataset files, verify their checksums, extract archives."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from uda_cli.cli.options import DataRoot


def download(
    datasets: Annotated[
        Optional[list[str]],
        typer.Argument(metavar="DATASET", help="Datasets to fetch: mnist, usps, svhn, mnistm.", show_default=False),
    ] = None,
    data_root: DataRoot = None,
    mirror: Annotated[
        Optional[list[str]],
        typer.Option(
            "--mirror",
            metavar="URL_OR_DIR",
            help=(
                "Base URL or local folder tried before the official URLs; it holds "
                "<dataset>/<file>, e.g. mnist/t10k-images-idx3-ubyte.gz or mnist_m/<archive>. "
                "Repeatable."
            ),
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Fetch every file again, even those that already verify.")
    ] = False,
    no_optional: Annotated[
        bool,
        typer.Option("--no-optional", help="Skip optional files (the 96 MB second MNIST-M train archive)."),
    ] = False,
) -> None:
    """Download datasets into the data root, verify their checksums and extract archives.

    Files that already verify are skipped; a cut-off download resumes where it stopped.
    """
    from rich.console import Console

    from uda_cli.config import DownloadOptions
    from uda_cli.data.download import download as fetch
    from uda_cli.data.registry import resolve_data_root

    # An empty list (not None) so that "name at least one dataset" comes from validation.
    opts = DownloadOptions(
        datasets=datasets or [],
        data_root=data_root,
        mirrors=mirror or [],
        force=force,
        include_optional=not no_optional,
    )
    root = resolve_data_root(opts.data_root)
    console = Console(stderr=True)
    for name in opts.datasets:
        fetch(
            name, root, mirrors=opts.mirrors, force=opts.force,
            include_optional=opts.include_optional, console=console,
        )
