"""PQ (against MONAI), AJI and mask AP@0.5 on hand-checked instance maps."""

import pytest
import torch
from monai.metrics import compute_panoptic_quality

from fedseg.common.instance_metrics import (InstanceScores, Overlaps, aggregated_jaccard,
                                            average_precision, panoptic_quality)


def _random_maps(seed):
    g = torch.Generator().manual_seed(seed)
    gt = torch.zeros(48, 48, dtype=torch.int64)
    pred = torch.zeros_like(gt)
    for k in range(1, 9):
        y, x = torch.randint(0, 40, (2,), generator=g).tolist()
        gt[y:y + 7, x:x + 6] = k
        dy, dx = torch.randint(-3, 4, (2,), generator=g).tolist()
        pred[max(y + dy, 0):y + dy + 7, max(x + dx, 0):x + dx + 6] = 20 + k
    return gt, pred


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pq_equals_monai(seed):
    gt, pred = _random_maps(seed)
    ours = panoptic_quality(Overlaps.of(gt, pred))
    for value, name in zip(ours, ("pq", "sq", "rq")):
        assert value == pytest.approx(float(compute_panoptic_quality(pred, gt, metric_name=name)), abs=1e-5)


def test_aji_by_hand():
    gt = torch.zeros(10, 10, dtype=torch.int64)
    gt[0:4, 0:4] = 1  # 16 px
    gt[6:10, 6:10] = 2  # 16 px, missed
    pred = torch.zeros_like(gt)
    pred[0:4, 0:2] = 5  # 8 px inside nucleus 1
    pred[0:2, 6:8] = 7  # 4 px false positive
    ov = Overlaps.of(gt, pred)
    # C = 8; U = (16 + 8 - 8) + 16 (missed) + 4 (unused prediction)
    assert aggregated_jaccard(ov) == pytest.approx(8 / 36)
    assert aggregated_jaccard(Overlaps.of(gt, gt)) == 1.0


def test_ap50_counts_a_confident_false_positive():
    assert average_precision([(0.9, True), (0.8, True)], num_gt=2) == pytest.approx(1.0)
    # ranks: FP(0.95), TP(0.9), TP(0.5) -> precision 1/2 at recall .5, 2/3 at recall 1
    assert average_precision([(0.95, False), (0.9, True), (0.5, True)], 2) == pytest.approx(0.5 * 2 / 3 + 0.5 * 2 / 3)
    assert average_precision([], 3) == 0.0


def test_site_scores_over_cases():
    scores = InstanceScores()
    gt, pred = _random_maps(0)
    scores.add(pred, [0.9] * int(pred.max()), gt, (1.0, 1.0))
    scores.add(gt.to(torch.int32), [1.0] * 8, gt, (1.0, 1.0))  # a perfect case
    out = scores.result()
    assert {"pq", "sq", "rq", "aji", "ap50", "dice", "hd95"} <= set(out)
    assert out["instances-true"] == 16
    perfect = InstanceScores()
    perfect.add(gt, [1.0] * 8, gt, (1.0, 1.0))
    assert perfect.result()["pq"] == pytest.approx(1.0) and perfect.result()["dice"] == 1.0
    assert out["pq"] < 1.0 and out["aji"] < 1.0
