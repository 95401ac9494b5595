"""Segmentation speed: the segmentation networks' training step and the training loader, as markdown tables.

    python benchmarks/segmentation_speed.py --device cuda --models deeplabv2_r101 --precision fp32,bf16
    python benchmarks/segmentation_speed.py --parts train --models deeplabv2_small --size 64x64 --tgt-size 64x64 \
        --batch 16
    python benchmarks/segmentation_speed.py --parts train --models deeplabv2_r101 --size 320x160 --tgt-size 320x160 \
        --steps 3 --warmup 1
    python benchmarks/segmentation_speed.py --parts loader --files 24 --workers 0,1,2,4 --keep /tmp/uda-seg-speed-files
    python benchmarks/segmentation_speed.py --parts round --device cuda --models deeplabv2_r101 --precision bf16 \
        --size 1280x720 --tgt-size 1024x512 --batch 2 --files 50 --steps 20 --workers 8
    python benchmarks/segmentation_speed.py --parts method --methods lsd,i2i,source-only --device cuda --models auto \
        --precision bf16 --size 1024x512 --tgt-size 1024x512 --batch 1 --files 10 --steps 20 --workers 4

Training step (``--parts train``): each network of ``--models`` is built with ``pretrained="none"``
(19 classes) and trained with SGD on its ``param_groups`` (lr 2.5e-4, 10x on the head, momentum
0.9, weight decay 5e-4: ADVENT's recipe). One step, as uda's trainer runs it: zero the gradients;
forward the source batch (``--batch`` images of ``--size``, random pixels and labels) under the
precision's autocast; the pixel cross-entropy (``source_only.segmentation_loss``: logits upsampled
to the labels); backward outside autocast; then the target batch (``--batch`` images of
``--tgt-size``) by ``--target-pass``: ``forward`` (default) one forward with autograd on, its
graph dropped (the target half of an ADVENT step before its adversarial backward), ``entropy``
forward plus an entropy-loss backward (MinEnt; ADVENT's full target work without its small
discriminator), ``none`` (source-only); then ``optimizer.step()``. Defaults are ADVENT's: source
1280x720, target 1024x512, batch 1 + 1. ms/step is the median of ``--steps`` timed steps after
``--warmup`` untimed ones (CUDA: synchronised before and after each); images/s counts source +
target images. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (the caching allocator's
live tensors, weights included) from before the first step; on the CPU the process's peak
resident set (``VmHWM`` of /proc/self/status, reset before the first step by writing 5 to
/proc/self/clear_refs after glibc's ``malloc_trim``; without that file, ``resource.getrusage``'s
``ru_maxrss``, a lifetime high-water mark that can only hide a smaller later peak). "step MiB" is
that peak minus what was held just before the first step (weights and inputs built): activations,
gradients and momentum. ``--channels-last`` also measures each network in channels_last (what
uda's trainer uses for segmentation on CUDA; inputs stay NCHW, as there). bf16 is autocast, on
the CPU too. On a CPU host that others load, pass ``--threads 1``: with two intra-op threads on
a loaded 2-core host the same step took 0.27-3.4 s against a steady 0.12-0.15 s with one.

One tpld round (``--parts round``): on ``--files`` synthetic GTA5 and Cityscapes frames (the
loader's files, below; Cityscapes ``val`` links to ``train``), ``uda train --method tpld --src gta5
--tgt cityscapes`` with the first of ``--models`` from random weights, no warm-up, one phase-1 round
of ``--steps`` steps at ``--size``/``--tgt-size``, batch ``--batch``, the first of ``--precision``.
Timed inside the run: the round's preparation (the pass over the ``--files`` target images with
CRST's flip, the thresholds, the label selection and voting, the files written) as seconds and
images/s, with its peak memory; and the retraining steps (median ms/step over the steps after the
first, each synchronised; peak memory over them).

One step of each method (``--parts method``; the command above gives the time and peak memory of one
lsd and one i2i step at 1024x512, source-only's beside them): for each of ``--methods`` (default
``lsd,i2i``; segmentation methods), on the same ``--files`` synthetic frames, ``uda train --method M
--src gta5 --tgt cityscapes`` for ``--steps`` steps at ``--size``/``--tgt-size``, batch ``--batch``,
the first of ``--precision``, from random weights (``pretrained=none``), with the method's own
defaults for the pair and the first of ``--models`` as its network, or, with ``--models auto``
(this part only), the method's own: lsd's FCN-8s VGG-16, i2i's and source-only's DeepLab-v2
ResNet-101. Each ``train_step`` of the method's class is timed (synchronised before and after; the
batch is loaded before it, outside the time): ms/step is the median of the steps after the first
(the first, with its lazy set-up, is its own column), steps/s its inverse; peak memory is read
after each step, reset just before the first (as the round's). "params M" counts the method's
networks (F, its generators and discriminators), the sum and each network. lsd's and i2i's widths
are their street defaults (the tiny ones belong to digit scenes) whatever the network. "run" says
how the run ended: DeepLab-v2 ResNet-101 from random weights (its batch norm frozen at identity
statistics) gives logits of ~1e4 and non-finite losses from the second step, in any method
(source-only too); the trainer checks the losses when it logs, here after the last step, and its
error goes in that column (and under the round's table) rather than losing the timed steps.

Loader (``--parts loader``): writes ``--files`` synthetic frames per dataset (photo-like: smooth
colour fields, gradients and noise, so PNG compression is realistic at ~3.5 MB a frame) in the
layouts uda reads, GTA5 (``gta5/images/NNNNN.png`` 1914x1052 RGB + ``gta5/labels/NNNNN.png``
palette PNGs of Cityscapes label ids) and Cityscapes (``leftImg8bit/train/<city>/..._leftImg8bit.png``
2048x1024 + ``gtFine/train/<city>/..._gtFine_labelIds.png``), in a temporary folder or ``--keep
DIR`` (reused when it holds the same files). Then, on the same files:

- uda: ``load_dense`` + ``DenseDataset`` (resize to the run size: GTA5 1280x720, Cityscapes 1024x512,
  no augmentation) + ``DenseStream`` (batch 1, ``N`` DataLoader workers for each N of
  ``--workers``, batches moved to ``--device``): images/s over the ``--files`` batches after the
  first (the first, which starts the workers, is the "first batch" column);
- PIL, serially, as ADVENT's datasets load a sample (``advent/dataset/base_dataset.py``):
  ``Image.open``, ``convert("RGB")``, ``resize`` to the run size with ``Image.BICUBIC``,
  ``np.asarray``; the label ``Image.open``, ``resize`` with ``Image.NEAREST``, ``np.asarray``.
  ADVENT then also maps label ids to train ids and subtracts the mean in float32, left out here
  (so this loop is a little faster than ADVENT's); uda maps ids through one table lookup.
- decode only, per frame: PIL (``dense.read_image``, what uda uses) against
  ``torchvision.io.decode_image`` for images, and PIL against ``torchvision.io.decode_png``
  (``dense.read_png_unchanged``, what uda uses) for labels; alternated file by file.

The PIL pass and the streams run in ``--repeats`` rounds (default 3), alternated, and the table
gives the median and range of each (the decoders make as many passes): on a shared machine one
pass can run at half speed. The stream with 0 workers runs in this process, with its torch
intra-op threads (``--threads``): on a loaded 2-core host two threads made its resize and
collate copies slower than one (session 30's results).

All reads come from the page cache (the files were just written or read). ``--frame-scale`` shrinks
the frames and run sizes together (tests). Progress goes to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = ("deeplabv2_small", "deeplabv2_r101", "fcn8s_vgg16")
NUM_CLASSES = 19
# ADVENT's DeepLab-v2 recipe (methods/source_only.DEEPLAB_RECIPE): SGD, 10x lr on the head.
LR, MOMENTUM, WEIGHT_DECAY = 2.5e-4, 0.9, 5e-4
GTA5_FRAME, CITYSCAPES_FRAME = (1052, 1914), (1024, 2048)  # (H, W) as stored
GTA5_RUN, CITYSCAPES_RUN = (720, 1280), (512, 1024)  # (H, W) uda's default run sizes (gta5.py, cityscapes.py)
CITIES = ("aachen", "bochum", "bremen")
MANIFEST = "segmentation_speed.json"
FILES_VERSION = 1
MIB = 2**20


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (H, W)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1280x720") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive")
    return h, w


def _wh(size: tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]}"


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def machine_line(device) -> str:
    import torch

    load = "/".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"cpu ({platform.processor() or platform.machine()} {torch.backends.cpu.get_cpu_capability()})"
    return (f"device {where}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} intra-op "
            f"threads), load average {load} (1/5/15 min)")


# ---- peak memory ----------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of a stretch of work, in bytes: CUDA's allocator peak, or the CPU process's peak RSS."""

    def __init__(self, device):
        import torch

        self.device, self.torch = device, torch
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
        elif self._clear_refs():
            self.method = "peak RSS (VmHWM, reset via /proc/self/clear_refs after malloc_trim)"
        else:
            self.method = "peak RSS (ru_maxrss, lifetime high-water mark: a later, smaller peak is hidden)"

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak resident set size (Linux >= 4.0)
            return _status_kb("VmHWM") is not None
        except OSError:
            return False

    def current(self) -> int:
        if self.device.type == "cuda":
            return self.torch.cuda.memory_allocated(self.device)
        _malloc_trim()
        rss = _status_kb("VmRSS")
        return rss * 1024 if rss is not None else self._maxrss()

    def reset(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats(self.device)
        elif "VmHWM" in self.method:
            self._clear_refs()

    def peak(self) -> int:
        if self.device.type == "cuda":
            return self.torch.cuda.max_memory_allocated(self.device)
        if "VmHWM" in self.method:
            return _status_kb("VmHWM") * 1024
        return self._maxrss()

    @staticmethod
    def _maxrss() -> int:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def _malloc_trim() -> None:
    """Hand the C heap's free memory back to the OS (glibc), so an earlier row's freed tensors do not
    sit in the resident set and hide the next row's growth (glibc raises its mmap threshold as big
    blocks are freed, so later big tensors come from the heap and stay resident after free)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# ---- training step --------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_train_step(name: str, device, precision: str, channels_last: bool, src_size, tgt_size, batch: int,
                    steps: int, warmup: int, target_pass: str, seed: int = 0) -> dict:
    """One row of the training table: median ms/step, images/s, peak memory."""
    import torch

    from uda_cli.engine.runtime import autocast_for, configure_backends
    from uda_cli.methods.source_only import segmentation_loss
    from uda_cli.models.registry import build_model

    torch.manual_seed(seed)
    configure_backends(device, precision)
    autocast = autocast_for(device, precision)
    mem = PeakMemory(device)
    row = {"model": name, "precision": precision, "channels_last": channels_last, "source": _wh(src_size),
           "target": _wh(tgt_size) if target_pass != "none" else "–", "batch": batch, "steps": steps,
           "memory_method": mem.method}
    model = opt = x_s = y_s = x_t = None
    try:
        model = build_model(name, num_classes=NUM_CLASSES, pretrained="none").to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        opt = torch.optim.SGD(model.param_groups(LR), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        x_s = torch.rand(batch, 3, *src_size, device=device) * 2 - 1
        y_s = torch.randint(0, NUM_CLASSES, (batch, *src_size), device=device)
        y_s[torch.rand(batch, *src_size, device=device) < 0.1] = 255  # some ignored pixels, as real labels have
        x_t = torch.rand(batch, 3, *tgt_size, device=device) * 2 - 1

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = segmentation_loss(model(x_s), y_s)
            with torch.autocast(device.type, enabled=False):
                loss.backward()
            if target_pass == "forward":
                with autocast():
                    out = model(x_t)
                del out
            elif target_pass == "entropy":
                with autocast():
                    p = torch.softmax(model(x_t).float(), dim=1)
                    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(1).mean()
                with torch.autocast(device.type, enabled=False):
                    (1e-3 * ent).backward()
            opt.step()

        gc.collect()
        _sync(device)
        before = mem.current()
        mem.reset()
        for _ in range(warmup):
            step()
        times = []
        for _ in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        peak = mem.peak()
        med = statistics.median(times)
        row.update(ms=1e3 * med, ms_min=1e3 * min(times), ms_max=1e3 * max(times),
                   img_s=(batch * (1 if target_pass == "none" else 2)) / med,
                   peak_mib=peak / MIB, step_mib=(peak - before) / MIB)
    except torch.OutOfMemoryError as e:
        row["error"] = "out of memory: " + str(e).splitlines()[0][:80]
    finally:
        del model, opt, x_s, y_s, x_t
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def fmt_train(rows: list[dict], device_line: str, target_pass: str, warmup: int) -> str:
    methods = sorted({r["memory_method"] for r in rows})
    tgt = {"forward": "source forward+backward, target forward",
           "entropy": "source forward+backward, target forward+entropy backward",
           "none": "source forward+backward only"}[target_pass]
    lines = [f"Training step ({tgt}; SGD on param_groups; pretrained=none, 19 classes). {device_line}.",
             f"ms/step: median (min-max) of the timed steps after {warmup} warm-up steps; img/s counts source + "
             f"target images; peak memory: {'; '.join(methods)}; step MiB = peak minus before the first step.", "",
             "| model | params M | precision | layout | source | target | batch | steps | ms/step | img/s | "
             "peak MiB | step MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = (f"| {r['model']} | {r.get('params_m', float('nan')):.2f} | {r['precision']} | "
                f"{'channels_last' if r['channels_last'] else 'NCHW'} | {r['source']} | {r['target']} | {r['batch']} | "
                f"{r['steps']} |")
        if "error" in r:
            lines.append(f"{head} {r['error']} | – | – | – |")
        else:
            lines.append(f"{head} {r['ms']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f}) | {r['img_s']:.2f} | "
                         f"{r['peak_mib']:.0f} | {r['step_mib']:.0f} |")
    return "\n".join(lines)


# ---- synthetic files ------------------------------------------------------------------------


def photo_like(rng, h: int, w: int):
    """A uint8 [h, w, 3] frame: a smooth colour field, a finer one, a gradient and noise (sigma 4):
    ~3.5 MB as a PNG at 1914x1052, like a game or street frame rather than flat colour or white noise."""
    import numpy as np
    from PIL import Image

    def field(gh, gw, resample):
        small = rng.integers(0, 256, (max(gh, 1), max(gw, 1), 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(small).resize((w, h), resample), np.float32)

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = (0.6 * field(6, 10, Image.BICUBIC) + 0.25 * field(h // 16, w // 16, Image.BILINEAR)
           + (xx / w * 60 + yy / h * 40)[..., None] + rng.normal(0, 4, (h, w, 3)).astype(np.float32))
    return np.clip(img, 0, 255).astype(np.uint8)


def label_ids(rng, h: int, w: int):
    """A uint8 [h, w] map of Cityscapes label ids (0-33) in blocks of ~32 pixels."""
    import numpy as np
    from PIL import Image

    small = rng.integers(0, 34, (max(h // 32, 1), max(w // 32, 1)), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.NEAREST))


def _scaled(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def write_files(root: Path, n: int, scale: float, seed: int = 0) -> dict:
    """``n`` GTA5 and ``n`` Cityscapes (train) pairs under ``root``, unless its manifest says they are there."""
    from PIL import Image
    import numpy as np

    want = {"version": FILES_VERSION, "files": n, "frame_scale": scale, "seed": seed}
    manifest = root / MANIFEST
    try:
        if json.loads(manifest.read_text()) == want:
            return want
    except (OSError, ValueError):
        pass
    from uda_cli.data.labels import CITYSCAPES_PALETTE

    palette = [c for rgb in CITYSCAPES_PALETTE for c in rgb]  # any palette will do: readers use the indices
    rng = np.random.default_rng(seed)
    gta = root / "gta5"
    (gta / "images").mkdir(parents=True, exist_ok=True)
    (gta / "labels").mkdir(parents=True, exist_ok=True)
    gh, gw = _scaled(GTA5_FRAME, scale)
    ch, cw = _scaled(CITYSCAPES_FRAME, scale)
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        Image.fromarray(photo_like(rng, gh, gw)).save(gta / "images" / f"{i:05d}.png")
        lab = Image.frombytes("P", (gw, gh), label_ids(rng, gh, gw).tobytes())  # indices as they are
        lab.putpalette(palette + [0] * (768 - len(palette)))
        lab.save(gta / "labels" / f"{i:05d}.png")
        city = CITIES[i % len(CITIES)]
        stem = f"{city}_{i:06d}_000019"
        img_dir = root / "cityscapes" / "leftImg8bit" / "train" / city
        lab_dir = root / "cityscapes" / "gtFine" / "train" / city
        img_dir.mkdir(parents=True, exist_ok=True)
        lab_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_like(rng, ch, cw)).save(img_dir / f"{stem}_leftImg8bit.png")
        Image.fromarray(label_ids(rng, ch, cw)).save(lab_dir / f"{stem}_gtFine_labelIds.png")
        print(f"  wrote pair {i}/{n} of each dataset ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    manifest.write_text(json.dumps(want) + "\n")
    return want


# ---- real runs: timing a method's steps --------------------------------------------------------


def _link_val(root: Path) -> None:
    """Cityscapes ``val`` -> ``train`` under ``root``: a run evaluates on val, here the same frames."""
    for sub in ("leftImg8bit", "gtFine"):
        val = root / "cityscapes" / sub / "val"
        if not val.exists():
            val.symlink_to("train", target_is_directory=True)


@contextmanager
def timed_train_step(cls, device, mem: PeakMemory):
    """While inside, ``cls.train_step`` is timed: each call synchronised before and after (CUDA);
    ``mem`` is reset just before the first call (on the CPU after ``malloc_trim``) and read after
    each. Yields a dict filled as the run goes: ``ms`` (one per call), ``peak`` (bytes, the highest
    reading), ``cfg`` (the method's config) and ``params`` (``{net: parameters}`` of its networks,
    ``total`` counting a shared parameter once), both taken at the first call. No reference to the
    method is kept, so its networks are freed when the run ends."""
    rec: dict = {"ms": [], "peak": 0, "cfg": None, "params": {}}
    own = "train_step" in cls.__dict__
    step_fn = cls.train_step

    def timed_step(self, batch, step):
        if rec["cfg"] is None:
            rec["cfg"] = self.cfg
            rec["params"] = {k: sum(p.numel() for p in net.parameters()) for k, net in self.nets.items()}
            rec["params"]["total"] = sum(p.numel() for p in self.nets.parameters())
            _sync(device)
            if device.type != "cuda":
                _malloc_trim()
            mem.reset()
        _sync(device)
        t0 = time.perf_counter()
        out = step_fn(self, batch, step)
        _sync(device)
        rec["ms"].append(1000 * (time.perf_counter() - t0))
        rec["peak"] = max(rec["peak"], mem.peak())
        return out

    cls.train_step = timed_step
    try:
        yield rec
    finally:
        if own:
            cls.train_step = step_fn
        else:
            del cls.train_step  # it was inherited


def _train(opts, rec: dict, steps: int) -> str:
    """``uda train`` with ``opts``: "" when the run ends well. A run that fails after its ``steps``
    steps were timed gives its error's first clause (for the table) instead of losing the timings:
    from random weights DeepLab-v2 ResNet-101, whose batch norm is frozen at identity statistics,
    gives logits of ~1e4 and non-finite losses from the second step (any method, source-only too),
    which the trainer finds when it logs, here after the last step. A run that fails before raises."""
    from uda_cli.engine.trainer import train
    from uda_cli.errors import UDAError

    try:
        train(opts, interactive=False)
    except UDAError as e:
        if len(rec["ms"]) < steps:
            raise
        print(f"  the run failed after its {steps} timed steps: {e}", file=sys.stderr, flush=True)
        return str(e).split(" (")[0]
    return ""


# ---- one tpld round ------------------------------------------------------------------------------


def time_round(root: Path, model: str, device, precision: str, size, tgt_size, batch: int, steps: int,
               workers: int, seed: int = 0) -> dict:
    """One tpld round on the files under ``root`` (see the module docstring): the pass and the
    retraining, each with its time and peak memory."""
    from uda_cli.config import TrainOptions
    from uda_cli.methods.cbst import CBST
    from uda_cli.methods.tpld import TPLD

    _link_val(root)
    mem, got = PeakMemory(device), {}
    prepare = CBST.prepare_round

    def timed_prepare(self, ctx):
        _sync(device)
        mem.reset()
        t0 = time.perf_counter()
        prepare(self, ctx)
        _sync(device)
        got["pass_s"], got["pass_peak"], got["images"] = time.perf_counter() - t0, mem.peak(), len(ctx.target)
        mem.reset()

    CBST.prepare_round = timed_prepare
    try:
        with tempfile.TemporaryDirectory(prefix="uda-seg-round-") as tmp, timed_train_step(TPLD, device, mem) as rec:
            opts = TrainOptions(method="tpld", src="gta5", tgt="cityscapes", data_root=root, out=Path(tmp) / "run",
                                device=str(device), precision=precision, batch_size=batch, seed=seed,
                                src_size=_wh(size), tgt_size=_wh(tgt_size), workers=workers, eval_every=0,
                                save_every=10_000_000, log_every=max(steps, 1),
                                params={"model": model, "pretrained": "none", "warmup_steps": 0, "phase1_rounds": 1,
                                        "phase2_rounds": 0, "round_steps": steps})
            note = _train(opts, rec, steps)
    finally:
        CBST.prepare_round = prepare
    timed = rec["ms"][1:] or rec["ms"]
    return {"model": model, "precision": precision, "size": _wh(size), "tgt_size": _wh(tgt_size), "batch": batch,
            "images": got["images"], "pass_s": got["pass_s"], "pass_img_s": got["images"] / got["pass_s"],
            "pass_mib": got["pass_peak"] / MIB, "step_ms": statistics.median(timed), "steps": len(timed),
            "step_mib": rec["peak"] / MIB, "memory": mem.method, "note": note}


def fmt_round(row: dict, device_line: str) -> str:
    return "\n".join([
        f"One tpld round, {row['model']} {row['precision']}, source {row['size']}, target {row['tgt_size']}, "
        f"batch {row['batch']} + {row['batch']}; {device_line}; memory: {row['memory']}",
        "",
        "| part | images or steps | time | rate | peak MiB |",
        "|---|---|---|---|---|",
        f"| pass (predict with flip, thresholds, selection, voting, files) | {row['images']} images | "
        f"{row['pass_s']:.1f} s | {row['pass_img_s']:.2f} images/s | {row['pass_mib']:.0f} |",
        f"| retraining (phase-1 step: source CE + bootstrapped target + MRKLD) | {row['steps']} steps | "
        f"{row['step_ms']:.0f} ms/step (median) | {1000 / row['step_ms']:.2f} steps/s | {row['step_mib']:.0f} |",
    ] + ([f"\nThe run failed after the timed steps: {row['note']}."] if row.get("note") else []))


# ---- one step of each method --------------------------------------------------------------------


def time_method(root: Path, method: str, model: str, device, precision: str, size, tgt_size, batch: int,
                steps: int, workers: int, seed: int = 0) -> dict:
    """``uda train --method METHOD --src gta5 --tgt cityscapes`` for ``steps`` steps on the files under
    ``root`` with the method's defaults, ``model`` (``auto``: the method's own network) from random
    weights; each step timed (see the module docstring)."""
    import torch

    from uda_cli.config import TrainOptions
    from uda_cli.methods.registry import get_method
    from uda_cli.methods.source_only import segmentation_net_name

    _link_val(root)
    mem = PeakMemory(device)
    params = {"pretrained": "none"} if model == "auto" else {"model": model, "pretrained": "none"}
    with tempfile.TemporaryDirectory(prefix="uda-seg-method-") as tmp, \
            timed_train_step(get_method(method), device, mem) as rec:
        opts = TrainOptions(method=method, src="gta5", tgt="cityscapes", data_root=root, out=Path(tmp) / "run",
                            device=str(device), precision=precision, batch_size=batch, seed=seed, steps=steps,
                            src_size=_wh(size), tgt_size=_wh(tgt_size), workers=workers, eval_every=0,
                            save_every=10_000_000, log_every=max(steps, 1), params=params)
        note = _train(opts, rec, steps)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    cfg, timed = rec["cfg"], rec["ms"][1:] or rec["ms"]
    net = getattr(cfg, "model", None)
    return {"method": method, "network": segmentation_net_name(cfg) if net == "auto" else (net or "?"),
            "precision": precision, "size": _wh(size), "tgt_size": _wh(tgt_size), "batch": batch,
            "steps": len(timed), "step_ms": statistics.median(timed), "ms_min": min(timed), "ms_max": max(timed),
            "first_ms": rec["ms"][0], "peak_mib": rec["peak"] / MIB, "params": rec["params"], "memory": mem.method,
            "note": note}


def fmt_method(rows: list[dict], device_line: str) -> str:
    r0 = rows[0]
    lines = [f"One training step of each method (uda train --src gta5 --tgt cityscapes, the method's defaults, "
             f"pretrained=none), {r0['precision']}, source {r0['size']}, target {r0['tgt_size']}, batch {r0['batch']} + "
             f"{r0['batch']}; {device_line}; ms/step: median (min-max) of the steps after the first; peak memory over "
             f"all steps: {r0['memory']}; params: millions, per network (sum); run: how it ended after the timed steps "
             f"(random weights can make losses non-finite; the steps were timed all the same).", "",
             "| method | network | steps | ms/step | first step ms | steps/s | peak MiB | params M | run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        nets = " + ".join(f"{k} {v / 1e6:.2f}" for k, v in r["params"].items() if k != "total")
        lines.append(f"| {r['method']} | {r['network']} | {r['steps']} | {r['step_ms']:.0f} ({r['ms_min']:.0f}-"
                     f"{r['ms_max']:.0f}) | {r['first_ms']:.0f} | {1000 / r['step_ms']:.2f} | {r['peak_mib']:.0f} | "
                     f"{r['params']['total'] / 1e6:.2f} ({nets}) | {r['note'] or 'ok'} |")
    return "\n".join(lines)


# ---- loader -----------------------------------------------------------------------------------


def pil_sample(image_path, label_path, size: tuple[int, int]):
    """ADVENT's loading of one sample (base_dataset._load_img), without its id mapping and mean."""
    import numpy as np
    from PIL import Image

    img = Image.open(image_path).convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
    x = np.asarray(img)
    lab = Image.open(label_path).resize((size[1], size[0]), Image.NEAREST)
    return x, np.asarray(lab)


def time_pil(source, size) -> float:
    """images/s of the serial PIL loop over every sample of ``source`` (after one untimed sample)."""
    pil_sample(source.images[0], source.labels[0], size)
    t0 = time.perf_counter()
    for i in range(len(source)):
        pil_sample(source.images[i], source.labels[i], size)
    return len(source) / (time.perf_counter() - t0)


def time_uda(source, size, workers: int, device) -> tuple[float, float]:
    """(images/s over ``len(source)`` batches after the first, seconds to the first batch) of uda's stream."""
    from uda_cli.data.streaming import Augment, DenseDataset, DenseStream

    stream = DenseStream(DenseDataset(source, size, Augment(), seed=0, stream="src"), batch_size=1, seed=1,
                         device=device, num_workers=workers)
    try:
        t0 = time.perf_counter()
        stream.next()
        _sync(device)
        t1 = time.perf_counter()
        n = len(source)
        for _ in range(n):
            stream.next()
        _sync(device)
        return n / (time.perf_counter() - t1), t1 - t0
    finally:
        stream.close()


def time_decoders(source, passes: int = 1) -> dict[str, float]:
    """Median ms per file over ``passes`` passes: images by PIL (uda's read_image) and
    torchvision.io.decode_image, labels by PIL and torchvision.io.decode_png (uda's
    read_png_unchanged); the decoders alternate file by file, in turned order every other file."""
    import numpy as np
    from PIL import Image

    from uda_cli.data.dense import read_image, read_png_unchanged

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its decoders
        from torchvision.io import decode_image, read_file

        def tv_image(p):
            return decode_image(read_file(str(p)))

        def pil_label(p):
            with Image.open(p) as im:
                return np.array(im)

        pairs = {"image_pil": (read_image, "images"), "image_tv": (tv_image, "images"),
                 "label_pil": (pil_label, "labels"), "label_tv": (read_png_unchanged, "labels")}
        times: dict[str, list[float]] = {k: [] for k in pairs}
        for j in range(passes * len(source)):
            i = j % len(source)
            order = list(pairs) if j % 2 == 0 else list(reversed(pairs))
            for k in order:
                fn, attr = pairs[k]
                p = getattr(source, attr)[i]
                t0 = time.perf_counter()
                fn(p)
                times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def run_loader(root: Path, files: int, workers: list[int], scale: float, device, seed: int = 0,
               repeats: int = 3):
    from uda_cli.data.registry import load_dense

    t0 = time.perf_counter()
    write_files(root, files, scale, seed)
    print(f"files ready in {root} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    rows, decode = [], []
    for domain, split, run in (("gta5", "all", GTA5_RUN), ("cityscapes", "train", CITYSCAPES_RUN)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = load_dense(domain, split, data_root=root)
        size = _scaled(run, scale)
        mb = statistics.mean(Path(p).stat().st_size for p in source.images) / 1e6
        native = tuple(source.native_size(0))
        # Decoders first: this also reads every file once, so all that follows finds them in the page cache.
        dec = time_decoders(source, repeats)
        decode.append({"dataset": domain, "frame": _wh(native), "mb": mb, "files": len(source), "passes": repeats,
                       **dec})
        print(f"{domain}: decoders {dec}", file=sys.stderr, flush=True)
        # Rounds alternate the PIL loop and the streams, so a change in the machine's load hits both.
        pil_runs, uda_runs = [], {w: [] for w in workers}
        for r in range(repeats):
            pil_runs.append(time_pil(source, size))
            print(f"{domain}: round {r + 1}/{repeats}: PIL loop {pil_runs[-1]:.2f} img/s", file=sys.stderr, flush=True)
            for w in workers:
                uda_runs[w].append(time_uda(source, size, w, device))
                print(f"{domain}: round {r + 1}/{repeats}: uda stream, {w} workers: {uda_runs[w][-1][0]:.2f} img/s "
                      f"(first batch {uda_runs[w][-1][1]:.2f} s)", file=sys.stderr, flush=True)
        for w in workers:
            rows.append({"dataset": domain, "frame": _wh(native), "mb": mb, "run": _wh(size), "files": len(source),
                         "workers": w, "repeats": repeats, "uda": [u for u, _ in uda_runs[w]],
                         "first_s": statistics.median(f for _, f in uda_runs[w]), "pil": pil_runs})
    return rows, decode


def fmt_loader(rows: list[dict], decode: list[dict], device_line: str) -> str:
    lines = [f"Loader: uda's DenseDataset + DenseStream (batch 1, resize only) against the papers' serial PIL loop "
             f"(open, RGB, bicubic resize, np.asarray; label nearest), same files, page cache warm; img/s: median "
             f"(min-max) of {rows[0]['repeats'] if rows else 0} rounds, each a PIL pass then one stream per worker "
             f"count; uda/PIL: ratio of the medians. {device_line}.", "",
             "| dataset | frame | MB/frame | run size | files | workers | uda img/s | first batch s | PIL img/s | "
             "uda/PIL |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        uda, pil = statistics.median(r["uda"]), statistics.median(r["pil"])
        lines.append(f"| {r['dataset']} | {r['frame']} | {r['mb']:.2f} | {r['run']} | {r['files']} | {r['workers']} | "
                     f"{uda:.2f} ({min(r['uda']):.2f}-{max(r['uda']):.2f}) | {r['first_s']:.2f} | "
                     f"{pil:.2f} ({min(r['pil']):.2f}-{max(r['pil']):.2f}) | {uda / pil:.2f} |")
    passes = f"{decode[0]['files']} files x {decode[0]['passes']} passes" if decode else ""
    lines += ["", f"Decode only, median ms per file over {passes} (the decoders alternate file by file):", "",
              "| dataset | frame | MB/frame | image PIL | image torchvision decode_image | tv/PIL | label PIL | "
              "label torchvision decode_png | tv/PIL |",
              "|---|---|---|---|---|---|---|---|---|"]
    for d in decode:
        lines.append(f"| {d['dataset']} | {d['frame']} | {d['mb']:.2f} | {d['image_pil']:.1f} | {d['image_tv']:.1f} | "
                     f"{d['image_tv'] / d['image_pil']:.2f} | {d['label_pil']:.2f} | {d['label_tv']:.2f} | "
                     f"{d['label_tv'] / d['label_pil']:.2f} |")
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="train,loader",
                    help="train, loader, round and/or method (default: train,loader)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma list of {', '.join(MODELS)}; --parts method alone also takes auto (each method's own)")
    ap.add_argument("--methods", default="lsd,i2i", help="--parts method: comma list of methods (default: lsd,i2i)")
    ap.add_argument("--size", type=parse_size, default=(720, 1280), metavar="WxH", help="source size (1280x720)")
    ap.add_argument("--tgt-size", type=parse_size, default=(512, 1024), metavar="WxH", help="target size (1024x512)")
    ap.add_argument("--batch", type=int, default=1, help="images per domain per step (1: 1 source + 1 target)")
    ap.add_argument("--precision", default="fp32", help="comma list of fp32, bf16 (bf16: autocast)")
    ap.add_argument("--channels-last", action="store_true", help="also measure each network in channels_last")
    ap.add_argument("--target-pass", choices=("forward", "entropy", "none"), default="forward")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--files", type=int, default=24, help="synthetic frames per dataset for the loader")
    ap.add_argument("--workers", default="0,1,2,4", help="comma list of DataLoader worker counts")
    ap.add_argument("--repeats", type=int, default=3, help="loader rounds (PIL pass + streams) per dataset")
    ap.add_argument("--keep", type=Path, help="write (or reuse) the loader's files here, not in a temporary folder")
    ap.add_argument("--frame-scale", type=float, default=1.0, help="shrink frames and run sizes (tests)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads of this process (default: torch's); "
                    "DataLoader workers use 1 each")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    parts = _list(args.parts)
    if not parts or set(parts) - {"train", "loader", "round", "method"}:
        ap.error(f"--parts takes train, loader, round and/or method, not {args.parts!r}")
    models = _list(args.models)
    if not models:
        ap.error("--models is empty")
    if models == ["auto"]:
        if set(parts) & {"train", "round"}:
            ap.error("--models auto (each method's own network) is for --parts method only")
    elif set(models) - set(MODELS):
        ap.error(f"unknown model {sorted(set(models) - set(MODELS))[0]!r}; models: {', '.join(MODELS)}, "
                 "or auto alone with --parts method")
    methods = _list(args.methods)
    if "method" in parts:
        from uda_cli.errors import ConfigError
        from uda_cli.methods.registry import get_method

        if not methods:
            ap.error("--methods is empty")
        for m in methods:
            try:
                cls = get_method(m)
            except ConfigError as e:
                ap.error(str(e))
            if "segmentation" not in cls.tasks:
                ap.error(f"method {m!r} does not train segmentation networks")
    precisions = _list(args.precision)
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        ap.error(f"--precision takes fp32 and/or bf16, not {args.precision!r}")
    try:
        workers = [int(w) for w in _list(args.workers)]
    except ValueError:
        ap.error(f"--workers takes a comma list of integers, not {args.workers!r}")
    if (args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.files < 1 or args.repeats < 1
            or any(w < 0 for w in workers)):
        ap.error("--batch, --steps, --files and --repeats must be positive; --warmup and --workers at least 0")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be positive")
    if not 0 < args.frame_scale <= 1:
        ap.error("--frame-scale must be in (0, 1]")

    import torch

    from uda_cli.engine.runtime import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if "train" in parts:
        rows = []
        for name in models:
            for precision in precisions:
                for cl in (False, True) if args.channels_last else (False,):
                    print(f"{name} {precision}{' channels_last' if cl else ''} ...", file=sys.stderr, flush=True)
                    row = time_train_step(name, device, precision, cl, args.size, args.tgt_size, args.batch,
                                          args.steps, args.warmup, args.target_pass, args.seed)
                    print(f"  {row.get('ms', float('nan')):.1f} ms/step {row.get('error', '')}", file=sys.stderr,
                          flush=True)
                    rows.append(row)
        print(fmt_train(rows, machine_line(device), args.target_pass, args.warmup) + "\n", flush=True)
    def in_files(fn):
        """``fn(root)`` on the synthetic files' folder: ``--keep`` (made if missing), else a
        temporary one removed afterwards."""
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            return fn(args.keep)
        with tempfile.TemporaryDirectory(prefix="uda-seg-speed-") as tmp:
            return fn(Path(tmp))

    if "loader" in parts:
        rows, decode = in_files(lambda root: run_loader(root, args.files, workers, args.frame_scale, device,
                                                        args.seed, args.repeats))
        print(fmt_loader(rows, decode, machine_line(device)) + "\n", flush=True)
    if "round" in parts:
        def one(root: Path) -> dict:
            write_files(root, args.files, args.frame_scale, args.seed)
            return time_round(root, models[0], device, precisions[0], args.size, args.tgt_size, args.batch,
                              args.steps, workers[-1], args.seed)

        print(fmt_round(in_files(one), machine_line(device)) + "\n", flush=True)
    if "method" in parts:
        def each(root: Path) -> list[dict]:
            write_files(root, args.files, args.frame_scale, args.seed)
            rows = []
            for m in methods:
                print(f"{m} ({models[0]}) ...", file=sys.stderr, flush=True)
                rows.append(time_method(root, m, models[0], device, precisions[0], args.size, args.tgt_size,
                                        args.batch, args.steps, workers[-1], args.seed))
                print(f"  {rows[-1]['step_ms']:.0f} ms/step", file=sys.stderr, flush=True)
            return rows

        print(fmt_method(in_files(each), machine_line(device)) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
