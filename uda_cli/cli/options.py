"""Option aliases shared by several commands (one definition, one help text)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional, get_args

import typer

from uda_cli.config import Precision as PrecisionName

DataRoot = Annotated[
    Optional[Path],
    typer.Option("--data-root", help="Where datasets live (default: $UDA_DATA_ROOT or ~/.cache/uda/data).",
                 show_default=False),
]
# Commands that read a run's domains again (evaluate, adapt-images, tsne).
RunDataRoot = Annotated[
    Optional[Path],
    typer.Option("--data-root", help="Where datasets live (default: the run's own --data-root when that folder "
                 "still exists, else $UDA_DATA_ROOT or ~/.cache/uda/data).", show_default=False),
]
Device = Annotated[
    Optional[str], typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.", show_default=False)
]


PrecisionChoice = Enum("PrecisionChoice", {v: v for v in get_args(PrecisionName)}, type=str)
_PRECISION_HELP = ("auto: bf16 autocast on CUDA, float32 on the CPU; fp32: float32 everywhere; bf16: bf16 autocast "
                   "on either (fast on a CPU with bf16 units, e.g. AMX)")
Precision = Annotated[
    Optional[PrecisionChoice], typer.Option("--precision", help=f"{_PRECISION_HELP} [auto].", show_default=False)
]
# uda evaluate: a run is read in the precision it trained in unless told otherwise.
RunPrecision = Annotated[
    Optional[PrecisionChoice],
    typer.Option("--precision", help=f"{_PRECISION_HELP} [the run's own].", show_default=False),
]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Images per batch.", show_default=False)]
