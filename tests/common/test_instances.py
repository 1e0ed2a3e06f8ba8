"""Instance masks -> Mask R-CNN targets, and tiled inference merged without duplicates."""

import numpy as np
import pytest
import torch

from fedseg.common.instances import Tiling, paint_instances, predict_instances, targets_from_instances
from fedseg.common.maskrcnn import build_maskrcnn


def test_no_instances_gives_an_empty_target_that_trains():
    target = targets_from_instances(torch.zeros(32, 32, dtype=torch.long))
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 32, 32)
    model = build_maskrcnn(1, "slim", "group", 32).train()
    losses = model([torch.randn(1, 32, 32)], [target])
    assert losses["loss_mask"].item() == 0.0 and torch.isfinite(sum(losses.values()))


def test_one_pixel_and_non_contiguous_touching_ids():
    inst = torch.zeros(40, 40, dtype=torch.long)
    inst[5, 7] = 250  # a 1-pixel nucleus
    inst[10:20, 10:20] = 3
    inst[10:20, 20:30] = 9  # touches id 3 along a whole edge
    target = targets_from_instances(inst)
    boxes = {tuple(b.tolist()) for b in target["boxes"]}
    assert boxes == {(10.0, 10.0, 20.0, 20.0), (20.0, 10.0, 30.0, 20.0), (7.0, 5.0, 8.0, 6.0)}
    assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()  # torchvision rejects empty boxes
    assert target["masks"].sum(dim=(1, 2)).tolist() == [100, 100, 1]
    assert target["masks"].sum(0).max() == 1  # one owner per pixel
    assert (target["labels"] == 1).all()
    model = build_maskrcnn(1, "slim", "group", 40).train()
    assert torch.isfinite(sum(model([torch.randn(1, 40, 40)], [target]).values()))


def test_tile_cores_partition_the_axis():
    tiling = Tiling(64, 16)
    for length in (64, 65, 100, 150, 1000):
        starts, cores = tiling.starts(length), tiling.cores(length)
        assert starts[0] == 0 and starts[-1] + 64 == length
        assert cores[0][0] == 0 and cores[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(cores, cores[1:]))
        assert all(s <= lo and hi <= s + 64 for s, (lo, hi) in zip(starts, cores))


def _blobs(shape, count, radius, seed):
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inst = np.zeros(shape, np.int64)
    for k in range(1, count + 1):
        cy, cx = rng.uniform(radius, shape[0] - radius), rng.uniform(radius, shape[1] - radius)
        inst[((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2) & (inst == 0)] = k
    return torch.from_numpy(inst)


def _oracle(tile):
    """A perfect detector: the tile's pixels are the instance ids themselves."""
    ids = [int(i) for i in torch.unique(tile[0]) if i > 0]
    masks = torch.stack([(tile[0] == i).float()[None] for i in ids]) if ids else torch.zeros(0, 1, *tile.shape[1:])
    return {"scores": torch.ones(len(ids)), "masks": masks}


@pytest.mark.parametrize("radius", [3, 12])
def test_tiles_merge_without_duplicates_at_borders(radius):
    truth = _blobs((150, 170), 40 if radius == 3 else 8, radius, seed=radius)
    image = truth[None].float()
    pred, scores = predict_instances(_oracle, image, tile=64, overlap=16)
    present = [int(i) for i in torch.unique(truth) if i > 0]
    assert int(pred.max()) == len(present) == len(scores)  # every object once, none twice
    for i in present:
        ids, counts = torch.unique(pred[truth == i], return_counts=True)
        owner = int(ids[counts.argmax()])
        iou = ((pred == owner) & (truth == i)).sum() / ((pred == owner) | (truth == i)).sum()
        assert owner > 0 and iou >= (1.0 if radius < 8 else 0.8)  # big objects may be cut at a tile edge


def test_paint_drops_a_duplicate_and_keeps_the_higher_score():
    from fedseg.common.instances import Candidate

    a = torch.zeros(10, 10, dtype=torch.bool)
    a[2:6, 2:6] = True
    b = a.clone()
    b[2:6, 6] = True  # nearly the same object, lower score
    pred, scores = paint_instances((10, 10), [Candidate(0.6, 0, 0, b), Candidate(0.9, 0, 0, a)])
    assert scores == [0.9] and int(pred.max()) == 1 and int((pred == 1).sum()) == 16
