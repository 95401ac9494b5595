"""`uda tsne`: not built yet."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from uda_cli.errors import NotBuiltError


def tsne(
    checkpoint: Annotated[Optional[str], typer.Argument(help="A run folder or checkpoint.")] = None,
) -> None:
    """Plot a t-SNE map of source and target features (not built yet)."""
    raise NotBuiltError("`uda tsne` is not built yet; use `uda evaluate` for accuracies meanwhile")
