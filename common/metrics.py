"""Per-label Dice and HD95 over MONAI's metrics, accumulated case by case."""

from __future__ import annotations

import math
import warnings

import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot


class SegmentationScores:
    """Accumulates Dice and HD95 (physical units) per foreground label over cases.

    Args:
        num_classes: classes including background (label 0 is never scored).
        min_group_cases: a fairness group's Dice is reported only when it has at least this many
            cases, so no single patient's score can be read off an aggregate.
    """

    def __init__(self, num_classes: int, min_group_cases: int = 5) -> None:
        self.num_classes = num_classes
        self.min_group_cases = min_group_cases
        self.groups: dict[str, list[float]] = {}
        self.dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
        # per case: MONAI's mean reductions turn an all-NaN label (never predicted) into 0.0
        self.hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
        self.cases = 0

    def add(self, pred: torch.Tensor, label: torch.Tensor, spacing: tuple[float, ...],
            group: str = "") -> None:
        """Score one case.

        Args:
            pred: predicted class map, shape (1, 1, *spatial), int.
            label: ground-truth class map, same shape.
            spacing: voxel size per spatial axis (mm or px).
            group: the case's fairness group ("" for none).
        """
        y_pred, y = one_hot(pred, self.num_classes), one_hot(label, self.num_classes)
        case_dice = self.dice(y_pred=y_pred, y=y)
        if group:
            self.groups.setdefault(group, []).append(finite_mean(case_dice.flatten().tolist()))
        with warnings.catch_warnings():  # empty structures give NaN distances, skipped below
            warnings.simplefilter("ignore")
            self.hd95(y_pred=y_pred, y=y, spacing=list(spacing))
        self.cases += 1

    def result(self) -> dict[str, float]:
        """``dice-<label>``/``hd95-<label>`` per foreground label and their means (NaN if unscored)."""
        out: dict[str, float] = {}
        if self.cases == 0:
            return out
        dice = self.dice.aggregate().flatten().tolist()
        per_case = self.hd95.aggregate()  # (cases, labels); NaN where prediction or truth is empty
        hd95 = [finite_mean(per_case[:, c].tolist()) for c in range(per_case.shape[1])]
        for label, (d, h) in enumerate(zip(dice, hd95), start=1):
            out[f"dice-{label}"] = float(d)
            out[f"hd95-{label}"] = float(h)
        out["dice"] = finite_mean(dice)
        out["hd95"] = finite_mean(hd95)
        for group, values in sorted(self.groups.items()):
            if len(values) >= self.min_group_cases:
                out[f"group-dice:{group}"] = finite_mean(values)
                out[f"group-cases:{group}"] = float(len(values))
        return out


def finite_mean(values: list[float | None]) -> float:
    """Mean of the finite values (None and NaN skipped); NaN when there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")
