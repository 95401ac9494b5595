"""Evaluation metrics computed from one confusion matrix (accumulated on the device)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """rows: true class, columns: predicted class. Labels outside [0, K) (ignore labels) drop out."""
    keep = (target >= 0) & (target < num_classes)
    idx = target[keep] * num_classes + pred[keep]
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def classification_report(cm: torch.Tensor, classes: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Top-1 accuracy, mean class accuracy and per-class accuracy from ``cm`` (rows true)."""
    cm = cm.to(torch.float64).cpu()
    support = cm.sum(1)
    correct = cm.diag()
    per_class = torch.where(support > 0, correct / support.clamp(min=1), torch.full_like(support, float("nan")))
    present = support > 0
    return {
        "metric": "accuracy",  # the headline key of this report
        "accuracy": float(correct.sum() / cm.sum().clamp(min=1)),
        "mean_class_accuracy": float(per_class[present].mean()) if present.any() else float("nan"),
        "num_samples": int(cm.sum()),
        "per_class_accuracy": {c: (None if not present[i] else float(per_class[i])) for i, c in enumerate(classes)},
        "classes": list(classes),
        "confusion_matrix": cm.to(torch.int64).tolist(),
    }


def _nanmean(values: torch.Tensor) -> float | None:
    """Mean over the finite entries; None when there are none (strict JSON has no NaN)."""
    keep = ~torch.isnan(values)
    return float(values[keep].mean()) if keep.any() else None


Subsets = Iterable[tuple[str, Iterable[int]]] | Mapping[str, Iterable[int]]


def segmentation_report(cm: torch.Tensor, classes: tuple[str, ...] | list[str],
                        subsets: Subsets = ()) -> dict[str, Any]:
    """Per-class IoU, mIoU, pixel accuracy and mean class accuracy from one confusion matrix
    accumulated over the whole evaluation set (rows: true class, columns: predicted class;
    ignored pixels already left out), as the segmentation UDA papers report them.

    IoU of class c is TP / (TP + FP + FN) = cm[c, c] / (row c + column c - cm[c, c]),
    cityscapesScripts' ``getIouScoreForLabel`` and ADVENT/CRST's ``per_class_iu``. Because
    ignored ground-truth pixels never enter ``cm``, a prediction on them is no false positive,
    as in cityscapesScripts (FP counts only non-ignored ground truth). A class with
    TP + FP + FN = 0 (absent from both labels and predictions) has no IoU: it is None here
    (NaN there) and left out of every mean, as cityscapesScripts' ``getScoreAverage`` (averages
    the non-NaN scores) and ADVENT's ``np.nanmean`` do. A class predicted somewhere but
    absent from the labels has IoU 0 and counts. ``miou`` is the mean over the classes with
    an IoU; ``miou_<name>`` the same over each subset of train ids in ``subsets`` (SYNTHIA's
    "16" and "13", from ``DomainSpec.class_subsets``); ``mean_class_accuracy`` averages
    TP / (TP + FN) over the classes present in the labels. Values are fractions in [0, 1]
    (the papers print percentages); an undefined mean is None.
    """
    cm64 = cm.to(torch.float64).cpu()
    k = len(classes)
    if tuple(cm64.shape) != (k, k):
        raise ValueError(f"confusion matrix of shape {tuple(cm64.shape)} for {k} classes")
    tp = cm64.diag()
    support = cm64.sum(1)  # TP + FN: pixels labelled c
    union = support + cm64.sum(0) - tp  # TP + FN + FP
    nan = torch.full_like(tp, float("nan"))
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(support > 0, tp / support.clamp(min=1), nan)
    total = float(cm64.sum())
    report: dict[str, Any] = {
        "metric": "miou",  # the headline key of this report
        "miou": _nanmean(iou),
    }
    for name, ids in (subsets.items() if isinstance(subsets, Mapping) else subsets):
        ids = list(ids)
        if any(not 0 <= i < k for i in ids):
            raise ValueError(f"class subset {name!r} names train ids outside 0..{k - 1}: {ids}")
        report[f"miou_{name}"] = _nanmean(iou[ids])
    report.update({
        "pixel_accuracy": float(tp.sum()) / total if total else None,
        "mean_class_accuracy": _nanmean(acc),
        "num_pixels": int(total),
        "per_class_iou": {c: (None if torch.isnan(iou[i]) else float(iou[i])) for i, c in enumerate(classes)},
        "per_class_accuracy": {c: (None if torch.isnan(acc[i]) else float(acc[i])) for i, c in enumerate(classes)},
        "classes": list(classes),
        "confusion_matrix": cm.to(torch.int64).cpu().tolist(),
    })
    return report


@torch.no_grad()
def evaluate_classifier(method, images: torch.Tensor, labels: torch.Tensor, batch_size: int, autocast,
                        dist=None) -> dict[str, Any]:
    """Top-1 accuracy, per-class accuracy and the confusion matrix of ``method.predict``.

    ``images`` are uint8 on the evaluation device; nothing leaves the device until the end.
    With ``dist`` (a :class:`~uda_cli.engine.distributed.Dist` of several ranks) each rank
    predicts its contiguous share of the images and the confusion matrices are summed over
    the ranks: every rank gets the report a single process computes over all the images
    (counts are integers, so the sum is exact).
    """
    from uda_cli.data.transforms import normalize

    if dist is not None and dist.world_size > 1:
        share = dist.shard(images.shape[0])
        images, labels = images[share], labels[share]
    was_training = method.nets.training
    method.eval()
    k = method.spec.num_classes
    cm = torch.zeros(k, k, dtype=torch.int64, device=images.device)
    try:
        for i in range(0, images.shape[0], batch_size):
            with autocast():
                logits = method.predict(normalize(images[i : i + batch_size]))
            cm += confusion_matrix(logits.argmax(1), labels[i : i + batch_size], k)
    finally:
        method.train(was_training)
    if dist is not None:
        dist.all_reduce_sum_(cm)
    return classification_report(cm, method.spec.classes)
