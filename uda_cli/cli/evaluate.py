"""`uda evaluate`: accuracy, per-class accuracy and confusion matrix of a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from uda_cli.cli.options import BatchSize, Device, RunDataRoot, RunPrecision


def evaluate(
    target: Annotated[Path, typer.Argument(metavar="RUN_OR_CHECKPOINT", help="A run folder (its latest checkpoint) or a .safetensors checkpoint.")],
    domain: Annotated[Optional[str], typer.Option("--domain", help="NAME[:split[START:STOP]] to evaluate on [the run's target test split].", show_default=False)] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON here [<run>/eval/...].", show_default=False)] = None,
    data_root: RunDataRoot = None,
    device: Device = None,
    precision: RunPrecision = None,
    batch_size: BatchSize = None,
) -> None:
    """Evaluate a checkpoint on a labelled domain and print a table."""
    from uda_cli.config import EvaluateOptions

    fields = dict(target=target, domain=domain, json_path=json_path, data_root=data_root, device=device,
                  precision=precision.value if precision else None, batch_size=batch_size)
    opts = EvaluateOptions(**{k: v for k, v in fields.items() if v is not None})

    from uda_cli.engine.evaluate import evaluate_checkpoint

    report, written = evaluate_checkpoint(opts)
    _print_report(report)
    if written:
        print(f"report: {written}")


def _print_report(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{r['method']}[/] step {r['step']} on [bold]{r['domain']}[/]: "
                  f"accuracy [bold]{100 * r['accuracy']:.2f}%[/], mean class accuracy {100 * r['mean_class_accuracy']:.2f}% "
                  f"({r['num_samples']} images)", soft_wrap=True)
    classes = r["classes"]
    table = Table(title="confusion matrix (rows: true, columns: predicted)")
    table.add_column("class")
    table.add_column("acc %", justify="right")
    for c in classes:
        table.add_column(c, justify="right")
    for i, c in enumerate(classes):
        acc = r["per_class_accuracy"][c]
        table.add_row(c, "-" if acc is None else f"{100 * acc:.1f}", *[str(v) for v in r["confusion_matrix"][i]])
    console.print(table)
