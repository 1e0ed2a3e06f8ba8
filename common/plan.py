"""A federation's dataset fingerprint, and the U-Net plan nnU-Net would make from the pooled data,
made without pooling anything.

A site summarizes its training cases (``site_fingerprint``) into fixed-grid histograms and sums:
voxel spacing, size after cropping to the image's non-zero region and physical extent per axis,
the share of the image that crop keeps, foreground intensities per channel (a bounded sample per
case, as nnU-Net takes), and voxel counts per label. Nothing per case or per file is in it.
``merge`` adds the sites' parts: case, voxel and label counts and the intensity sums are the pooled
data's exactly; medians and percentiles are read from the merged histograms: sizes exactly, spacing
and extent as the mean of the values in the median's 1%-wide bin (exact where that bin holds one
distinct value, as scanners' fixed spacings do; within 1% otherwise), intensities within 0.25% of
1 + |value|.

``make_plan`` applies nnU-Net's planning rules (Isensee et al., Nature Methods 2021; nnunetv2's
``ExperimentPlanner`` and ``get_pool_and_conv_props``): target spacing (the median, with the
anisotropy rule), patch size and batch size for a memory budget, the stages, kernel sizes,
strides and features of its U-Net (what MONAI's ``DynUNet`` takes), and per-channel normalization. They are
written out here because nnunetv2's planner reads per-case lists from its own folders, which a
federation never has.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.common.data import Case, SiteSpec, distance_unit

FINGERPRINT = "fingerprint"  # discovery: the question's flag, the answer's JSON
SIZE_STEP = 0.01  # spacing and extent bins are 1% wide (log-spaced)
SAME_GRID = 0.01  # a case within 1% of the target spacing along every axis needs no resampling
INTENSITY_STEP = 0.005  # intensity bins: 0.5% wide on sign(v) * log(1 + |v|)
SAMPLES_PER_CASE = 10_000  # foreground voxels per case and channel for intensity statistics (nnU-Net's)
ANISOTROPY = 3.0  # nnU-Net's threshold for an anisotropic axis
# nnU-Net's memory model: conv feature map elements of its reference U-Net per GB and batch
REFERENCE_ELEMENTS = {2: 85_000_000, 3: 560_000_000}
REFERENCE_GB, REFERENCE_BATCH = 8.0, {2: 12, 3: 2}
MIN_EDGE, MIN_BATCH, MAX_DATASET_SHARE = 4, 2, 0.05
BASE_FEATURES, MAX_FEATURES = 32, {2: 512, 3: 320}
INITIAL_VOXELS = {2: 2048 ** 2, 3: 256 ** 3}
CT = re.compile(r"\bCT\b", re.IGNORECASE)


def _log_bin(value: float) -> int:
    return math.floor(math.log(value) / math.log1p(SIZE_STEP))


def _binned(histogram: dict[int, list[float]], q: float) -> float:
    """The mean of the values in the bin holding the ``q``-th percentile (bin -> [count, sum])."""
    index = int(_percentile({b: int(v[0]) for b, v in histogram.items()}, q))
    return histogram[index][1] / histogram[index][0]


def _add_binned(a: dict[int, list[float]], b: dict[int, list[float]]) -> dict[int, list[float]]:
    return {k: [x + y for x, y in zip(a.get(k, [0, 0.0]), b.get(k, [0, 0.0]))] for k in sorted(a.keys() | b.keys())}


def _intensity_bins(values: np.ndarray) -> np.ndarray:
    return np.floor(np.sign(values) * np.log1p(np.abs(values)) / INTENSITY_STEP).astype(np.int64)


def _intensity_value(index: float) -> float:
    x = (index + 0.5) * INTENSITY_STEP
    return float(math.copysign(math.expm1(abs(x)), x))


def _percentile(histogram: dict[int, int], q: float) -> float:
    """The bin index holding the ``q``-th percentile of the values counted in ``histogram``."""
    bins = sorted(histogram)
    counts = np.cumsum([histogram[b] for b in bins])
    return float(bins[int(np.searchsorted(counts, q / 100 * counts[-1], side="left").clip(0, len(bins) - 1))])


def _median_of_values(histogram: dict[int, int]) -> float:
    """The median of exactly counted values (numpy's: the mean of the middle two for an even count)."""
    values = np.repeat(sorted(histogram), [histogram[b] for b in sorted(histogram)])
    return float(np.median(values))


@dataclass
class Fingerprint:
    """What a site tells the planner about its training cases; ``merge`` adds two of them.

    Args:
        cases: number of training cases.
        spatial_dims: 2 or 3.
        channels: image channels.
        modality: the site's modality text (dataset.json).
        spacing: per axis, spacing bin (``SIZE_STEP`` log bins) -> [cases, sum of their spacings].
        size: per axis, voxels after cropping to the non-zero region -> cases.
        extent: per axis, physical size after cropping (size x spacing) bin -> [cases, sum].
        kept: percent of the image's voxels the crop keeps (rounded down) -> cases.
        intensity: per channel, intensity bin -> sampled foreground voxels.
        moments: per channel, [count, sum, sum of squares] of the sampled foreground voxels.
        labels: label value -> voxels.
        units: ``mm`` where the files carry a physical spacing (NIfTI), ``px`` where they do not
            (PNG/JPEG: every pixel counts as 1).
    """

    cases: int
    spatial_dims: int
    channels: int
    modality: str
    spacing: list[dict[int, list[float]]]
    size: list[dict[int, int]]
    extent: list[dict[int, list[float]]]
    kept: dict[int, int]
    intensity: list[dict[int, int]]
    moments: list[list[float]]
    labels: dict[int, int]
    units: str = "mm"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fingerprint:
        def ints(h: dict[Any, Any]) -> dict[int, int]:
            return {int(k): int(v) for k, v in h.items()}

        def binned(h: dict[Any, Any]) -> dict[int, list[float]]:
            return {int(k): [int(v[0]), float(v[1])] for k, v in h.items()}

        return cls(int(data["cases"]), int(data["spatial_dims"]), int(data["channels"]), str(data["modality"]),
                   [binned(h) for h in data["spacing"]], [ints(h) for h in data["size"]],
                   [binned(h) for h in data["extent"]], ints(data["kept"]), [ints(h) for h in data["intensity"]],
                   [[float(x) for x in m] for m in data["moments"]], ints(data["labels"]),
                   str(data.get("units", "mm")))

    def median_spacing(self) -> tuple[float, ...]:
        return tuple(_binned(h, 50) for h in self.spacing)

    def median_size(self) -> tuple[float, ...]:
        return tuple(_median_of_values(h) for h in self.size)

    def intensity_stats(self) -> list[dict[str, float]]:
        """Per channel: mean, std, percentiles 0.5 and 99.5 of the sampled foreground voxels."""
        out = []
        for histogram, (n, total, squares) in zip(self.intensity, self.moments):
            mean = total / n if n else float("nan")
            std = math.sqrt(max(squares / n - mean ** 2, 0.0)) if n else float("nan")
            low, high = (_intensity_value(_percentile(histogram, q)) if histogram else float("nan")
                         for q in (0.5, 99.5))
            out.append({"mean": mean, "std": std, "percentile_00_5": low, "percentile_99_5": high})
        return out


def _add(a: dict[int, int], b: dict[int, int]) -> dict[int, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in sorted(a.keys() | b.keys())}


def merge(parts: list[Fingerprint]) -> Fingerprint:
    """The fingerprint of the pooled cases of ``parts`` (all with the same dims and channels).

    Raises:
        ValueError: no parts, or parts of different dimensionality or channel count.
    """
    if not parts:
        raise ValueError("no site fingerprints to merge")
    first = parts[0]
    for p in parts[1:]:
        if (p.spatial_dims, p.channels) != (first.spatial_dims, first.channels):
            raise ValueError(f"sites differ in image dimensions or channels: {first.spatial_dims}D x "
                             f"{first.channels} vs {p.spatial_dims}D x {p.channels}")
    merged = parts[0]
    for p in parts[1:]:
        merged = Fingerprint(
            merged.cases + p.cases, first.spatial_dims, first.channels,
            "; ".join(dict.fromkeys(merged.modality.split("; ") + [p.modality])),  # each modality once
            [_add_binned(a, b) for a, b in zip(merged.spacing, p.spacing)],
            [_add(a, b) for a, b in zip(merged.size, p.size)],
            [_add_binned(a, b) for a, b in zip(merged.extent, p.extent)], _add(merged.kept, p.kept),
            [_add(a, b) for a, b in zip(merged.intensity, p.intensity)],
            [[x + y for x, y in zip(a, b)] for a, b in zip(merged.moments, p.moments)], _add(merged.labels, p.labels),
            merged.units if merged.units == p.units else "mm and px")
    return merged


def site_fingerprint(site: SiteSpec, cases: list[Case] | None = None, seed: int = 1234) -> Fingerprint:
    """The fingerprint of ``cases`` (default: all of the site's training cases); each case's
    foreground sample is seeded by its file name and ``seed``, so a site's part does not depend on
    which other cases share the site.

    Raises:
        DataError: a case cannot be read (the file and the reason).
    """
    from monai.transforms import EnsureChannelFirst, LoadImage
    from monai.transforms.utils import generate_spatial_bounding_box

    from fedseg.common.data import image_reader
    from fedseg.common.errors import DataError

    cases = list(site.training) if cases is None else cases
    dims = site.spatial_dims
    with warnings.catch_warnings():  # MONAI's optional-codec notice, once per reader otherwise
        warnings.simplefilter("ignore")
        load = {path: LoadImage(reader=image_reader(path), image_only=True)
                for path in {cases[0].image, cases[0].label}} if cases else {}
    spacing: list[dict[int, list[float]]] = [{} for _ in range(dims)]
    size: list[Counter] = [Counter() for _ in range(dims)]
    extent: list[dict[int, list[float]]] = [{} for _ in range(dims)]
    kept: Counter = Counter()
    labels: Counter = Counter({int(v): 0 for v in site.labels})  # a declared label no case has still counts
    intensity: list[Counter] | None = None
    moments: list[list[float]] = []
    for case in cases:
        try:
            image = EnsureChannelFirst()(load[cases[0].image](str(case.image)))
            label = EnsureChannelFirst()(load[cases[0].label](str(case.label)))
        except Exception as err:  # noqa: BLE001 - any reader failure is this file's problem
            raise DataError(f"{case.image}: cannot compute its fingerprint ({str(err).strip()[:200]})") from err
        pixdim = [float(s) for s in np.asarray(getattr(image, "pixdim", [1.0] * dims))][:dims]
        array, seg = np.asarray(image), np.asarray(label)[0]
        if seg.shape != array.shape[1:]:
            raise DataError(f"{case.label}: shape {seg.shape} does not match its image's {array.shape[1:]}")
        if site.task == "instance":  # instance ids train as one foreground class
            seg = (seg > 0).astype(np.int64)
        start, end = generate_spatial_bounding_box(array, select_fn=lambda x: x != 0)  # non-zero in any channel
        if any(e > s for s, e in zip(start, end)):  # an all-zero image keeps its whole extent
            box = tuple(slice(int(s), int(e)) for s, e in zip(start, end))
            array, seg = array[(slice(None), *box)], seg[box]
        for axis in range(dims):
            physical = array.shape[axis + 1] * pixdim[axis]
            spacing[axis] = _add_binned(spacing[axis], {_log_bin(pixdim[axis]): [1, pixdim[axis]]})
            size[axis][array.shape[axis + 1]] += 1
            extent[axis] = _add_binned(extent[axis], {_log_bin(physical): [1, physical]})
        kept[int(100 * array[0].size / np.prod(image.shape[1:]))] += 1
        values, counts = np.unique(seg.astype(np.int64), return_counts=True)
        labels.update(dict(zip(values.tolist(), counts.tolist())))
        if intensity is None:
            intensity, moments = [Counter() for _ in array], [[0.0, 0.0, 0.0] for _ in array]
        foreground = seg > 0
        rng = np.random.RandomState(zlib.crc32(case.image.name.encode()) ^ seed)  # a case's sample is its own
        for channel, plane in enumerate(array):
            voxels = plane[foreground].astype(np.float64)
            if voxels.size:
                sample = rng.choice(voxels, SAMPLES_PER_CASE, replace=True)
                intensity[channel].update(Counter(_intensity_bins(sample).tolist()))
                moments[channel] = [moments[channel][0] + sample.size, moments[channel][1] + float(sample.sum()),
                                    moments[channel][2] + float((sample ** 2).sum())]
    return Fingerprint(len(cases), dims, len(intensity or []), site.modality, spacing,
                       [dict(c) for c in size], extent, dict(kept),
                       [dict(c) for c in intensity or []], moments, dict(labels), distance_unit(site))


@dataclass(frozen=True)
class Plan:
    """What the planner decided for one configuration (2D or 3D).

    Args:
        spatial_dims: 2 or 3.
        spacing: target spacing per axis (mm), in the images' own axis order.
        median_shape: median image size at that spacing, after cropping.
        patch_size: training patch per axis.
        batch_size: patches per step.
        kernels: convolution kernel per stage and axis.
        strides: stride per stage and axis (the first stage's are 1).
        features: feature maps per stage.
        normalization: per channel, ``ct`` (clip to the foreground's 0.5/99.5 percentiles, then
            z-score with its mean and std) or ``zscore`` (each image by its own mean and std).
        intensity: per channel, the foreground statistics ``ct`` normalization uses.
        nonzero_mask: z-score within the non-zero region only (the crop kept under 3/4 of the image).
        memory_gb: the memory budget the patch and batch were sized for.
    """

    spatial_dims: int
    spacing: tuple[float, ...]
    median_shape: tuple[int, ...]
    patch_size: tuple[int, ...]
    batch_size: int
    kernels: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    features: tuple[int, ...]
    normalization: tuple[str, ...]
    intensity: tuple[dict[str, float], ...] = field(default=())
    nonzero_mask: bool = False
    memory_gb: float = REFERENCE_GB

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


def target_spacing(fp: Fingerprint) -> tuple[float, ...]:
    """The median spacing per axis; where one axis is over 3x coarser than the others in both
    spacing and voxel count, the 10th percentile of that axis (nnU-Net's anisotropy rule)."""
    target = list(fp.median_spacing())
    sizes = fp.median_size()
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    if (len(target) == 3 and target[worst] > ANISOTROPY * max(target[i] for i in others)
            and sizes[worst] * ANISOTROPY < min(sizes[i] for i in others)):
        low = _binned(fp.spacing[worst], 10)
        if low < max(target[i] for i in others):
            low = max(target[i] for i in others) + 1e-5
        target[worst] = low
    return tuple(target)


def pool_and_conv(spacing: tuple[float, ...], patch: tuple[int, ...]) -> tuple[tuple[tuple[int, ...], ...],
                                                                             tuple[tuple[int, ...], ...],
                                                                             tuple[int, ...], tuple[int, ...]]:
    """Strides and kernels per stage, the patch padded to what the strides divide, and that
    divisor per axis (nnU-Net's ``get_pool_and_conv_props``): an axis is downsampled while its
    feature map stays >= 8 and its spacing is within 2x of the finest; kernels are 3 along axes
    within 2x of the finest spacing, 1 along coarser ones until they catch up."""
    dims = len(spacing)
    current, size = list(spacing), [float(s) for s in patch]
    strides, kernels = [(1,) * dims], []
    pools, kernel = [0] * dims, [1] * dims
    while True:
        valid = [i for i in range(dims) if size[i] >= 2 * MIN_EDGE]
        if not valid:
            break
        finest = min(current[i] for i in valid)
        valid = [i for i in valid if current[i] / finest < 2]
        if len(valid) == 1 and size[valid[0]] < 3 * MIN_EDGE:
            break
        if not valid:
            break
        for d in range(dims):
            if kernel[d] != 3 and current[d] / min(current) < 2:
                kernel[d] = 3
        step = [1] * dims
        for v in valid:
            step[v] = 2
            pools[v] += 1
            current[v] *= 2
            size[v] = math.ceil(size[v] / 2)
        strides.append(tuple(step))
        kernels.append(tuple(kernel))
    kernels.append((3,) * dims)
    divisor = tuple(2 ** p for p in pools)
    padded = tuple(int(s + d - s % d) if s % d else int(s) for s, d in zip(patch, divisor))
    return tuple(strides), tuple(kernels), padded, divisor


def feature_map_elements(patch: tuple[int, ...], strides: tuple[tuple[int, ...], ...], features: tuple[int, ...],
                         classes: int) -> int:
    """Conv output elements of one patch through nnU-Net's plain U-Net (two convs per stage both
    ways, a transposed conv per decoder stage, the final segmentation): its memory model."""
    sizes, current = [], list(patch)
    for stride in strides:
        current = [c // s for c, s in zip(current, stride)]
        sizes.append(math.prod(current))
    encoder = sum(2 * f * n for f, n in zip(features, sizes))
    decoder = sum(3 * f * n for f, n in zip(features[:-1], sizes[:-1])) + classes * sizes[0]
    return encoder + decoder


def plan_configuration(fp: Fingerprint, spacing: tuple[float, ...], median_shape: tuple[float, ...],
                       dataset_voxels: float, memory_gb: float = REFERENCE_GB) -> Plan:
    """nnU-Net's plan of one configuration: the largest patch (starting from 256^3 or 2048^2
    voxels shaped by the spacing, capped by the median image) whose feature maps fit
    ``memory_gb`` at the reference batch, shrinking the axis largest relative to the image; the
    batch that fills the budget, at most 5% of the dataset's voxels, at least 2."""
    dims = len(spacing)
    inverse = 1 / np.asarray(spacing)
    start = [round(float(i)) for i in inverse * (INITIAL_VOXELS[dims] / float(np.prod(inverse))) ** (1 / dims)]
    patch = tuple(min(a, int(b)) for a, b in zip(start, median_shape))
    classes = len(fp.labels)

    def features_for(stages: int) -> tuple[int, ...]:
        return tuple(min(MAX_FEATURES[dims], BASE_FEATURES * 2 ** i) for i in range(stages))

    strides, kernels, patch, divisor = pool_and_conv(spacing, patch)
    reference = REFERENCE_ELEMENTS[dims] * memory_gb / REFERENCE_GB
    ref_batch = REFERENCE_BATCH[dims]
    estimate = feature_map_elements(patch, strides, features_for(len(strides)), classes)
    while estimate / ref_batch * 2 > reference:
        axis = int(np.argsort([p / m for p, m in zip(patch, median_shape)])[-1])
        trial = list(patch)
        trial[axis] -= divisor[axis]
        _, _, _, divisor = pool_and_conv(spacing, tuple(trial))
        shrunk = list(patch)
        shrunk[axis] -= divisor[axis]
        strides, kernels, patch, divisor = pool_and_conv(spacing, tuple(shrunk))
        estimate = feature_map_elements(patch, strides, features_for(len(strides)), classes)
    batch = round(reference / estimate * ref_batch)
    batch = max(min(batch, round(dataset_voxels * MAX_DATASET_SHARE / float(np.prod(patch)))), MIN_BATCH)
    stats = fp.intensity_stats()
    ct = bool(CT.search(fp.modality))
    kept = _median_of_values(fp.kept) / 100
    return Plan(dims, tuple(float(s) for s in spacing), tuple(int(round(m)) for m in median_shape), patch, int(batch),
                kernels, strides, features_for(len(strides)), tuple("ct" if ct else "zscore" for _ in stats),
                tuple(stats), nonzero_mask=not ct and kept < 0.75, memory_gb=memory_gb)


def make_plan(fp: Fingerprint, memory_gb: float = REFERENCE_GB) -> dict[str, Plan]:
    """nnU-Net's configurations for the pooled data ``fp`` describes: ``3d`` (3D data whose
    median image is more than one slice) and ``2d`` (slices of 3D data along its coarsest axis,
    or the 2D images)."""
    spacing = target_spacing(fp)
    median_extent = [_binned(h, 50) for h in fp.extent]
    shape = tuple(e / s for e, s in zip(median_extent, spacing))
    dataset_voxels = float(np.prod([round(s) for s in shape])) * fp.cases
    plans = {}
    if fp.spatial_dims == 3:
        # nnU-Net plans in its reader's axis order (NIfTI's reversed) with the coarsest axis first;
        # ties (which axis is coarsest, which to shrink) follow that order
        reverse = [2, 1, 0] if fp.units == "mm" else [0, 1, 2]
        coarsest = reverse[int(np.argmax([spacing[i] for i in reverse]))]
        order = [coarsest] + [i for i in reverse if i != coarsest]
        back = [order.index(i) for i in range(3)]
        if round(shape[order[0]]) > 1:
            plans["3d"] = _reordered(plan_configuration(fp, tuple(spacing[i] for i in order),
                                                        tuple(shape[i] for i in order), dataset_voxels, memory_gb), back)
        slices = sorted(order[1:])  # a 2D plan's axes in the images' own order
        plans["2d"] = _reordered(plan_configuration(fp, tuple(spacing[i] for i in order[1:]),
                                                    tuple(shape[i] for i in order[1:]), dataset_voxels, memory_gb),
                                 [order[1:].index(i) for i in slices])
    else:
        plans["2d"] = plan_configuration(fp, spacing, shape, dataset_voxels, memory_gb)
    return plans


def plan_federation(parts: dict[str, Fingerprint], memory_gb: float = REFERENCE_GB
                    ) -> tuple[dict[str, Plan], Fingerprint, list[str]]:
    """The plans of the sites' pooled cases (site name -> its fingerprint), the merged
    fingerprint, and the warnings naming sites far from the others (``outliers``)."""
    merged = merge(list(parts.values()))
    return make_plan(merged, memory_gb), merged, outliers(parts)


def _reordered(plan: Plan, axes: list[int]) -> Plan:
    """``plan`` with every per-axis value taken in the order ``axes``."""
    def pick(values: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(values[a] for a in axes)

    return dataclasses.replace(plan, spacing=pick(plan.spacing), median_shape=pick(plan.median_shape),
                               patch_size=pick(plan.patch_size), kernels=tuple(pick(k) for k in plan.kernels),
                               strides=tuple(pick(s) for s in plan.strides))


def describe(plans: dict[str, Plan], fp: Fingerprint) -> str:
    """The plan in plain words, one configuration per paragraph."""
    cells = "voxels" if fp.spatial_dims == 3 else "pixels"
    spacing = f"median spacing {_fmt(fp.median_spacing())} mm, " if fp.units == "mm" else ""
    lines = [f"{fp.cases} training case(s), {fp.spatial_dims}D, {fp.channels} channel(s), modality {fp.modality!r}; "
             f"{spacing}median size after cropping {_fmt(fp.median_size(), 0)} {cells}"]

    def where(plan: Plan) -> str:
        if fp.units == "px":
            return "on the images' own pixel grid (the files carry no physical spacing)"
        return f"resampled to {_fmt(plan.spacing)} mm"

    for name, plan in plans.items():
        norm = ", ".join(sorted(set(plan.normalization)))
        lines += [
            "",
            f"{name}: {where(plan)} (median image {_fmt(plan.median_shape, 0)} {cells}), "
            f"patches of {_fmt(plan.patch_size, 0)}, batch {plan.batch_size} (sized for {plan.memory_gb:g} GB)",
            f"  U-Net of {len(plan.features)} stages: features {', '.join(map(str, plan.features))}; strides "
            + " ".join(_fmt(s, 0) for s in plan.strides) + "; kernels " + " ".join(_fmt(k, 0) for k in plan.kernels),
            f"  normalization: {norm}" + (" within the non-zero region" if plan.nonzero_mask else ""),
        ]
    return "\n".join(lines)


def _fmt(values: tuple[float, ...], digits: int = 2) -> str:
    return "x".join(f"{v:.{digits}f}" if digits else str(int(v)) for v in values)


def resampling_grid(plan: dict[str, Any] | None, fp: Fingerprint) -> tuple[float, ...]:
    """The plan's target spacing (plan.json's form of a ``Plan``) where the fingerprint's files
    carry one in mm and some case lies off that grid (beyond ``SAME_GRID`` along an axis); empty
    where every image can stay on its own grid."""
    if plan is None or fp.units != "mm" or len(plan["spacing"]) != fp.spatial_dims:
        return ()
    target = tuple(float(s) for s in plan["spacing"])
    means = [[total / cases for cases, total in axis.values()] for axis in fp.spacing]
    return target if any(abs(m / t - 1) > SAME_GRID for axis, t in zip(means, target) for m in axis) else ()


def write_plan(path: str | Path, plans: dict[str, Plan], fp: Fingerprint) -> Path:
    """``plan.json``: the configurations and the merged fingerprint they came from (atomically)."""
    from fedseg.common.atomic import atomic_write_bytes

    data = {"configurations": {k: p.to_json() for k, p in plans.items()}, "fingerprint": fp.to_json()}
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())
    return path


def outliers(parts: dict[str, Fingerprint]) -> list[str]:
    """Warnings naming each site whose data sits far outside the federation's typical site (the
    median over sites, so one odd site does not shift it): a median spacing over 2x off along some
    axis, a CT among other modalities (or the reverse), foreground intensities (0.5 to 99.5
    percentiles) that do not overlap the typical range at all (scanners' contrasts differ; this is
    a site in other units or without its rescale)."""
    if len(parts) < 2:
        return []
    spacing = {name: p.median_spacing() for name, p in parts.items()}
    typical = tuple(float(np.median(axis)) for axis in zip(*spacing.values()))
    ranges = {name: [(c["percentile_00_5"], c["percentile_99_5"]) for c in p.intensity_stats()]
              for name, p in parts.items()}
    usual = [(float(np.nanmedian([r[c][0] for r in ranges.values()])), float(np.nanmedian([r[c][1] for r in ranges.values()])))
             for c in range(len(next(iter(ranges.values()))))]
    ct = {name: bool(CT.search(p.modality)) for name, p in parts.items()}
    notes = []
    for name, part in parts.items():
        if any(a / b > 2 or a / b < 0.5 for a, b in zip(spacing[name], typical)):
            notes.append(f"site {name}: median spacing {_fmt(spacing[name])} {part.units} is far from the "
                         f"federation's typical {_fmt(typical)} (planned for all the same)")
        if ct[name] != (sum(ct.values()) > len(ct) / 2):
            notes.append(f"site {name}: modality {part.modality!r} differs from most sites' in whether it is CT, "
                         "whose intensities mean something else; check that it belongs in this federation")
        for channel, ((low, high), (usual_low, usual_high)) in enumerate(zip(ranges[name], usual)):
            if high < usual_low or low > usual_high:
                notes.append(f"site {name}: channel {channel} foreground intensities {low:.4g} to {high:.4g} lie "
                             f"outside the federation's typical {usual_low:.4g} to {usual_high:.4g}")
    return notes
