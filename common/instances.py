"""Instance masks <-> Mask R-CNN: training targets from an instance map, and whole-image
instance maps from overlapping tiles whose border instances are merged without duplicates."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision.ops import masks_to_boxes

Detections = dict[str, torch.Tensor]  # torchvision's output: boxes, labels, scores, masks


@dataclass(frozen=True)
class Candidate:
    """One detected instance: its score and binary mask, placed at (y, x) in the image."""

    score: float
    y: int
    x: int
    mask: torch.Tensor


def targets_from_instances(instances: torch.Tensor) -> Detections:
    """Mask R-CNN training target from an (H, W) instance map (0 background, any ids > 0).

    Ids need not be contiguous. Boxes follow the pixel-edge convention (a pixel covers
    [x, x + 1)), so a 1-pixel instance has a 1x1 box instead of torchvision's rejected
    zero-area one. No instance gives empty boxes/labels/masks, which torchvision trains on as
    background only.
    """
    if instances.ndim != 2:
        raise ValueError(f"instance map must be (H, W), got shape {tuple(instances.shape)}")
    ids = torch.unique(instances)
    ids = ids[ids > 0]
    masks = (instances[None] == ids[:, None, None]).to(torch.uint8)
    boxes = masks_to_boxes(masks) if len(ids) else torch.zeros((0, 4))
    boxes[:, 2:] += 1
    return {"boxes": boxes.float(), "labels": torch.ones(len(ids), dtype=torch.int64), "masks": masks}


def paint_instances(shape: tuple[int, int], candidates: list[Candidate],
                    min_kept: float = 0.5) -> tuple[torch.Tensor, list[float]]:
    """An instance map from possibly overlapping masks, highest score (then area) first.

    Each pixel goes to the first instance that claims it; an instance that keeps less than
    ``min_kept`` of its own pixels is a duplicate of one already painted and is dropped.

    Returns:
        (int32 map with ids 1..N, score of each id in order).
    """
    out = torch.zeros(shape, dtype=torch.int32)
    scores: list[float] = []
    for c in sorted(candidates, key=lambda c: (c.score, int(c.mask.sum())), reverse=True):
        h, w = c.mask.shape
        window = out[c.y:c.y + h, c.x:c.x + w]
        mask = c.mask[:window.shape[0], :window.shape[1]]
        free = mask & (window == 0)
        area = int(mask.sum())
        if area == 0 or int(free.sum()) < min_kept * area:
            continue
        scores.append(c.score)
        window[free] = len(scores)
    return out, scores


@dataclass(frozen=True)
class Tiling:
    """Overlapping square tiles over an image and the core of each, which partition the image.

    Args:
        tile: tile edge in pixels.
        overlap: pixels shared by neighbouring tiles.
    """

    tile: int
    overlap: int

    def starts(self, length: int) -> list[int]:
        """Tile origins along an axis of ``length`` >= tile; the last tile ends at the edge."""
        stride = self.tile - self.overlap
        starts = list(range(0, max(length - self.tile, 0) + 1, stride))
        if starts[-1] + self.tile < length:
            starts.append(length - self.tile)
        return starts

    def cores(self, length: int) -> list[tuple[int, int]]:
        """Half-open core of every tile: cuts sit mid-way through each overlap."""
        starts = self.starts(length)
        cuts = [0] + [(b + a + self.tile) // 2 for a, b in zip(starts, starts[1:])] + [length]
        return list(zip(cuts, cuts[1:]))


def predict_instances(predictor: Callable[[torch.Tensor], Detections], image: torch.Tensor,
                      tile: int, overlap: int, score_threshold: float = 0.5
                      ) -> tuple[torch.Tensor, list[float]]:
    """Instance map of a whole (C, H, W) image by overlapping tiles.

    A detection is kept only by the tile whose core holds its mask's centroid, so an object
    that appears in several tiles is counted once; the rare large object cut by a tile edge is
    then removed by ``paint_instances`` as a duplicate of its whole copy.

    Args:
        predictor: tile (C, tile, tile) -> torchvision detections with (N, 1, h, w) mask scores.
        image: the whole image; padded with zeros to at least one tile.
        tile: tile edge (the model's input size).
        overlap: pixels shared by neighbouring tiles (> the largest object's radius).
        score_threshold: detections scoring lower are ignored.

    Returns:
        (int32 instance map (H, W), score per instance id).
    """
    _, height, width = image.shape
    padded = torch.nn.functional.pad(image, (0, max(tile - width, 0), 0, max(tile - height, 0)))
    size_y, size_x = padded.shape[1:]
    tiling = Tiling(tile, overlap)
    candidates: list[Candidate] = []
    for y0, (y_lo, y_hi) in zip(tiling.starts(size_y), tiling.cores(size_y)):
        for x0, (x_lo, x_hi) in zip(tiling.starts(size_x), tiling.cores(size_x)):
            found = predictor(padded[:, y0:y0 + tile, x0:x0 + tile])
            for score, prob in zip(found["scores"].tolist(), found["masks"]):
                mask = prob[0].cpu() > 0.5
                if score < score_threshold or not mask.any():
                    continue
                ys, xs = torch.nonzero(mask, as_tuple=True)
                cy, cx = y0 + float(ys.float().mean()), x0 + float(xs.float().mean())
                if y_lo <= cy < y_hi and x_lo <= cx < x_hi:  # cropped to its box to save memory
                    top, left = int(ys.min()), int(xs.min())
                    box = mask[top:int(ys.max()) + 1, left:int(xs.max()) + 1]
                    candidates.append(Candidate(score, y0 + top, x0 + left, box))
    return paint_instances((height, width), candidates)
