"""The math of class-balanced self-training (CBST / CRST) and of TPLD, over torch tensors.

Pure functions, no state, no files, no engine: each takes tensors on any device and returns
tensors on the same device. The rounds engine (``engine/rounds.py``) calls them during its
pseudo-label pass; the methods (``cbst.py``, ``crst.py``, ``tpld.py``) call the losses in their
``train_step``. ADVENT's entropy map and discriminator (TPLD's hard-image half) live elsewhere.

Sources (formulas and equation numbers; details in ``docs/methods/self-training.md``):

- CBST: Zou, Yu, Kumar, Wang, "Unsupervised Domain Adaptation for Semantic Segmentation via
  Class-Balanced Self-Training", ECCV 2018. CRST: Zou, Yu, Liu, Kumar, Wang, "Confidence
  Regularized Self-Training", ICCV 2019. Reference code: ``yzou2/CRST`` ``crst_seg.py``
  (``val``, ``kc_parameters``, ``label_selection``, ``reg_loss_calc``,
  ``reg_loss_calc_expand``), read for these notes, none of it copied.
- TPLD: Shin, Woo, Pan, Kweon, "Two-phase Pseudo Label Densification for Self-training based
  Domain Adaptation", ECCV 2020 (arXiv 2012.04828). TPLD has no public code and its full text
  could not be read here: its formulas come from two secondary write-ups
  (``/work/shared/notes/segmentation-papers.md`` section 1). Every detail they leave open is a
  parameter with a documented default and an "Assumption" line.
- Bootstrapping: Reed, Lee, Anguelov, Szegedy, Erhan, Rabinovich, "Training Deep Neural
  Networks on Noisy Labels with Bootstrapping", ICLR 2015 workshop (soft form, beta = 0.95).

Notation: ``p = softmax(logits)`` of shape ``[B, K, H, W]``; ``lam`` the class-wise thresholds
lambda_k, shape ``[K]``; ``p / lam`` the *normalised* prediction, whose threshold is 1 in every
class; labels are train ids with ``IGNORE = 255`` for unlabelled pixels.
"""

from __future__ import annotations

import math
from typing import Literal, Mapping

import torch
import torch.nn.functional as F

from uda_cli.data.labels import IGNORE

Tensor = torch.Tensor

__all__ = [
    "DEFAULT_BINS",
    "class_histograms",
    "thresholds",
    "portion",
    "select_labels",
    "select_labels_top2",
    "scatter_top2",
    "vote_densify",
    "vote_densify_top2",
    "image_confidence",
    "easy_hard_split",
    "bootstrapped_ce",
    "bootstrapped_soft_ce",
    "mrkld",
    "lrent_targets",
    "soft_ce",
    "full_pseudo_labels",
]

# 2**14 uniform bins on [0, 1]. A power of two makes bin assignment exact: p * 2**14 only
# shifts the float exponent, so floor() sees the exact product whatever the input dtype
# (float16 included: its spacing on [0.5, 1) is 2**-11, coarser than a bin), and every bin's
# lower edge k / 2**14 is exactly representable in float16/32, so a threshold compares with
# probabilities without rounding. A histogram is K x 16384 int64 = 2.5 MB for 19 classes.
DEFAULT_BINS = 2 ** 14


# ---- class-balanced thresholds (CBST / CRST kc_parameters) -----------------------------------

def class_histograms(prob_max: Tensor, pred: Tensor, num_classes: int, bins: int = DEFAULT_BINS) -> Tensor:
    """Per-class histograms of confidence: ``hist[k, b]`` counts the pixels predicted as
    class k (``pred == k``) whose max-probability ``prob_max`` falls in bin b of ``bins``
    uniform bins on [0, 1] (bin b = [b/bins, (b+1)/bins); 1.0 lands in the last bin).

    ``prob_max`` and ``pred`` have the same shape (any, e.g. ``[B, H, W]``): the max-probability
    and argmax of the pseudo-label pass's (flip-averaged) softmax. Pixels whose ``pred`` is
    outside [0, K) (e.g. 255 for padding) are left out. The result is int64 ``[K, bins]`` on
    ``pred``'s device: histograms of batches, images and ranks add up exactly (``+=`` or an
    all-reduce sum), so a pass keeps one batch of probabilities and one histogram.

    This replaces CRST's per-class Python lists of every pixel's confidence (``val``:
    ``conf_dict``, 10 GB of RAM for 505 images, then a full sort).
    Departure: CRST keeps only every 4th confidence per class and image (``DS_RATE = 4``) to
    bound that list; a histogram's memory does not grow with the pixels, so we count every
    pixel (the subsampling only added sampling noise to lambda_k).
    """
    if bins < 1:
        raise ValueError(f"bins must be positive, got {bins}")
    if prob_max.shape != pred.shape:
        raise ValueError(f"prob_max {tuple(prob_max.shape)} and pred {tuple(pred.shape)} differ in shape")
    pred = pred.reshape(-1).long()
    idx = (prob_max.reshape(-1).float() * bins).floor().long().clamp_(0, bins - 1)
    keep = (pred >= 0) & (pred < num_classes)
    flat = pred[keep] * bins + idx[keep]
    # bincount without weights is exact and deterministic on CUDA (integer atomics).
    return torch.bincount(flat, minlength=num_classes * bins).view(num_classes, bins)


def thresholds(hist: Tensor, portion: float) -> Tensor:
    """Class-balanced thresholds lambda_k from :func:`class_histograms` (CBST's class-balanced
    selection; the ``kc_policy='cb'``, ``kc_value='conf'`` branch of CRST's ``kc_parameters``).

    CRST sorts class k's n_k confidences in descending order and takes the m-th largest,
    m = floor(n_k * portion) (``conf_dict[k][m - 1]``, 1-based rank m); a class with m = 0
    (never predicted, or too few pixels) keeps lambda_k = 1.0. Here lambda_k is the *lower
    edge* of the bin that holds that m-th largest value, so with bin width w = 1/bins:
    lambda_hist <= lambda_exact < lambda_hist + w (within one bin), and the histogram never
    selects fewer pixels than the exact sort does (it may add the rest of that one bin).
    ``floor(n_k * portion)`` is computed in float64, as CRST's ``math.floor`` does.

    Returns float32 ``[K]`` on ``hist``'s device; values are exact multiples of 1/bins or 1.0.
    """
    if not 0.0 < portion <= 1.0:
        raise ValueError(f"portion must be in (0, 1], got {portion}")
    if hist.dim() != 2:
        raise ValueError(f"hist must be [K, bins], got shape {tuple(hist.shape)}")
    hist = hist.to(torch.int64)
    k, bins = hist.shape
    n = hist.sum(1)
    m = torch.floor(n.to(torch.float64) * portion).to(torch.int64)  # rank of lambda_k, 1-based
    at_or_above = hist.flip(1).cumsum(1).flip(1)  # [K, bins]: pixels in bin b or higher
    # The m-th largest lies in the highest bin b with at_or_above[b] >= m (non-increasing in b).
    b = (at_or_above >= m.clamp(min=1).unsqueeze(1)).sum(1) - 1
    lam = b.clamp(min=0).to(torch.float32) / bins
    return torch.where(m > 0, lam, torch.ones_like(lam))


def portion(round_index: int, start: float = 0.2, step: float = 0.05, maximum: float = 0.5) -> float:
    """The target portion of round ``round_index`` (0-based): CRST's self-paced schedule
    ``INIT_TGT_PORT = 0.2``, ``TGT_PORT_STEP = 0.05``, ``MAX_TGT_PORT = 0.5`` (``crst_seg.py``
    ``main``), i.e. min(start + step * round, maximum).

    Computed by the same repeated float addition CRST does (p = min(p + step, max) once per
    round), so the value, and floor(n * portion) in :func:`thresholds`, match it bit for bit.
    """
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    p = min(start, maximum)
    for _ in range(round_index):
        p = min(p + step, maximum)
    return p


# ---- label selection (CBST / TPLD Eq. 2) -----------------------------------------------------

def select_labels(prob: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """CBST pseudo-labels: label = argmax_k p_k / lambda_k where max_k p_k / lambda_k >= 1,
    else 255 (CRST ``label_selection``; TPLD Eq. 2 writes the same rule).

    ``prob`` is ``[B, K, H, W]`` probabilities, ``lam`` ``[K]``. Returns ``(labels, wmax)``:
    long ``[B, H, W]`` labels with ``IGNORE`` and the weighted max ``max_k p_k / lambda_k``
    (float ``[B, H, W]``, what TPLD voting and image scores compare with 1).
    Ties in the argmax go to the lowest class id (torch and numpy agree).
    """
    weighted = prob / lam.to(prob).view(1, -1, 1, 1)
    wmax, arg = weighted.max(1)
    labels = torch.where(wmax >= 1.0, arg, torch.full_like(arg, IGNORE))
    return labels, wmax


def select_labels_top2(top2_idx: Tensor, top2_prob: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`select_labels` from the two most probable classes of each pixel only
    (``top2_idx`` long ``[B, 2, H, W]``, ``top2_prob`` ``[B, 2, H, W]``, what the rounds engine
    keeps per pixel instead of all K probabilities).

    Assumption: the argmax of p_k / lambda_k is among the two most probable classes. It can
    fail only where a third class has p_3 >= lambda_3 (p_3 <= 1/3, so only for classes whose
    threshold is that low) and a larger ratio than both; such a pixel then gets the better of
    its top two, or 255.
    """
    lam = lam.to(top2_prob)
    weighted = top2_prob / lam[top2_idx]
    wmax, j = weighted.max(1)
    arg = top2_idx.gather(1, j.unsqueeze(1)).squeeze(1)
    labels = torch.where(wmax >= 1.0, arg, torch.full_like(arg, IGNORE))
    return labels, wmax


def scatter_top2(top2_idx: Tensor, top2_prob: Tensor, num_classes: int) -> Tensor:
    """A ``[B, K, H, W]`` probability map that holds the two stored classes and 0 elsewhere,
    for functions that take full maps (:func:`full_pseudo_labels`) when only the top two are
    kept. Not a distribution: the remaining mass 1 - p_1 - p_2 is unknown and left out."""
    b, _, h, w = top2_idx.shape
    out = top2_prob.new_zeros(b, num_classes, h, w)
    return out.scatter_(1, top2_idx.long(), top2_prob)


# ---- TPLD phase 1: sliding-window voting (TPLD Eq. 4) ----------------------------------------

Pooling = Literal["sum", "mean", "confident"]
AlphaOn = Literal["own", "pooled"]


def vote_densify(prob: Tensor, lam: Tensor, labels: Tensor, window: int = 9, alpha: float = 0.7,
                 iterations: int = 3, pooling: Pooling = "sum", alpha_on: AlphaOn = "own") -> Tensor:
    """TPLD's sliding-window voting (phase 1) with all K probabilities at hand: the top two
    classes are taken from ``prob`` ([B, K, H, W]) and each labelled pixel's confident value is
    its exact p_label / lambda_label. See :func:`vote_densify_top2` for the rule, its
    parameters and assumptions; both give the same labels whenever every labelled pixel's
    label is among its two most probable classes."""
    top2_prob, top2_idx = prob.topk(2, dim=1)
    lam = lam.to(prob)
    labelled = labels != IGNORE
    safe = torch.where(labelled, labels, torch.zeros_like(labels)).long()
    value = (prob.gather(1, safe.unsqueeze(1)).squeeze(1) / lam[safe]).masked_fill(~labelled, 0.0)
    return _vote(top2_idx, top2_prob, lam, labels, value, prob.shape[1], window, alpha, iterations,
                 pooling, alpha_on)


def vote_densify_top2(top2_idx: Tensor, top2_prob: Tensor, lam: Tensor, labels: Tensor, num_classes: int,
                      window: int = 9, alpha: float = 0.7, iterations: int = 3,
                      pooling: Pooling = "sum", alpha_on: AlphaOn = "own") -> Tensor:
    """TPLD phase-1 densification by sliding-window voting (TPLD Eq. 4, as the two secondary
    write-ups describe it; equation number from them), from the two most probable classes per pixel.

    Inputs: ``top2_idx`` long ``[B, 2, H, W]`` and ``top2_prob`` ``[B, 2, H, W]`` (most probable
    first), ``lam`` ``[K]``, ``labels`` long ``[B, H, W]`` (CBST labels, 255 unlabelled). Returns
    the densified labels (a new tensor; labelled pixels never change).

    Each iteration, with n_j = p_j / lambda_{c_j} the normalised prediction of an unlabelled
    pixel x's j-th class c_j (j = 1, 2):

        V_k(y)   = confident value of class k at y: y's value if y is labelled k, else 0
        P_j(x)   = pool of V_{c_j} over the window x window square centred on x
        s_j(x)   = alpha * n_j(x) + (1 - alpha) * P_j(x)       (alpha_on = "own", default)
                 = alpha * P_j(x) + (1 - alpha) * n_j(x)       (alpha_on = "pooled")
        label(x) = c_j* with j* = argmax_j s_j(x), if s_j*(x) >= 1 (ties: the more probable)

    Vectorised: one ``avg_pool2d`` per class over ``[B, 1, H, W]`` maps (memory stays a few
    H x W maps, never K of them); the update is synchronous (every pixel of an iteration is
    decided from the labels before it, so the order of pixels does not matter); iterations
    stop early once nothing changes.

    Facts (notes section 1.1, secondary): only unlabelled pixels vote; their top-2 competing
    classes; the neighbours' confident values pooled in a sliding window; a weighted sum with
    the pixel's own normalised prediction, alpha = 0.7; labelled where it passes 1 (p > lambda
    in normalised units); three iterations.

    Assumption (UNVERIFIED, which side alpha weights): ``alpha_on="own"``, alpha on the
    pixel's own p/lambda. With mean pooling hardly any pixel could pass then (n_j < 1, and a
    mean of values near 1 adds at most 0.3 / lambda), so "own" goes with "sum".
    Assumption (UNVERIFIED, sum or mean): ``pooling="sum"``, the sum of the window's confident
    values (each >= 1), so a pixel passes with a handful of confident neighbours in one of its
    top-2 classes; "mean" divides that sum by the pixel's neighbours (the window's pixels
    inside the image, less the centre), a majority-like vote that suits ``alpha_on="pooled"``;
    "confident" divides it by the number of neighbours labelled in that class (the mean of the
    confident values alone, 0 where none): the pool is then about 1 and a pixel passes only
    where its own p/lambda is near 1 already.
    Assumption (UNVERIFIED, window size): ``window=9`` (odd; 9 x 9 pixels at the resolution
    of the labels); the paper's value was not found.
    Assumption: the top two classes are by probability p (what the engine stores), not by
    p / lambda.
    Assumption: a pixel labelled by voting becomes a confident neighbour whose value is its
    winning score s_j* (>= 1, so in the same units as the CBST-labelled pixels' p/lambda).
    Assumption (top-2 storage): a labelled neighbour's value is p/lambda of its label when
    the label is one of its stored two classes, else 1.0, the least a CBST-labelled pixel
    has (labelled means p/lambda >= 1); it is never 0 for a labelled pixel.
    """
    lam = lam.to(top2_prob)
    labelled = labels != IGNORE
    n = top2_prob / lam[top2_idx]  # [B, 2, H, W]
    value = torch.where(labels.unsqueeze(1) == top2_idx, n, torch.zeros_like(n)).amax(1)
    value = torch.where(labelled & (value == 0), torch.ones_like(value), value)
    value = value.masked_fill(~labelled, 0.0)
    return _vote(top2_idx, top2_prob, lam, labels, value, num_classes, window, alpha, iterations,
                 pooling, alpha_on)


def _vote(top2_idx: Tensor, top2_prob: Tensor, lam: Tensor, labels: Tensor, value: Tensor, num_classes: int,
          window: int, alpha: float, iterations: int, pooling: str, alpha_on: str) -> Tensor:
    """The voting loop shared by the two entry points; ``value`` is each labelled pixel's
    confident value (0 where unlabelled)."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number, got {window}")
    if pooling not in ("sum", "mean", "confident"):
        raise ValueError(f"pooling must be 'sum', 'mean' or 'confident', got {pooling!r}")
    if alpha_on not in ("own", "pooled"):
        raise ValueError(f"alpha_on must be 'own' or 'pooled', got {alpha_on!r}")
    labels = labels.clone().long()
    value = value.clone().to(top2_prob.dtype)
    top2_idx = top2_idx.long()
    n = top2_prob / lam[top2_idx]  # [B, 2, H, W] own normalised prediction of the top two
    # Window sums (divisor_override=1: no division, so an exact sum of the few values).
    pool_kw = dict(kernel_size=window, stride=1, padding=window // 2, divisor_override=1)
    if pooling == "mean":
        # Neighbours of each pixel inside the image: the window's pixels less the centre.
        ones = torch.ones_like(value[:1]).unsqueeze(1)
        neighbours = (F.avg_pool2d(ones, **pool_kw) - 1.0).clamp(min=1.0)
    for _ in range(iterations):
        todo = labels == IGNORE
        if not bool(todo.any()):
            break
        pooled = torch.zeros_like(n)
        for k in range(num_classes):
            has_k = top2_idx == k  # [B, 2, H, W]: pixels whose j-th class is k
            if not bool(has_k.any()):
                continue
            v_k = torch.where(labels == k, value, torch.zeros_like(value)).unsqueeze(1)
            p_k = F.avg_pool2d(v_k, **pool_kw)  # [B, 1, H, W]
            if pooling == "mean":
                p_k = p_k / neighbours
            elif pooling == "confident":
                n_k = F.avg_pool2d((labels == k).unsqueeze(1).to(value.dtype), **pool_kw)
                p_k = p_k / n_k.clamp(min=1.0)
            pooled = torch.where(has_k, p_k, pooled)
        if alpha_on == "own":
            score = alpha * n + (1.0 - alpha) * pooled
        else:
            score = alpha * pooled + (1.0 - alpha) * n
        best, j = score.max(1)  # ties -> j = 0, the more probable class
        new = todo & (best >= 1.0)
        if not bool(new.any()):
            break
        cls = top2_idx.gather(1, j.unsqueeze(1)).squeeze(1)
        labels = torch.where(new, cls, labels)
        value = torch.where(new, best, value)
    return labels


# ---- TPLD phase 2: image confidence and the easy/hard split ----------------------------------

def image_confidence(prob_max: Tensor, pred: Tensor, lam: Tensor, num_classes: int) -> Tensor:
    """TPLD's image score (phase 2): conf = (1/K') sum_k (N_k* / N_k) (1 / lambda_k) over the
    K' classes predicted in the image, N_k = pixels predicted k, N_k* = those of them with
    prob_max >= lambda_k. The 1/lambda_k factor favours images whose confident pixels belong
    to hard (low-threshold) classes.

    ``prob_max`` and ``pred`` are ``[H, W]`` (one image; returns a 0-d tensor, ``float()`` it)
    or ``[B, H, W]`` (returns ``[B]``). Float64 result. Pixels with ``pred`` outside [0, K)
    are left out; an image with no pixel left scores 0.
    Assumption: "above lambda_k" is read as >=, the CBST rule's p / lambda >= 1.
    Assumption: the score uses the model's argmax and max-probability (what the engine
    stores), not the pseudo-labels after voting.
    """
    single = pred.dim() == 2
    if single:
        prob_max, pred = prob_max.unsqueeze(0), pred.unsqueeze(0)
    b = pred.shape[0]
    pred = pred.reshape(b, -1).long()
    pm = prob_max.reshape(b, -1)
    lam = lam.to(device=pm.device, dtype=torch.float64)
    keep = (pred >= 0) & (pred < num_classes)
    safe = torch.where(keep, pred, torch.zeros_like(pred))
    conf = keep & (pm.to(torch.float64) >= lam[safe])
    offs = torch.arange(b, device=pred.device).unsqueeze(1) * num_classes
    n_k = torch.bincount((safe + offs)[keep], minlength=b * num_classes).view(b, num_classes)
    n_star = torch.bincount((safe + offs)[conf], minlength=b * num_classes).view(b, num_classes)
    present = n_k > 0
    ratio = torch.where(present, n_star.to(torch.float64) / n_k.clamp(min=1), torch.zeros((), dtype=torch.float64,
                                                                                            device=pm.device))
    total = (ratio / lam).sum(1)
    k_prime = present.sum(1)
    out = torch.where(k_prime > 0, total / k_prime.clamp(min=1), torch.zeros_like(total))
    return out[0] if single else out


def easy_hard_split(scores: Mapping[str, float], q: float = 0.3) -> tuple[list[str], list[str]]:
    """Split target images by :func:`image_confidence`: the top ``q`` fraction (TPLD: q = 0.3,
    the best value of its parameter study) are "easy" (trained with full pseudo-labels), the
    rest "hard" (intra-domain adversarial). ``scores`` maps image stem -> score.

    Returns ``(easy, hard)``, each in rank order (highest score first). Ties are broken by
    stem, ascending, so the split does not depend on dict order. The easy count is
    floor(N * q), as IntraDA's ``int(len * lambda1)`` cut of its ranked list.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    bad = [s for s, v in scores.items() if math.isnan(v)]
    if bad:
        raise ValueError(f"scores are NaN for {len(bad)} images, e.g. {bad[0]!r}")
    ranked = sorted(scores, key=lambda s: (-scores[s], s))
    n_easy = int(math.floor(len(ranked) * q))
    return ranked[:n_easy], ranked[n_easy:]


# ---- losses ------------------------------------------------------------------------------------

BootQ = Literal["p", "p_over_lambda", "p_over_lambda_renorm"]


def _valid_labels(labels: Tensor, num_classes: int) -> Tensor:
    return (labels >= 0) & (labels < num_classes)


def _bootstrap_q(logits: Tensor, lam: Tensor, q: str, detach: bool) -> Tensor:
    prob = logits.softmax(1)
    if detach:
        prob = prob.detach()
    if q == "p":
        return prob
    if q not in ("p_over_lambda", "p_over_lambda_renorm"):
        raise ValueError(f"q must be 'p', 'p_over_lambda' or 'p_over_lambda_renorm', got {q!r}")
    w = prob / lam.to(prob).view(1, -1, 1, 1)
    if q == "p_over_lambda_renorm":
        w = w / w.sum(1, keepdim=True)
    return w


def _log_target(logits: Tensor, lam: Tensor, log_lambda: bool) -> Tensor:
    logp = F.log_softmax(logits, 1)
    if log_lambda:
        logp = logp - lam.to(logp).log().view(1, -1, 1, 1)
    return logp


def _masked_mean(per_pixel: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``per_pixel`` over ``mask``; 0 (still attached to the graph) when it is empty."""
    mask = mask.to(per_pixel.dtype)
    return (per_pixel * mask).sum() / mask.sum().clamp(min=1.0)


def bootstrapped_ce(logits: Tensor, labels: Tensor, lam: Tensor, beta: float = 0.95,
                    q: BootQ = "p_over_lambda_renorm", detach: bool = True, log_lambda: bool = False) -> Tensor:
    """TPLD's bootstrapped self-training loss on hard pseudo-labels (TPLD, used in both phases;
    after Reed et al.'s soft bootstrapping), averaged over the labelled pixels (labels in [0, K)):

        L = mean_x  - sum_k [ beta * y_k(x) + (1 - beta) * q_k(x) ] * log(p_k(x) / lambda_k)

    with y the one-hot pseudo-label and q the model's own prediction. ``logits`` [B, K, H, W],
    ``labels`` long [B, H, W] (255 ignored), ``lam`` [K]. Normalised by the labelled-pixel
    count, as CRST's ``ce / valid_num``. beta = 1 is plain CE on the labelled pixels.

    Assumption (UNVERIFIED, beta): 0.95, Reed et al.'s soft-bootstrapping value; TPLD's own
    value was not found.
    Assumption (UNVERIFIED, q): TPLD writes p/lambda, not a distribution; the default
    ``q="p_over_lambda_renorm"`` keeps its class-balanced reweighting and renormalises it to
    sum 1, so the target keeps unit mass as in Reed et al.; ``"p"`` is Reed's q = p,
    ``"p_over_lambda"`` the formula as written.
    Assumption: q is detached (``detach=True``), a fixed target as in common soft-bootstrapping
    code; Reed et al. let the gradient through.
    Departure (``log_lambda=False``): log p rather than log(p / lambda). The difference is the
    constant sum_k w_k log lambda_k, so with a detached q the gradient is identical; CRST's
    own loss (``reg_loss_calc``) also uses log p only. ``log_lambda=True`` gives the written
    value (which is negative where p > lambda).
    """
    k = logits.shape[1]
    valid = _valid_labels(labels, k)
    logt = _log_target(logits, lam, log_lambda)
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    hard = -logt.gather(1, safe.unsqueeze(1)).squeeze(1)
    if beta == 1.0:
        per_pixel = hard
    else:
        qk = _bootstrap_q(logits, lam, q, detach)
        soft = -(qk * logt).sum(1)
        per_pixel = beta * hard + (1.0 - beta) * soft
    return _masked_mean(per_pixel, valid)


def bootstrapped_soft_ce(logits: Tensor, targets: Tensor, lam: Tensor, beta: float = 0.95,
                         q: BootQ = "p_over_lambda_renorm", detach: bool = True, log_lambda: bool = False,
                         mask: Tensor | None = None) -> Tensor:
    """:func:`bootstrapped_ce` with soft targets ``targets`` [B, K, H, W] in place of the
    one-hot y (TPLD's easy images, whose :func:`full_pseudo_labels` are soft away from the
    confident pixels). Averaged over ``mask`` (bool [B, H, W]); by default the pixels whose
    targets have a nonzero sum, CRST's rule for soft labels (``reg_loss_calc_expand``). Same
    parameters and assumptions as :func:`bootstrapped_ce`."""
    if mask is None:
        mask = targets.sum(1) > 0
    logt = _log_target(logits, lam, log_lambda)
    target = targets.to(logt.dtype)
    if beta != 1.0:
        target = beta * target + (1.0 - beta) * _bootstrap_q(logits, lam, q, detach)
    return _masked_mean(-(target * logt).sum(1), mask)


def mrkld(logits: Tensor, mask: Tensor) -> Tensor:
    """CRST's model regulariser MRKLD (CRST's KL-to-uniform model regulariser; ``reg_loss_calc``'s ``kld``):
    -(1/K) sum_k log p_k, averaged over the pixels in ``mask`` (bool [B, H, W]: the labelled
    target pixels; CRST divides by their count ``valid_reg_num``).

    It equals KL(uniform || p) + log K, so it pulls the prediction towards uniform, against
    overconfident pseudo-labels. The weight is the caller's: CRST's ``mrkld.sh`` uses
    ``--mr-weight-kld 0.1`` on target pixels and ``MRSRC = 0`` on source pixels.
    """
    per_pixel = -F.log_softmax(logits, 1).mean(1)
    return _masked_mean(per_pixel, mask)


def lrent_targets(prob: Tensor, lam: Tensor, alpha: float = 0.25) -> tuple[Tensor, Tensor]:
    """CRST's label regulariser LRENT (CRST's negative-entropy label regulariser;
    ``label_selection``'s ``lr_weight_ent > 0`` branch): soft pseudo-labels and which pixels keep them.

        q      = normalise_k( (p_k / lambda_k) ** (1 / alpha) )
        reg(x) = sum_k ( -q_k log p_k + alpha q_k log q_k )
        sel(x) = sum_k ( -q_k log lambda_k )
        keep(x) = reg(x) < sel(x)

    ``prob`` [B, K, H, W], ``lam`` [K] (or [B, K, H, W]: the lambdas of a top-k map's classes),
    ``alpha`` = ``--lr-weight-ent 0.25`` of ``lrent.sh``.
    Returns ``(q, keep)``: float [B, K, H, W] soft labels (a distribution at every pixel) and
    bool [B, H, W]. The caller zeroes q where not kept (CRST's data loader turns ignored
    pixels into all-zero soft labels) and trains with :func:`soft_ce`. The hard label
    argmax q equals argmax p / lambda (the power is monotone).

    q is computed as a softmax of (log p - log lambda) / alpha, the same value without
    overflow for small alpha; the logs in reg/sel add CRST's 1e-32 inside.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    lam = lam.to(prob)
    lam = lam.view(1, -1, 1, 1) if lam.dim() == 1 else lam  # or per pixel, as prob (a top-k map's lambdas)
    soft = ((prob.log() - lam.log()) / alpha).softmax(1)
    eps = 1e-32
    reg = (-soft * (prob + eps).log() + alpha * soft * (soft + eps).log()).sum(1)
    sel = (-soft * (lam + eps).log()).sum(1)
    return soft, reg < sel


def soft_ce(logits: Tensor, soft_targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cross-entropy against soft targets, -sum_k t_k log p_k, averaged over ``mask`` (bool
    [B, H, W]; by default the pixels whose targets sum to more than 0, CRST's
    ``reg_loss_calc_expand`` rule ``valid_num = sum(label_sum != 0)``)."""
    if mask is None:
        mask = soft_targets.sum(1) > 0
    per_pixel = -(soft_targets.to(logits.dtype) * F.log_softmax(logits, 1)).sum(1)
    return _masked_mean(per_pixel, mask)


def full_pseudo_labels(prob: Tensor, lam: Tensor, labels: Tensor, gamma: float = 2.0,
                       renormalize: bool = True) -> Tensor:
    """TPLD's "full" pseudo-labels for easy images (phase 2): every pixel gets a target.
    Labelled pixels (labels in [0, K), after voting) are one-hot; every other pixel gets
    (p_k / lambda_k) ** gamma, gamma = 2 (TPLD: it suppresses low values).

    ``prob`` [B, K, H, W], ``lam`` [K], ``labels`` long [B, H, W]; returns float [B, K, H, W]
    for :func:`bootstrapped_soft_ce` (TPLD's L_st2, without the source term).
    Assumption (UNVERIFIED): ``renormalize=True`` divides (p/lambda)^gamma by its sum over k,
    so the soft pixels are distributions like the one-hot ones: the same form as CRST-LRENT's
    normalise((p/lambda)^(1/alpha)) on which TPLD builds, with gamma as the sharpening power.
    ``renormalize=False`` keeps the raw values (each < 1 on an unlabelled pixel, so such
    pixels also weigh less in the loss).
    With only the top two classes stored, pass ``scatter_top2(...)`` as ``prob``: the soft part
    then spreads over those two classes only.
    """
    k = prob.shape[1]
    soft = (prob / lam.to(prob).view(1, -1, 1, 1)).pow(gamma)
    if renormalize:
        soft = soft / soft.sum(1, keepdim=True).clamp(min=torch.finfo(soft.dtype).tiny)
    valid = _valid_labels(labels, k)
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    onehot = F.one_hot(safe, k).permute(0, 3, 1, 2).to(soft.dtype)
    return torch.where(valid.unsqueeze(1), onehot, soft)
