"""t-SNE maps of a checkpoint's features on a source and a target domain, and the proxy
A-distance between them.

For each domain, up to N images are drawn class-balanced with a fixed seed
(:func:`balanced_indices`), embedded by the method's ``features()`` and flattened; both
sets are embedded together by openTSNE (FFT-accelerated gradients; PCA initialisation);
``tsne.png`` shows the map coloured by domain and by class, ``tsne.csv`` holds the points,
``tsne.json`` the settings and the proxy A-distance.

Proxy A-distance (Ben-David et al. 2007; Ganin et al. 2016): d_A = 2 (1 - 2 eps), with eps
the held-out error of a linear classifier telling source features from target features.
Ours is an L2-regularised logistic regression (torch, full-batch L-BFGS; the papers use a
linear SVM, equally linear and without a scikit-learn dependency), trained on a random half
of each domain's points, its L2 weight chosen on a quarter of that half, and tested on the
other half. eps is the *balanced* error (mean of the two domains' errors) so that unequal
numbers of points cannot lower it. d_A near 2: the domains are linearly separable in
feature space; near 0: they are not. It can dip below 0 when eps > 0.5 by chance.

Segmentation runs (:func:`draw_pixels`): the points are *pixels* of the network's feature
map (``method.features``, [B, C, h, w]: stride 8 for DeepLab-v2). Each domain's images are
read in a seeded random order (at most ``--max-images``, default 100), resized to the size
the run read that domain at (config.json ``sizes``: the run's source at its ``--src-size``,
any other domain at its ``--tgt-size``, the size ``uda evaluate`` reads at), and their labels are
downsampled to the feature map's h x w by *nearest* (``nearest-exact``: the label pixel
under each feature cell's centre); ignore pixels (255) are skipped. A :class:`PixelPool`
keeps a seeded uniform sample of up to ``--samples`` pixel vectors per class, never a
whole feature map beyond the batch at hand; reading stops once every class of the list
holds its equal share (ceil(samples / K)) or the images run out. The draw is then
class-balanced by :func:`balanced_indices`, as for images: an equal number per class, a
class short of pixels gives what it has and the others fill its share. ``--easy-hard``
(tpld runs) reads the target's training images that the last phase-2 round at or before
the checkpoint's step listed as easy or hard (``rounds/NN/stats.json``) and colours the
target points by that split in a third panel (TPLD, ECCV 2020, Fig. 6).

Target labels are read (both here and for classification): only to colour the map and to
balance the draw, never for the distance; this is a diagnostic, not a training signal.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from uda_cli import __version__
from uda_cli.config import TsneOptions
from uda_cli.data.registry import DomainSpec, get_domain, load_domain, parse_domain, resolve_split, split_slice
from uda_cli.data.transforms import normalize
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine.runtime import autocast_for, resolve_device
from uda_cli.errors import ConfigError, UDAError
from uda_cli.methods.base import Method, RunSpec
from uda_cli.viz import Progress

EARLY_ITERS, ITERS = 250, 500  # openTSNE's defaults: early exaggeration, then the main phase
CALLBACK_EVERY = 25
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)  # weaker than 1e-3 barely changes eps and makes L-BFGS crawl on separable data
MIN_PER_DOMAIN = 4  # the domain classifier needs points on both sides of each split
DEFAULT_BATCH_SIZE = 512  # classification; segmentation batches about a megapixel (setup.eval_batch_size)
DEFAULT_MAX_IMAGES = 100  # segmentation: images read per domain at most


@dataclass
class TsneResult:
    out: Path
    png: Path
    csv: Path
    json: Path
    report: dict[str, Any]


# ---- drawing samples ------------------------------------------------------------------------

def balanced_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` indices, as class-balanced as the labels allow, in a seeded order.

    Each class's indices are shuffled; then the first of every class come first, the second
    of every class next, and so on: a small class runs out and the others fill its share.
    Classes with fewer than their share give all they have.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[rng.permutation(where)] = np.arange(len(where))
    tie = rng.permutation(len(labels))  # which class goes first within a rank: random, fixed by seed
    order = np.lexsort((tie, rank))
    return np.sort(order[: min(n, len(labels))])


@torch.no_grad()
def extract_features(method: Method, images: torch.Tensor, batch_size: int, device: torch.device,
                     progress: Progress | None = None) -> np.ndarray:
    """``method.features`` of uint8 images, batch by batch, flattened to ``float32 [N, D]``."""
    autocast = autocast_for(device)
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = normalize(images[i : i + batch_size].to(device))
        with autocast():
            f = method.features(x)
        out.append(f.float().flatten(1).cpu())
        if progress is not None:
            progress.advance(x.shape[0])
    return torch.cat(out).numpy()


def draw_features(method: Method, spec: DomainSpec, split: str, n: int, seed: int, opts: TsneOptions,
                  device: torch.device, interactive: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(features [M, D], labels [M], indices into the split [M])`` for up to ``n`` images of a
    classification domain (segmentation: :func:`draw_pixels`)."""
    if spec.task != "classification":
        raise ValueError(f"draw_features reads classification domains; {spec.name} goes through draw_pixels")
    run = method.spec
    images, labels = load_domain(spec.name, split, opts.data_root, channels=run.channels, size=run.image_size)
    idx = balanced_indices(labels.numpy(), n, seed)
    with Progress(f"features {spec.name}:{split}", len(idx), interactive=interactive, unit="images") as p:
        feats = extract_features(method, images[torch.from_numpy(idx)], opts.batch_size or DEFAULT_BATCH_SIZE,
                                 device, p)
    return feats, labels.numpy()[idx], idx


# ---- segmentation: per-pixel samples ---------------------------------------------------------

class PixelPool:
    """A seeded uniform sample, without replacement, of up to ``cap`` pixels per class from a
    stream of feature maps (priority sampling: every pixel gets a uniform random key and each
    class keeps the ``cap`` smallest keys seen so far). Only the kept pixel vectors are held:
    at most ``num_classes x cap`` of them. ``cap`` = the draw's size keeps the final
    class-balanced draw the one over all pixels read: no class ever gets more than that.
    """

    def __init__(self, num_classes: int, cap: int, seed: int):
        self.k, self.cap = num_classes, cap
        self.rng = np.random.default_rng(seed)
        self.keys: list[np.ndarray] = [np.empty(0) for _ in range(num_classes)]
        self.feats: list[np.ndarray | None] = [None] * num_classes
        self.where: list[np.ndarray] = [np.empty((0, 3), np.int64) for _ in range(num_classes)]  # image, row, col

    def add(self, features: np.ndarray, labels: np.ndarray, image: int) -> None:
        """One image: ``features [h, w, D]`` and its ``labels [h, w]`` (train ids; >= K: ignored)."""
        h, w = labels.shape
        flat = labels.reshape(-1)
        f = features.reshape(h * w, -1)
        for c in np.unique(flat):
            c = int(c)
            if c < 0 or c >= self.k:  # 255: ignore
                continue
            pix = np.flatnonzero(flat == c)
            keys = self.rng.random(len(pix))
            if len(self.keys[c]) >= self.cap:  # full: only keys below the largest kept can enter
                m = keys < self.keys[c].max()
                pix, keys = pix[m], keys[m]
            if len(pix) > self.cap:
                sel = np.argpartition(keys, self.cap - 1)[: self.cap]
                pix, keys = pix[sel], keys[sel]
            if not len(pix):
                continue
            where = np.stack([np.full(len(pix), image, np.int64), pix // w, pix % w], 1)
            keys = np.concatenate([self.keys[c], keys])
            feats = f[pix].astype(np.float32) if self.feats[c] is None else np.concatenate([self.feats[c], f[pix]])
            where = np.concatenate([self.where[c], where])
            if len(keys) > self.cap:
                keep = np.sort(np.argpartition(keys, self.cap - 1)[: self.cap])
                keys, feats, where = keys[keep], feats[keep], where[keep]
            self.keys[c], self.feats[c], self.where[c] = keys, np.ascontiguousarray(feats), where

    def counts(self) -> np.ndarray:
        return np.array([len(k) for k in self.keys], dtype=np.int64)

    def draw(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(features [M, D], labels [M], where [M, 3] = image, row, col)``: up to ``n`` pixels,
        class-balanced (:func:`balanced_indices`)."""
        present = [c for c in range(self.k) if len(self.keys[c])]
        if not present:
            return np.empty((0, 0), np.float32), np.empty(0, np.int64), np.empty((0, 3), np.int64)
        labels = np.concatenate([np.full(len(self.keys[c]), c, np.int64) for c in present])
        idx = balanced_indices(labels, n, seed)
        feats = np.concatenate([self.feats[c] for c in present])[idx]
        where = np.concatenate([self.where[c] for c in present])[idx]
        return feats, labels[idx], where


@dataclass
class PixelDraw:
    features: np.ndarray  # [M, D]
    labels: np.ndarray  # [M] train ids
    indices: np.ndarray  # [M] the pixel's image, an index into the split
    rows: np.ndarray  # [M] row and column on the feature map
    cols: np.ndarray
    stems: list[str]  # [M] the pixel's image, by name
    images_read: int
    feature_map: tuple[int, int]  # (h, w)
    size: tuple[int, int]  # (H, W) the images were resized to


@torch.no_grad()
def draw_pixels(method: Method, source, order: Sequence[int], size: tuple[int, int], n: int, seed: int,
                batch_size: int, workers: int, device: torch.device, label: str,
                interactive: bool | None = None) -> PixelDraw:
    """Up to ``n`` class-balanced pixels of ``method.features`` on the images ``order`` of the
    labelled :class:`~uda_cli.data.dense.DenseSource` ``source`` (read in that order, resized
    to ``size``); see the module docstring. Reading stops once every class holds
    ceil(n / K) pixels."""
    import torch.nn.functional as F

    from uda_cli.engine.seg_eval import ResizedSamples, collate_samples

    k = method.spec.num_classes
    share = math.ceil(n / k)
    pool = PixelPool(k, n, seed)
    loader = torch.utils.data.DataLoader(
        ResizedSamples(source, order, size), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=collate_samples, pin_memory=device.type == "cuda", generator=torch.Generator())
    autocast = autocast_for(device)
    read, fmap = 0, (0, 0)
    with Progress(f"features {label}", len(order), interactive=interactive, unit="images") as p:
        for batch in loader:
            if isinstance(batch, UDAError):
                raise batch
            idx, images, labels = batch
            x = normalize(images.to(device, non_blocking=True))
            with autocast():
                f = method.features(x)
            f = f.float().permute(0, 2, 3, 1).cpu().numpy()  # [B, h, w, D]
            fmap = (int(f.shape[1]), int(f.shape[2]))
            for j, lab in enumerate(labels):
                small = F.interpolate(lab[None, None].float(), size=fmap, mode="nearest-exact")[0, 0]
                pool.add(f[j], small.to(torch.int64).numpy(), int(idx[j]))
            del f
            read += len(labels)
            p.advance(len(labels))
            if pool.counts().min() >= share:
                break
    feats, y, where = pool.draw(n, seed)
    stems = {int(i): source.stem(int(i)) for i in np.unique(where[:, 0])}
    return PixelDraw(feats, y, where[:, 0].copy(), where[:, 1].copy(), where[:, 2].copy(),
                     [stems[int(i)] for i in where[:, 0]], read, fmap, tuple(size))


# ---- proxy A-distance -----------------------------------------------------------------------

def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros((), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=100, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)  # convex: one L-BFGS run from zero converges
    return w.detach(), b.detach()


def _balanced_error(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    wrong = ((x @ w + b > 0).to(y.dtype) != y).to(torch.float64)
    return 0.5 * float(wrong[y == 0].mean() + wrong[y == 1].mean())


def proxy_a_distance(f_s: np.ndarray, f_t: np.ndarray, seed: int = 0) -> dict[str, float]:
    """``{"proxy_a_distance": 2(1 - 2 eps), "domain_error": eps, "l2": chosen weight}``."""
    if len(f_s) < MIN_PER_DOMAIN or len(f_t) < MIN_PER_DOMAIN:
        raise ConfigError(f"the proxy A-distance needs at least {MIN_PER_DOMAIN} samples per domain")
    g = torch.Generator().manual_seed(seed)

    def halves(n: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.randperm(n, generator=g) + offset
        return p[: n // 2], p[n // 2 :]

    x = torch.from_numpy(np.concatenate([f_s, f_t])).to(torch.float64)
    y = torch.cat([torch.zeros(len(f_s)), torch.ones(len(f_t))]).to(torch.float64)
    (tr_s, te_s), (tr_t, te_t) = halves(len(f_s), 0), halves(len(f_t), len(f_s))
    train, test = torch.cat([tr_s, tr_t]), torch.cat([te_s, te_t])
    # Standardise with the training half's statistics: one L2 grid fits every feature scale.
    mu, sd = x[train].mean(0), x[train].std(0).clamp(min=1e-8)
    x = (x - mu) / sd

    # The L2 weight: chosen on a quarter of the training half (per domain), never on the test half.
    fit_s, val_s = tr_s[: len(tr_s) * 3 // 4], tr_s[len(tr_s) * 3 // 4 :]
    fit_t, val_t = tr_t[: len(tr_t) * 3 // 4], tr_t[len(tr_t) * 3 // 4 :]
    fit, val = torch.cat([fit_s, fit_t]), torch.cat([val_s, val_t])
    best = min(L2_GRID, key=lambda l2: _balanced_error(x[val], y[val], *_fit_logistic(x[fit], y[fit], l2)))
    w, b = _fit_logistic(x[train], y[train], best)
    eps = _balanced_error(x[test], y[test], w, b)
    return {"proxy_a_distance": 2 * (1 - 2 * eps), "domain_error": eps, "l2": best}


# ---- embedding ------------------------------------------------------------------------------

def effective_perplexity(perplexity: float, n: int) -> float:
    """t-SNE needs about 3 x perplexity neighbours per point: cap it at (n - 1) / 3."""
    return min(perplexity, (n - 1) / 3)


def embed(features: np.ndarray, perplexity: float, seed: int, progress: Progress | None = None,
          n_jobs: int = 1) -> tuple[np.ndarray, float]:
    """2-D openTSNE embedding (FFT gradients) and its final KL divergence."""
    from openTSNE import TSNE

    def tick(iteration, error, embedding):
        if progress is not None:
            progress.advance(CALLBACK_EVERY)
        return False  # never stop early

    tsne = TSNE(n_components=2, perplexity=perplexity, early_exaggeration_iter=EARLY_ITERS, n_iter=ITERS,
                negative_gradient_method="fft", initialization="pca", random_state=seed, n_jobs=n_jobs,
                callbacks=tick, callbacks_every_iters=CALLBACK_EVERY, verbose=False)
    emb = tsne.fit(np.ascontiguousarray(features, dtype=np.float64))
    return np.asarray(emb, dtype=np.float64), float(getattr(emb, "kl_divergence", float("nan")))


# ---- outputs --------------------------------------------------------------------------------

def _class_colours(k: int):
    from matplotlib import colormaps

    if k <= 10:
        return [colormaps["tab10"](i) for i in range(k)]
    if k <= 20:
        return [colormaps["tab20"](i) for i in range(k)]
    return [colormaps["turbo"](i / max(k - 1, 1)) for i in range(k)]


def palette_colours(palette, k: int):
    """A domain's ``(r, g, b)`` 0-255 palette (Cityscapes' official colours) as matplotlib
    colours, or None where it has not one colour per class (then :func:`_class_colours`)."""
    if not palette or len(palette) != k:
        return None
    return [tuple(v / 255 for v in rgb) + (1.0,) for rgb in palette]


GROUP_COLOURS = {"easy": "tab:green", "hard": "tab:red"}


def plot(xy: np.ndarray, domain: np.ndarray, labels: np.ndarray, domain_names: tuple[str, str],
         classes: tuple[str, ...], title: str, colours=None, groups: np.ndarray | None = None) -> bytes:
    """Two panels (by domain; by class, marker by domain) with legends, as PNG bytes.

    ``colours``: one matplotlib colour per class (default: tab10 / tab20 / turbo by count).
    ``groups``: a name per point ("easy", "hard"; "" for none); a third panel then shows the
    target's points coloured by group over the source's in grey (TPLD's Fig. 6).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(13, 6) if groups is None else (19, 6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if groups is None else 3)
    ax_d, ax_c = axes[0], axes[1]
    size = 10 if len(xy) <= 2000 else 4
    markers = ("o", "^")
    for d, (name, colour) in enumerate(zip(domain_names, ("tab:blue", "tab:orange"))):
        m = domain == d
        ax_d.scatter(xy[m, 0], xy[m, 1], s=size, c=[colour], marker=markers[d], alpha=0.6, linewidths=0, label=name)
    ax_d.set_title("by domain")
    ax_d.legend(loc="best", markerscale=2, fontsize=8)
    colours = list(colours) if colours is not None else _class_colours(len(classes))
    for d in (0, 1):
        for k in range(len(classes)):
            m = (domain == d) & (labels == k)
            if m.any():
                ax_c.scatter(xy[m, 0], xy[m, 1], s=size, c=[colours[k]], marker=markers[d], alpha=0.6, linewidths=0)
    handles = [Line2D([], [], ls="", marker="s", color=colours[k], label=c) for k, c in enumerate(classes)]
    handles += [Line2D([], [], ls="", marker=markers[d], color="grey", label=name) for d, name in enumerate(domain_names)]
    ax_c.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7,
                ncol=max(1, math.ceil(len(handles) / 25)), frameon=False)
    ax_c.set_title("by class (marker: domain)")
    if groups is not None:
        ax_g = axes[2]
        m = domain == 0
        ax_g.scatter(xy[m, 0], xy[m, 1], s=size, c=["lightgrey"], marker=markers[0], alpha=0.5, linewidths=0,
                     label=domain_names[0])
        for name, colour in GROUP_COLOURS.items():
            m = (domain == 1) & (groups == name)
            if m.any():
                ax_g.scatter(xy[m, 0], xy[m, 1], s=size, c=[colour], marker=markers[1], alpha=0.6, linewidths=0,
                             label=f"{domain_names[1]} {name} images")
        ax_g.legend(loc="best", markerscale=2, fontsize=8)
        ax_g.set_title("target by image: easy / hard")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def csv_text(xy: np.ndarray, domain: np.ndarray, labels: np.ndarray, indices: np.ndarray,
             domain_names: tuple[str, str], classes: tuple[str, ...],
             extra: dict[str, Sequence[Any]] | None = None) -> str:
    """One row per point: x, y, domain, label (class name), index (the image's, in its split),
    then the ``extra`` columns (segmentation: image, row, col; with --easy-hard, difficulty)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    extra = extra or {}
    w.writerow(["x", "y", "domain", "label", "index", *extra])
    for j, ((x, y), d, k, i) in enumerate(zip(xy, domain, labels, indices)):
        w.writerow([f"{x:.6g}", f"{y:.6g}", domain_names[d], classes[k], int(i), *(col[j] for col in extra.values())])
    return buf.getvalue()


# ---- the command's library function ----------------------------------------------------------

def _resolve(text: str, run: RunSpec, default: str = "eval_split") -> tuple[DomainSpec, str]:
    name, split = parse_domain(text)
    spec = get_domain(name)
    split = resolve_split(spec, split, getattr(spec, default))
    if spec.task != run.task or spec.classes != run.classes:
        raise ConfigError(f"{spec.name}:{split} is not a {run.task} domain of the checkpoint's classes "
                          f"({', '.join(run.classes)}); pick one that is")
    return spec, split


def _run_sizes(meta: dict[str, Any], run: RunSpec) -> dict[str, tuple[int, int]]:
    """(H, W) the run read its source and its target at (config.json ``sizes``)."""
    sizes = meta.get("sizes")
    if isinstance(sizes, str):  # checkpoint metadata holds it as JSON text
        sizes = json.loads(sizes)
    sizes = sizes or {}
    tgt = tuple(sizes.get("tgt") or run.image_size)
    return {"src": tuple(sizes.get("src") or tgt), "tgt": tgt}


def easy_hard_lists(run_dir: Path, starts: Sequence[int] | None = None,
                    step: int = 0) -> tuple[int, Path, list[str], list[str]]:
    """``(round, stats.json, easy stems, hard stems)`` of the last round of ``run_dir`` whose
    ``stats.json`` holds easy and hard lists (tpld's phase 2) and that began at or before
    ``step`` (``starts``: each round's first step; None: any round); one line where there is
    none."""
    found = []
    for folder in sorted((run_dir / "rounds").glob("[0-9]*")):
        stats = folder / "stats.json"
        if not folder.name.isdigit() or not stats.is_file():
            continue
        try:
            data = json.loads(stats.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("easy") is not None and data.get("hard") is not None:
            found.append((int(folder.name), stats, list(data["easy"]), list(data["hard"])))
    if not found:
        raise ConfigError(f"{run_dir} has no phase-2 round (rounds/NN/stats.json with easy and hard lists); "
                          "--easy-hard needs a tpld run trained into phase 2")
    usable = found if starts is None else [f for f in found if f[0] < len(starts) and starts[f[0]] <= step]
    if not usable:
        raise ConfigError(f"the checkpoint at step {step} precedes {run_dir}'s first phase-2 round "
                          f"(round {found[0][0]}); pick a later checkpoint")
    return usable[-1]


def run_tsne(opts: TsneOptions, interactive: bool | None = None) -> TsneResult:
    from uda_cli.engine.setup import load_method, run_data_root

    weights = ckpt.resolve_checkpoint(opts.target)
    meta = ckpt.read_metadata(weights)
    run = RunSpec.from_json(meta["spec"])
    dense = run.task == "segmentation"
    if not dense:
        for flag, value in (("max_images", opts.max_images), ("workers", opts.workers),
                            ("easy_hard", opts.easy_hard or None)):
            if value is not None:
                raise ConfigError(f"--{flag.replace('_', '-')} applies to segmentation runs; {weights} is a "
                                  f"{run.task} checkpoint")
    if opts.easy_hard and meta["method"] != "tpld":
        raise ConfigError(f"--easy-hard colours target images by tpld's easy/hard split; {weights} is a "
                          f"{meta['method']} run")
    opts = opts.model_copy(update={"data_root": run_data_root(opts.data_root, meta)})
    run_dir = weights.parent.parent if weights.parent.name == "checkpoints" else None
    if opts.out is not None:
        out = opts.out
    elif run_dir is not None:
        out = run_dir / "tsne"
    else:
        raise ConfigError(f"{weights} is not in a run folder; pass --out DIR for the map")
    src_text = opts.src or parse_domain(meta.get("src") or meta["options"]["src"])[0]
    if opts.easy_hard:
        # The rounds' lists name the target's training images: read those by default.
        if run_dir is None:
            raise ConfigError(f"--easy-hard reads the run's rounds/; {weights} is not in a run folder")
        run_tgt = parse_domain(meta.get("tgt") or meta["options"]["tgt"])
        tgt_text = opts.tgt or meta.get("tgt") or meta["options"]["tgt"]
        (src, src_split), (tgt, tgt_split) = _resolve(src_text, run), _resolve(tgt_text, run, "train_split")
        run_split = split_slice(run_tgt[1] or tgt.train_split)[0]
        if tgt.name != run_tgt[0] or split_slice(tgt_split)[0] != run_split:
            raise ConfigError(f"--easy-hard colours the run's target training images ({run_tgt[0]}:{run_split}), "
                              f"not {tgt.name}:{tgt_split}; drop --tgt")
    else:
        tgt_text = opts.tgt or meta.get("tgt_eval") or parse_domain(meta["options"]["tgt"])[0]
        (src, src_split), (tgt, tgt_split) = _resolve(src_text, run), _resolve(tgt_text, run)
    names = (f"{src.name}:{src_split}", f"{tgt.name}:{tgt_split}")
    if names[0] == names[1]:
        raise ConfigError(f"--src and --tgt are both {names[0]}; pick two different domains or splits")
    if opts.easy_hard:
        easy_hard_lists(run_dir)  # no phase-2 round: one line before the model loads
    if dense:  # labels missing: one line before the model loads
        from uda_cli.data.registry import load_dense

        sources = [load_dense(s.name, sp, opts.data_root) for s, sp in ((src, src_split), (tgt, tgt_split))]
        for name, source in zip(names, sources):
            if not source.labelled:
                raise ConfigError(f"{name} has no labels to colour and balance the map by; pick a labelled split")
    ckpt.make_folder(out, "the map's folder", "pass --out a folder you can write to")  # before the minutes of work

    device = resolve_device(opts.device)
    method, _ = load_method(weights, device)
    extra: dict[str, list[Any]] = {}
    info: dict[str, Any] = {}
    settings = {"batch_size": opts.batch_size or DEFAULT_BATCH_SIZE}
    groups = None
    if dense:
        f_s, y_s, i_s, f_t, y_t, i_t, extra, info, settings, groups = _draw_dense(
            opts, meta, run, method, sources, (src, tgt), names, run_dir, device, interactive)
    else:
        # seed + 1 for the target: two domains of the same size do not get the same index pattern.
        f_s, y_s, i_s = draw_features(method, src, src_split, opts.samples, opts.seed, opts, device, interactive)
        f_t, y_t, i_t = draw_features(method, tgt, tgt_split, opts.samples, opts.seed + 1, opts, device, interactive)
    unit = "pixels" if dense else "samples"
    for name, f in zip(names, (f_s, f_t)):
        if len(f) < MIN_PER_DOMAIN:
            raise ConfigError(f"{name} gave {len(f)} {unit}; a map needs at least {MIN_PER_DOMAIN} per domain")

    features = np.concatenate([f_s, f_t])
    domain = np.concatenate([np.zeros(len(f_s), np.int64), np.ones(len(f_t), np.int64)])
    labels = np.concatenate([y_s, y_t])
    indices = np.concatenate([i_s, i_t])
    pad = proxy_a_distance(f_s, f_t, opts.seed)
    perplexity = effective_perplexity(opts.perplexity, len(features))
    with Progress("t-SNE", EARLY_ITERS + ITERS, interactive=interactive, unit="iterations") as p:
        xy, kl = embed(features, perplexity, opts.seed, p, n_jobs=max(1, torch.get_num_threads()))

    title = (f"{meta['method']} step {meta['step']}: {names[0]} vs {names[1]}"
             f"{' (pixels)' if dense else ''}, proxy A-distance {pad['proxy_a_distance']:.3f}")
    colours = (palette_colours(src.palette, len(run.classes)) or palette_colours(tgt.palette, len(run.classes))
               if dense else None)
    png, csv_path, json_path = out / "tsne.png", out / "tsne.csv", out / "tsne.json"
    ckpt.atomic_write_bytes(png, plot(xy, domain, labels, names, run.classes, title, colours=colours,
                                      groups=None if groups is None else np.asarray(groups)))
    ckpt.atomic_write_bytes(csv_path, csv_text(xy, domain, labels, indices, names, run.classes, extra).encode())
    report = {
        "uda_version": __version__,
        "checkpoint": str(weights),
        "method": meta["method"],
        "step": meta["step"],
        "src": names[0],
        "tgt": names[1],
        "num_samples": {"src": int(len(f_s)), "tgt": int(len(f_t))},
        "feature_dim": int(features.shape[1]),
        **pad,
        **info,
        "tsne": {"library": f"openTSNE {version('openTSNE')}", "negative_gradient_method": "fft",
                 "perplexity": perplexity, "perplexity_requested": opts.perplexity,
                 "early_exaggeration_iter": EARLY_ITERS, "n_iter": ITERS, "initialization": "pca",
                 "kl_divergence": kl},
        "settings": {"samples_per_domain": opts.samples, "seed": opts.seed, "class_balanced": True,
                     **settings, "device": str(device)},
    }
    ckpt.atomic_write_bytes(json_path, (json.dumps(report, indent=2) + "\n").encode())
    return TsneResult(out=out, png=png, csv=csv_path, json=json_path, report=report)


def _draw_dense(opts: TsneOptions, meta: dict[str, Any], run: RunSpec, method: Method, sources, specs, names,
                run_dir: Path | None, device: torch.device, interactive: bool | None):
    """Both domains' pixel draws (:func:`draw_pixels`), their CSV columns, JSON fields and
    settings, and the target points' easy/hard groups (``--easy-hard``; else None)."""
    from uda_cli.engine.setup import default_workers, eval_batch_size

    sizes = _run_sizes(meta, run)
    run_src = parse_domain(meta.get("src") or meta["options"]["src"])[0]
    max_images = opts.max_images or DEFAULT_MAX_IMAGES
    workers = default_workers() if opts.workers is None else opts.workers
    draws, orders, batches, group_of = [], [], [], None
    easy_hard: dict[str, Any] | None = None
    for d, (spec, source) in enumerate(zip(specs, sources)):
        rng = np.random.default_rng(opts.seed + d)  # seed + 1 for the target, as for images
        pool = list(range(len(source)))
        if d == 1 and opts.easy_hard:
            r, stats, easy, hard = easy_hard_lists(run_dir, method.round_starts(int(meta["config"]["steps"])),
                                                   int(meta["step"]))
            group_of = {s: "easy" for s in easy} | {s: "hard" for s in hard}
            pool = [i for i in pool if source.stem(i) in group_of]
            if not pool:
                raise ConfigError(f"none of round {r:02d}'s easy or hard images is in {names[1]}; they are "
                                  f"{parse_domain(meta.get('tgt') or meta['options']['tgt'])[0]} training images")
            easy_hard = {"round": r, "stats": str(stats), "easy_images": len(easy), "hard_images": len(hard)}
        order = [pool[i] for i in rng.permutation(len(pool))[:max_images]]
        size = sizes["src"] if spec.name == run_src else sizes["tgt"]  # as the run read it; else as evaluate
        batch = opts.batch_size or eval_batch_size(size)
        batches.append(batch)
        draws.append(draw_pixels(method, source, order, size, opts.samples, opts.seed + d, batch, workers, device,
                                 names[d], interactive))
        orders.append(len(pool))
    s, t = draws
    extra: dict[str, list[Any]] = {
        "image": s.stems + t.stems,
        "row": [int(v) for v in np.concatenate([s.rows, t.rows])],
        "col": [int(v) for v in np.concatenate([s.cols, t.cols])],
    }
    groups = None
    if group_of is not None:
        groups = [""] * len(s.stems) + [group_of[x] for x in t.stems]
        extra["difficulty"] = groups
        easy_hard["points"] = {g: sum(1 for x in groups if x == g) for g in ("easy", "hard")}
    classes = run.classes
    info: dict[str, Any] = {
        "unit": "pixels",
        "label_downsampling": "nearest (nearest-exact: the label pixel under each feature cell's centre); "
                              "ignore pixels skipped",
        "sizes": {"src": list(s.size), "tgt": list(t.size)},
        "feature_map": {"src": list(s.feature_map), "tgt": list(t.feature_map)},
        "images_read": {"src": s.images_read, "tgt": t.images_read},
        "images_available": {"src": orders[0], "tgt": orders[1]},
        "per_class": {role: {classes[k]: int(c) for k, c in enumerate(np.bincount(dr.labels, minlength=len(classes)))}
                      for role, dr in (("src", s), ("tgt", t))},
    }
    if easy_hard is not None:
        info["easy_hard"] = easy_hard
    settings = {"batch_size": batches, "max_images": max_images, "workers": workers}
    return s.features, s.labels, s.indices, t.features, t.labels, t.indices, extra, info, settings, groups
