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

Segmentation (a later issue) plugs in at :func:`draw_features`: per-pixel features sampled
class-balanced from the label maps at the feature map's resolution; the embedding, the
distance and the outputs stay as they are.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uda_cli import __version__
from uda_cli.config import TsneOptions
from uda_cli.data.registry import DomainSpec, get_domain, load_domain, parse_domain, resolve_split
from uda_cli.data.transforms import normalize
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine.runtime import autocast_for, resolve_device
from uda_cli.errors import ConfigError, NotBuiltError
from uda_cli.methods.base import Method, RunSpec
from uda_cli.viz import Progress

EARLY_ITERS, ITERS = 250, 500  # openTSNE's defaults: early exaggeration, then the main phase
CALLBACK_EVERY = 25
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)  # weaker than 1e-3 barely changes eps and makes L-BFGS crawl on separable data
MIN_PER_DOMAIN = 4  # the domain classifier needs points on both sides of each split


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
    """``(features [M, D], labels [M], indices into the split [M])`` for up to ``n`` samples."""
    if spec.task != "classification":
        raise NotBuiltError(f"tsne of {spec.task} domains (per-pixel features) comes in a later release")
    run = method.spec
    images, labels = load_domain(spec.name, split, opts.data_root, channels=run.channels, size=run.image_size)
    idx = balanced_indices(labels.numpy(), n, seed)
    with Progress(f"features {spec.name}:{split}", len(idx), interactive=interactive, unit="images") as p:
        feats = extract_features(method, images[torch.from_numpy(idx)], opts.batch_size, device, p)
    return feats, labels.numpy()[idx], idx


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


def plot(xy: np.ndarray, domain: np.ndarray, labels: np.ndarray, domain_names: tuple[str, str],
         classes: tuple[str, ...], title: str) -> bytes:
    """Two panels (by domain; by class, marker by domain) with legends, as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(13, 6), dpi=110)
    FigureCanvasAgg(fig)
    ax_d, ax_c = fig.subplots(1, 2)
    size = 10 if len(xy) <= 2000 else 4
    markers = ("o", "^")
    for d, (name, colour) in enumerate(zip(domain_names, ("tab:blue", "tab:orange"))):
        m = domain == d
        ax_d.scatter(xy[m, 0], xy[m, 1], s=size, c=[colour], marker=markers[d], alpha=0.6, linewidths=0, label=name)
    ax_d.set_title("by domain")
    ax_d.legend(loc="best", markerscale=2, fontsize=8)
    colours = _class_colours(len(classes))
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
    for ax in (ax_d, ax_c):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def csv_text(xy: np.ndarray, domain: np.ndarray, labels: np.ndarray, indices: np.ndarray,
             domain_names: tuple[str, str], classes: tuple[str, ...]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["x", "y", "domain", "label", "index"])
    for (x, y), d, k, i in zip(xy, domain, labels, indices):
        w.writerow([f"{x:.6g}", f"{y:.6g}", domain_names[d], classes[k], int(i)])
    return buf.getvalue()


# ---- the command's library function ----------------------------------------------------------

def _resolve(text: str, run: RunSpec) -> tuple[DomainSpec, str]:
    name, split = parse_domain(text)
    spec = get_domain(name)
    split = resolve_split(spec, split, spec.eval_split)
    if spec.task != run.task or spec.classes != run.classes:
        raise ConfigError(f"{spec.name}:{split} is not a {run.task} domain of the checkpoint's classes "
                          f"({', '.join(run.classes)}); pick one that is")
    return spec, split


def run_tsne(opts: TsneOptions, interactive: bool | None = None) -> TsneResult:
    from uda_cli.engine.setup import load_method, run_data_root

    weights = ckpt.resolve_checkpoint(opts.target)
    meta = ckpt.read_metadata(weights)
    run = RunSpec.from_json(meta["spec"])
    opts = opts.model_copy(update={"data_root": run_data_root(opts.data_root, meta)})
    if opts.out is not None:
        out = opts.out
    elif weights.parent.name == "checkpoints":
        out = weights.parent.parent / "tsne"
    else:
        raise ConfigError(f"{weights} is not in a run folder; pass --out DIR for the map")
    ckpt.make_folder(out, "the map's folder", "pass --out a folder you can write to")  # before the minutes of work
    src_text = opts.src or parse_domain(meta.get("src") or meta["options"]["src"])[0]
    tgt_text = opts.tgt or meta.get("tgt_eval") or parse_domain(meta["options"]["tgt"])[0]
    (src, src_split), (tgt, tgt_split) = _resolve(src_text, run), _resolve(tgt_text, run)
    names = (f"{src.name}:{src_split}", f"{tgt.name}:{tgt_split}")
    if names[0] == names[1]:
        raise ConfigError(f"--src and --tgt are both {names[0]}; pick two different domains or splits")

    device = resolve_device(opts.device)
    method, _ = load_method(weights, device)
    # seed + 1 for the target: two domains of the same size do not get the same index pattern.
    f_s, y_s, i_s = draw_features(method, src, src_split, opts.samples, opts.seed, opts, device, interactive)
    f_t, y_t, i_t = draw_features(method, tgt, tgt_split, opts.samples, opts.seed + 1, opts, device, interactive)
    for name, f in zip(names, (f_s, f_t)):
        if len(f) < MIN_PER_DOMAIN:
            raise ConfigError(f"{name} gave {len(f)} samples; a map needs at least {MIN_PER_DOMAIN} per domain")

    features = np.concatenate([f_s, f_t])
    domain = np.concatenate([np.zeros(len(f_s), np.int64), np.ones(len(f_t), np.int64)])
    labels = np.concatenate([y_s, y_t])
    indices = np.concatenate([i_s, i_t])
    pad = proxy_a_distance(f_s, f_t, opts.seed)
    perplexity = effective_perplexity(opts.perplexity, len(features))
    with Progress("t-SNE", EARLY_ITERS + ITERS, interactive=interactive, unit="iterations") as p:
        xy, kl = embed(features, perplexity, opts.seed, p, n_jobs=max(1, torch.get_num_threads()))

    title = (f"{meta['method']} step {meta['step']}: {names[0]} vs {names[1]}, "
             f"proxy A-distance {pad['proxy_a_distance']:.3f}")
    png, csv_path, json_path = out / "tsne.png", out / "tsne.csv", out / "tsne.json"
    ckpt.atomic_write_bytes(png, plot(xy, domain, labels, names, run.classes, title))
    ckpt.atomic_write_bytes(csv_path, csv_text(xy, domain, labels, indices, names, run.classes).encode())
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
        "tsne": {"library": f"openTSNE {version('openTSNE')}", "negative_gradient_method": "fft",
                 "perplexity": perplexity, "perplexity_requested": opts.perplexity,
                 "early_exaggeration_iter": EARLY_ITERS, "n_iter": ITERS, "initialization": "pca",
                 "kl_divergence": kl},
        "settings": {"samples_per_domain": opts.samples, "seed": opts.seed, "class_balanced": True,
                     "batch_size": opts.batch_size, "device": str(device)},
    }
    ckpt.atomic_write_bytes(json_path, (json.dumps(report, indent=2) + "\n").encode())
    return TsneResult(out=out, png=png, csv=csv_path, json=json_path, report=report)
