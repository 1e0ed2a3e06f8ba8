"""Segmentation scores a person reads: a label the model never predicts has no HD95 (NaN, shown
as a dash), never a perfect-looking 0."""

import math

import torch

from fedseg.common.metrics import SegmentationScores


def _maps(pred_square: bool) -> tuple[torch.Tensor, torch.Tensor]:
    label = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    label[..., 4:8, 4:8] = 1
    label[..., 10:14, 10:14] = 2
    pred = torch.zeros_like(label)
    pred[..., 10:14, 10:14] = 2  # label 2 found exactly
    if pred_square:
        pred[..., 4:8, 5:9] = 1  # label 1 found one pixel off
    return pred, label


def test_a_label_never_predicted_has_no_hd95_and_a_found_one_has_its_distance():
    scores = SegmentationScores(3)
    scores.add(*_maps(pred_square=False), spacing=(1.0, 1.0))
    out = scores.result()
    assert out["dice-1"] == 0.0 and math.isnan(out["hd95-1"])
    assert out["dice-2"] == 1.0 and out["hd95-2"] == 0.0
    scores.add(*_maps(pred_square=True), spacing=(2.0, 2.0))
    out = scores.result()  # label 1: only the case where it was predicted has a distance (1 px = 2 mm)
    assert out["hd95-1"] == 2.0 and out["hd95"] == 1.0
