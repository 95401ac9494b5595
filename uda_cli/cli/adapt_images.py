"""`uda adapt-images`: not built yet (the image-translation methods come first)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from uda_cli.errors import NotBuiltError


def adapt_images(
    checkpoint: Annotated[Optional[str], typer.Argument(help="A run folder or checkpoint of a translating method.")] = None,
) -> None:
    """Write a translated copy of a source dataset (not built yet)."""
    raise NotBuiltError("`uda adapt-images` is not built yet: it arrives with the image-translation methods (i2i, pixelda, dtn)")
