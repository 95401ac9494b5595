"""`uda download`: fetch dataset files, verify their checksums, extract and audit them."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from uda_cli.cli.options import DataRoot


def download(
    datasets: Annotated[
        Optional[list[str]],
        typer.Argument(
            metavar="DATASET",
            help="Datasets to fetch: mnist, usps, svhn, mnistm, office31, gta5, synthia, cityscapes "
                 "(--list shows them all).",
            show_default=False,
        ),
    ] = None,
    data_root: DataRoot = None,
    mirror: Annotated[
        Optional[list[str]],
        typer.Option(
            "--mirror",
            metavar="URL_OR_DIR",
            help=(
                "Base URL or local folder tried before the official URLs; it holds "
                "<dataset>/<file>, e.g. mnist/t10k-images-idx3-ubyte.gz or gta5/01_images.zip. "
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
    list_only: Annotated[
        bool,
        typer.Option(
            "--list",
            help="Show every dataset (or those named): size, checksums, licence, and whether it is present "
                 "and verified under the data root. Fetches nothing.",
        ),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Audit the copy under the data root without downloading: checksums, extracted files, "
                 "image/label pairs. Exit 1 on any problem.",
        ),
    ] = False,
) -> None:
    """Download datasets into the data root, verify their checksums, extract and audit them.

    Files that already verify are skipped; a cut-off download resumes where it stopped; a
    download that would not fit on the disk does not start. Cityscapes needs a login: set
    CITYSCAPES_USERNAME and CITYSCAPES_PASSWORD (or answer the prompt on a terminal), or put
    the zips you downloaded yourself in <data root>/cityscapes/.
    """
    from rich.console import Console

    from uda_cli.config import DownloadOptions
    from uda_cli.data import download as dl
    from uda_cli.data.registry import resolve_data_root

    # An empty list (not None) so that "name at least one dataset" comes from validation.
    opts = DownloadOptions(
        list_only=list_only,
        verify=verify,
        datasets=datasets or [],
        data_root=data_root,
        mirrors=mirror or [],
        force=force,
        include_optional=not no_optional,
    )
    root = resolve_data_root(opts.data_root)
    if opts.list_only:
        dl.print_catalogue(root, opts.datasets, Console(soft_wrap=True))
        return
    console = Console(stderr=True)
    if opts.verify:
        for name in opts.datasets:
            dl.verify_dataset(name, root, console, include_optional=opts.include_optional)
        return
    for name in opts.datasets:
        ds = dl.get_dataset(name)
        credentials = None  # the library reads the environment variables itself
        if (ds.login is not None and not opts.mirrors and dl.credentials_from_env(ds.login) is None
                and dl.needs_credentials(ds, root, opts.include_optional)):
            credentials = _prompt(ds.login)  # only when a file must come from behind the login
        dl.download(
            name, root, mirrors=opts.mirrors, force=opts.force,
            include_optional=opts.include_optional, console=console, credentials=credentials,
        )


def _prompt(form):
    """Ask on a terminal (the password unechoed); None elsewhere, so the library says which
    variables to set. Nothing typed here is printed or logged."""
    import getpass
    import sys

    from uda_cli.data.download import Credentials

    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return None
    print(f"{form.site} login ({form.user_env} / {form.password_env} are not set; "
          "leave empty to skip)", file=sys.stderr)
    sys.stderr.write(f"{form.site} username or email: ")
    sys.stderr.flush()
    username = sys.stdin.readline().strip()
    if not username:
        return None
    password = getpass.getpass(f"{form.site} password: ")
    return Credentials(username, password) if password else None
