"""Option aliases shared by several commands (one definition, one help text)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

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


class PrecisionChoice(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


Precision = Annotated[
    Optional[PrecisionChoice],
    typer.Option("--precision", help="auto: bf16 autocast on CUDA, float32 on the CPU; fp32: float32 everywhere; "
                 "bf16: bf16 autocast on either (fast on a CPU with bf16 units, e.g. AMX) [auto].", show_default=False),
]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Images per batch.", show_default=False)]
