"""`uda adapt-images`: write a translated copy of a source domain as a dataset (classification:
one folder per class; segmentation: images/, labels/ and classes.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from uda_cli.cli.options import Device, RunDataRoot
from uda_cli.errors import UDAError


def adapt_images(
    target: Annotated[Path, typer.Argument(metavar="RUN_OR_CHECKPOINT", help="A run folder (its latest checkpoint) or a .safetensors checkpoint of a translating method (classification: i2i, pixelda, dtn; segmentation: lsd, i2i).")],
    out: Annotated[Path, typer.Option("--out", help="Export folder; train on it with --src folder:OUT. Call again with the same arguments to finish an interrupted export.", show_default=False)],
    domain: Annotated[Optional[str], typer.Option("--domain", help="NAME[:split[START:STOP]] to translate [the run's source training split].", show_default=False)] = None,
    samples_per_image: Annotated[Optional[int], typer.Option("--samples-per-image", help="Translations per image, each with its own noise (methods with a noise input, e.g. pixelda) [1].", show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Translate only the first N images of the split.", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seeds the noise: image i, sample k gets the same noise on every call [0].", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per batch [256; segmentation: about a megapixel].", show_default=False)] = None,
    size: Annotated[Optional[str], typer.Option("--size", help="Segmentation: WxH the scenes are translated and written at [the size the run read that domain at].", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Segmentation: data loader workers reading the scenes [up to 4].", show_default=False)] = None,
    data_root: RunDataRoot = None,
    device: Device = None,
) -> None:
    """Translate a source domain with a trained translator and write it as a folder dataset.

    Classification runs: OUT/<class>/<index>.png. Segmentation runs (lsd, i2i): OUT/images/<stem>.png,
    the source's labels in OUT/labels/<stem>.png (resized by nearest) and OUT/classes.json, at the
    run's size for that domain or --size WxH. Both write manifest.json and preview.png; both
    train with --src folder:OUT.
    """
    from uda_cli.config import AdaptImagesOptions

    fields = dict(target=target, out=out, domain=domain, samples_per_image=samples_per_image, limit=limit, seed=seed,
                  batch_size=batch_size, size=size, workers=workers, data_root=data_root, device=device)
    opts = AdaptImagesOptions(**{k: v for k, v in fields.items() if v is not None})

    from uda_cli.engine.adapt import adapt_images as export

    try:
        r = export(opts)
    except KeyboardInterrupt:
        # Every finished PNG is complete (atomic renames): the same call picks up from there.
        e = UDAError(f"interrupted; {opts.out} keeps the images written so far: run the same command again to finish it")
        e.exit_code = 130
        raise e from None
    m = r.manifest
    if m["task"] == "segmentation":
        from uda_cli.data.registry import parse_domain
        from uda_cli.engine import checkpoint as ckpt

        tgt = ckpt.read_metadata(ckpt.resolve_checkpoint(opts.target)).get("tgt")
        tgt = parse_domain(tgt)[0] if tgt else "..."
        print(f"{m['method']} step {m['step']} on {m['domain']}:{m['split']} at {m['size']}: wrote {r.written} scenes, "
              f"{r.skipped} already there; {m['num_images']} in {r.out} (images/, labels/)")
        print(f"preview: {r.preview}")
        print(f"train on it: uda train --src folder:{r.out} --tgt {tgt}")
        return
    print(f"{m['method']} step {m['step']} on {m['domain']}:{m['split']}: wrote {r.written} images, "
          f"{r.skipped} already there; {m['num_images']} in {r.out}")
    print(f"preview: {r.preview}")
    print(f"train on it: uda train --src folder:{r.out} --tgt ...")
