"""Evaluation metrics computed from one confusion matrix (accumulated on the device)."""

from __future__ import annotations

from typing import Any

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """rows: true class, columns: predicted class. Labels outside [0, K) (ignore labels) drop out."""
    keep = (target >= 0) & (target < num_classes)
    idx = target[keep] * num_classes + pred[keep]
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def classification_report(cm: torch.Tensor, classes: tuple[str, ...] | list[str]) -> dict[str, Any]:
    cm = cm.to(torch.float64).cpu()
    support = cm.sum(1)
    correct = cm.diag()
    per_class = torch.where(support > 0, correct / support.clamp(min=1), torch.full_like(support, float("nan")))
    present = support > 0
    return {
        "accuracy": float(correct.sum() / cm.sum().clamp(min=1)),
        "mean_class_accuracy": float(per_class[present].mean()) if present.any() else float("nan"),
        "num_samples": int(cm.sum()),
        "per_class_accuracy": {c: (None if not present[i] else float(per_class[i])) for i, c in enumerate(classes)},
        "classes": list(classes),
        "confusion_matrix": cm.to(torch.int64).tolist(),
    }


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
