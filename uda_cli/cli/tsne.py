"""`uda tsne`: a t-SNE map of a checkpoint's features on a source and a target domain.

Classification runs map images; segmentation runs map pixels of the feature map (sampled
class-balanced, ignore pixels skipped), and ``--easy-hard`` colours a tpld run's target
pixels by their image's easy/hard split. See :mod:`uda_cli.viz.tsne`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from uda_cli.cli.options import BatchSize, Device, RunDataRoot


def tsne(
    target: Annotated[Path, typer.Argument(metavar="RUN_OR_CHECKPOINT", help="A run folder (its latest checkpoint) or a .safetensors checkpoint.")],
    src: Annotated[Optional[str], typer.Option("--src", help="NAME[:split] of the source [the run's source, test split].", show_default=False)] = None,
    tgt: Annotated[Optional[str], typer.Option("--tgt", help="NAME[:split] of the target [the run's target, test split].", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for tsne.png, tsne.csv and tsne.json [<run>/tsne].", show_default=False)] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", help="Up to N images (segmentation: pixels) per domain, drawn class-balanced [1000].", show_default=False)] = None,
    perplexity: Annotated[Optional[float], typer.Option("--perplexity", help="t-SNE perplexity, capped at (points - 1) / 3 [30].", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seeds the draw, the embedding and the domain classifier [0].", show_default=False)] = None,
    max_images: Annotated[Optional[int], typer.Option("--max-images", help="Segmentation: read at most N images per domain, in a seeded order, stopping once every class has its share of pixels [100].", show_default=False)] = None,
    easy_hard: Annotated[bool, typer.Option("--easy-hard", help="tpld runs: colour target pixels by their image's easy/hard split in the last phase-2 round (target images from the training split).")] = False,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Segmentation: data loader workers [up to 4].", show_default=False)] = None,
    data_root: RunDataRoot = None,
    device: Device = None,
    batch_size: BatchSize = None,
) -> None:
    """Plot a t-SNE map of source and target features (segmentation: pixels) and measure the proxy A-distance."""
    from uda_cli.config import TsneOptions

    fields = dict(target=target, src=src, tgt=tgt, out=out, samples=samples, perplexity=perplexity, seed=seed,
                  max_images=max_images, easy_hard=easy_hard or None, workers=workers,
                  data_root=data_root, device=device, batch_size=batch_size)
    opts = TsneOptions(**{k: v for k, v in fields.items() if v is not None})

    from uda_cli.viz.tsne import run_tsne

    r = run_tsne(opts)
    rep = r.report
    unit = " pixels" if rep.get("unit") == "pixels" else ""
    print(f"{rep['method']} step {rep['step']}: {rep['src']} ({rep['num_samples']['src']}{unit}) vs {rep['tgt']} "
          f"({rep['num_samples']['tgt']}{unit}): proxy A-distance {rep['proxy_a_distance']:.3f} "
          f"(domain classifier error {100 * rep['domain_error']:.1f}%)")
    print(f"map: {r.png}")
    print(f"points: {r.csv}")
    print(f"report: {r.json}")
