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
    size: Annotated[Optional[str], typer.Option("--size", help="Segmentation: WxH images are resized to before the network [the run's target size].", show_default=False)] = None,
    flip: Annotated[bool, typer.Option("--flip", help="Segmentation: average with the horizontally flipped prediction.")] = False,
    scales: Annotated[Optional[str], typer.Option("--scales", help="Segmentation: multi-scale testing, e.g. 0.75,1,1.25 [1].", show_default=False)] = None,
    save_predictions: Annotated[Optional[Path], typer.Option("--save-predictions", help="Segmentation: write <stem>.png (Cityscapes label ids at full resolution) and <stem>_color.png per image here.", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Segmentation: data loader workers [up to 4].", show_default=False)] = None,
) -> None:
    """Evaluate a checkpoint on a labelled domain and print a table (accuracy, or mIoU and per-class IoU)."""
    from uda_cli.config import EvaluateOptions

    fields = dict(target=target, domain=domain, json_path=json_path, data_root=data_root, device=device,
                  precision=precision.value if precision else None, batch_size=batch_size, size=size,
                  flip=flip or None, scales=scales, save_predictions=save_predictions, workers=workers)
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
    if r.get("metric") == "miou":
        _print_segmentation(console, r)
        return
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


def _print_segmentation(console, r: dict) -> None:
    from rich.table import Table

    extra = "".join(f", mIoU over {k[5:]} classes {100 * v:.2f}" for k, v in r.items()
                    if k.startswith("miou_") and v is not None)
    how = ", ".join([f"{r['size'][1]}x{r['size'][0]}"] + (["flip"] if r.get("flip") else [])
                    + ([f"scales {','.join(str(s) for s in r['scales'])}"] if list(r.get("scales", [1.0])) != [1.0] else []))
    console.print(f"[bold]{r['method']}[/] step {r['step']} on [bold]{r['domain']}[/]: mIoU [bold]{100 * r['miou']:.2f}[/]"
                  f"{extra}, pixel accuracy {100 * r['pixel_accuracy']:.2f}% ({r['num_images']} images; {how})",
                  soft_wrap=True)
    table = Table(title="per-class IoU (%)")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for c in r["classes"]:
        v = r["per_class_iou"][c]
        table.add_row(c, "-" if v is None else f"{100 * v:.1f}")
    console.print(table)
