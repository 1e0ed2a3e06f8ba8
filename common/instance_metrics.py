"""Instance segmentation scores per site: PQ, AJI, mask AP@0.5 and foreground Dice/HD95.

PQ, AJI and AP all come from one contingency table of pixel overlaps per image. PQ follows
MONAI's ``compute_panoptic_quality`` (a test checks they agree), which builds a full-image mask
per instance: gigabytes for a 1000x1000 MoNuSeg tile with ~700 nuclei. MONAI has no AJI or mask
AP, and COCO's tools (pycocotools) are not a dependency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedseg.common.metrics import SegmentationScores, finite_mean


@dataclass(frozen=True)
class Overlaps:
    """Pixel overlaps of ground-truth and predicted instances in one image.

    Args:
        inter: (G, P) intersection areas.
        gt_area: (G,) areas of ground-truth instances.
        pred_area: (P,) areas of predicted instances.
        pred_ids: (P,) the predicted ids, in column order.
    """

    inter: np.ndarray
    gt_area: np.ndarray
    pred_area: np.ndarray
    pred_ids: np.ndarray

    @classmethod
    def of(cls, gt: torch.Tensor, pred: torch.Tensor) -> Overlaps:
        """Contingency table of two instance maps of the same shape (0 = background)."""
        if gt.shape != pred.shape:
            raise ValueError(f"instance maps differ in shape: {tuple(gt.shape)} vs {tuple(pred.shape)}")
        g_ids, g = np.unique(gt.cpu().numpy().ravel(), return_inverse=True)
        p_ids, p = np.unique(pred.cpu().numpy().ravel(), return_inverse=True)
        table = np.bincount(g * len(p_ids) + p, minlength=len(g_ids) * len(p_ids))
        table = table.reshape(len(g_ids), len(p_ids))
        g_keep, p_keep = g_ids > 0, p_ids > 0
        return cls(table[g_keep][:, p_keep].astype(np.float64), table.sum(1)[g_keep].astype(np.float64),
                   table.sum(0)[p_keep].astype(np.float64), p_ids[p_keep])

    def iou(self) -> np.ndarray:
        """(G, P) intersection over union."""
        union = self.gt_area[:, None] + self.pred_area[None, :] - self.inter
        return np.divide(self.inter, union, out=np.zeros_like(self.inter), where=union > 0)


def panoptic_quality(ov: Overlaps, threshold: float = 0.5) -> tuple[float, float, float]:
    """(PQ, SQ, RQ) for one class; matches are pairs with IoU > ``threshold`` (>= 0.5: unique)."""
    iou = ov.iou()
    matched = iou[iou > threshold]
    tp = len(matched)
    fp, fn = len(ov.pred_area) - tp, len(ov.gt_area) - tp
    if tp + fp + fn == 0:
        return float("nan"), float("nan"), float("nan")
    sq = float(matched.sum() / (tp + 1e-6))
    rq = tp / (tp + 0.5 * fp + 0.5 * fn)
    return sq * rq, sq, rq


def aggregated_jaccard(ov: Overlaps) -> float:
    """AJI (Kumar et al., IEEE TMI 2017): each ground-truth nucleus is paired with the prediction
    of highest IoU; predictions never paired add their whole area to the union."""
    if len(ov.gt_area) == 0:
        return float("nan")
    if len(ov.pred_area) == 0:
        return 0.0
    best = ov.iou().argmax(axis=1)
    rows = np.arange(len(ov.gt_area))
    inter = ov.inter[rows, best]
    has_match = inter > 0
    intersection = inter[has_match].sum()
    union = (ov.gt_area[has_match] + ov.pred_area[best[has_match]] - inter[has_match]).sum()
    union += ov.gt_area[~has_match].sum()
    used = np.zeros(len(ov.pred_area), dtype=bool)
    used[best[has_match]] = True
    union += ov.pred_area[~used].sum()
    return float(intersection / union) if union > 0 else float("nan")


def ap_matches(ov: Overlaps, scores: dict[int, float], threshold: float = 0.5) -> list[tuple[float, bool]]:
    """(score, true positive?) per prediction, greedily matched by descending score at IoU >= 0.5."""
    iou = ov.iou()
    taken = np.zeros(len(ov.gt_area), dtype=bool)
    out = []
    for col in sorted(range(len(ov.pred_ids)), key=lambda c: -scores.get(int(ov.pred_ids[c]), 0.0)):
        candidates = np.where(~taken & (iou[:, col] >= threshold))[0]
        hit = len(candidates) > 0
        if hit:
            taken[candidates[iou[candidates, col].argmax()]] = True
        out.append((scores.get(int(ov.pred_ids[col]), 0.0), hit))
    return out


def average_precision(matches: list[tuple[float, bool]], num_gt: int) -> float:
    """Area under the precision-recall curve with precision made monotone (all-point, VOC)."""
    if num_gt == 0:
        return float("nan")
    if not matches:
        return 0.0
    hits = np.array([hit for _, hit in sorted(matches, key=lambda m: -m[0])], dtype=float)
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / num_gt
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float((steps * precision).sum())


class InstanceScores:
    """Accumulates a site's instance scores over cases: per-image PQ/SQ/RQ and AJI (averaged
    over images, as the MoNuSeg challenge does), AP@0.5 over all predictions of the site, and
    foreground Dice/HD95 (plus fairness groups) through ``SegmentationScores``.

    Args:
        min_group_cases: fewest cases a fairness group needs before its Dice is reported.
    """

    def __init__(self, min_group_cases: int = 5) -> None:
        self.semantic = SegmentationScores(2, min_group_cases)
        self.per_image: dict[str, list[float]] = {"pq": [], "sq": [], "rq": [], "aji": []}
        self.matches: list[tuple[float, bool]] = []
        self.num_gt = 0
        self.num_pred = 0

    def add(self, pred: torch.Tensor, scores: list[float], gt: torch.Tensor,
            spacing: tuple[float, ...], group: str = "") -> None:
        """Score one case: ``pred`` (H, W) ids 1..N with ``scores[i - 1]`` for id i; ``gt`` (H, W)."""
        ov = Overlaps.of(gt, pred)
        for name, value in zip(("pq", "sq", "rq"), panoptic_quality(ov)):
            self.per_image[name].append(value)
        self.per_image["aji"].append(aggregated_jaccard(ov))
        self.matches += ap_matches(ov, {i + 1: s for i, s in enumerate(scores)})
        self.num_gt += len(ov.gt_area)
        self.num_pred += len(ov.pred_area)
        self.semantic.add(_foreground(pred), _foreground(gt), spacing, group)

    def result(self) -> dict[str, float]:
        """``pq``, ``sq``, ``rq``, ``aji``, ``ap50``, foreground ``dice``/``hd95`` and instance counts."""
        out = self.semantic.result()
        if not out:
            return out
        for name, values in self.per_image.items():
            out[name] = finite_mean(values)
        out["ap50"] = average_precision(self.matches, self.num_gt)
        out["instances-true"] = float(self.num_gt)
        out["instances-found"] = float(self.num_pred)
        return out


def _foreground(instances: torch.Tensor) -> torch.Tensor:
    """(H, W) instance map -> (1, 1, H, W) foreground class map."""
    return (instances > 0).to(torch.int64)[None, None]
