"""Synthetic multi-site studies with controllable domain shift, written in the site data contract."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter


@dataclass(frozen=True)
class SiteShift:
    """One site's acquisition differences (the domain shift the federation must cope with).

    Args:
        gain: multiplies intensities.
        offset: added to intensities.
        gamma: contrast curve exponent.
        noise: Gaussian noise standard deviation (intensity units, image range ~[0, 1]).
        blur: Gaussian blur sigma in pixels.
        bias: amplitude of a smooth multiplicative bias field (0 = none).
        spacing: voxel size in mm per axis (3D; 2D images are saved without spacing).
    """

    gain: float
    offset: float
    gamma: float
    noise: float
    blur: float
    bias: float
    spacing: tuple[float, ...]


def site_shift(index: int, dims: int, strength: float, seed: int) -> SiteShift:
    """Deterministic shift for site ``index``; ``strength`` 0 makes every site identical."""
    rng = np.random.RandomState(seed * 7_919 + index)
    s = strength
    spacing = tuple(float(round(1.0 + s * rng.uniform(-0.4, 0.6), 2)) for _ in range(dims))
    return SiteShift(gain=1.0 + s * rng.uniform(-0.5, 0.5), offset=s * rng.uniform(-0.2, 0.2),
                     gamma=float(np.exp(s * rng.uniform(-0.5, 0.5))), noise=0.02 + s * rng.uniform(0, 0.08),
                     blur=s * rng.uniform(0, 1.5), bias=s * rng.uniform(0, 0.5), spacing=spacing)


def make_case(rng: np.random.RandomState, size: int, dims: int, num_labels: int, shift: SiteShift,
              instance: bool, voxel_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One image (float32 in ~[0, 1]) and its label map (class ids, or instance ids if ``instance``).

    Structures are random ellipses/ellipsoids; class k has mean intensity rising with k, so every
    label is learnable, and the site's shift is applied on top. With ``voxel_mm``, the case is a
    field of ``size`` mm along each axis sampled at that voxel size (objects of one physical size
    at every site); otherwise ``size`` voxels.
    """
    shape = (max(16, round(size / voxel_mm)) if voxel_mm else size,) * dims
    step = voxel_mm or 1.0  # mm per voxel: centres and radii below are in mm
    grid = np.stack(np.meshgrid(*[np.arange(n) * step for n in shape], indexing="ij"), axis=-1).astype(np.float32)
    label = np.zeros(shape, np.int32)
    image = np.full(shape, 0.2, np.float32)
    for obj in range(1, rng.randint(3, 7)):
        centre = rng.uniform(0.15 * size, 0.85 * size, dims)
        radii = rng.uniform(0.06 * size, 0.16 * size, dims)
        inside = (((grid - centre) / radii) ** 2).sum(-1) <= 1.0
        cls = rng.randint(1, num_labels + 1)
        label[inside] = obj if instance else cls
        image[inside] = 0.35 + 0.5 * cls / num_labels
    image += gaussian_filter(rng.normal(0, 0.05, shape).astype(np.float32), 1.0)  # tissue texture
    if shift.blur > 0:
        image = gaussian_filter(image, shift.blur)
    if shift.bias > 0:
        field = gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), shape[0] / 4)
        image *= 1 + shift.bias * field / (np.abs(field).max() + 1e-6)
    image = np.clip(image, 0, None) ** shift.gamma * shift.gain + shift.offset
    image += rng.normal(0, shift.noise, shape).astype(np.float32)
    if instance:
        label = _relabel(label)
    return image.astype(np.float32), label


def write_study(out: str | Path, *, sites: int = 3, dims: int = 2, cases: int = 12, test_cases: int = 0,
                size: int = 64, num_labels: int = 2, shift: float = 0.5, task: str = "semantic",
                seed: int = 0, spacings: tuple[float, ...] = ()) -> list[Path]:
    """Write a study folder: ``site-<k>/{dataset.json, images/, labels/}`` per site.

    Args:
        out: study folder (created).
        sites: number of sites, >= 1.
        dims: 2 (PNG) or 3 (NIfTI with non-identity affine and per-site spacing).
        cases: training cases per site, >= 1.
        test_cases: additional test cases per site (never trained on).
        size: image edge in pixels/voxels, >= 16.
        num_labels: foreground classes for ``semantic`` (instance studies declare one class).
        shift: domain-shift strength in [0, 1].
        task: ``semantic`` or ``instance``.
        seed: makes the study reproducible.
        spacings: 3D only: site k's isotropic voxel size in mm (one per site); every case is
            then ``size`` mm across, its objects of one physical size at every site.

    Returns:
        The site folders written.
    """
    for name, ok in (("sites", sites >= 1), ("dims", dims in (2, 3)), ("cases", cases >= 1),
                     ("test_cases", test_cases >= 0), ("size", size >= 16),
                     ("num_labels", 1 <= num_labels <= 20), ("shift", 0 <= shift <= 1),
                     ("task", task in ("semantic", "instance")),
                     ("spacings", not spacings or (dims == 3 and len(spacings) == sites and min(spacings) > 0))):
        if not ok:
            raise ValueError(f"synth: bad value for {name}")
    instance = task == "instance"
    labels = {"0": "background"} | ({"1": "object"} if instance else
                                    {str(k): f"structure-{k}" for k in range(1, num_labels + 1)})
    written = []
    for index in range(sites):
        site_dir = Path(out) / f"site-{chr(ord('a') + index) if index < 26 else index}"
        (site_dir / "images").mkdir(parents=True, exist_ok=True)
        (site_dir / "labels").mkdir(parents=True, exist_ok=True)
        shift_k = site_shift(index, dims, shift, seed)
        if spacings:
            shift_k = dataclasses.replace(shift_k, spacing=(float(spacings[index]),) * dims)
        rng = np.random.RandomState(seed * 104_729 + index)
        entries: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
        for i in range(cases + test_cases):
            image, label = make_case(rng, size, dims, 1 if instance else num_labels, shift_k, instance,
                                     float(spacings[index]) if spacings else 0.0)
            entry = _save_case(site_dir, f"case{i:03d}", image, label, dims, shift_k.spacing, index)
            entries["training" if i < cases else "test"].append(entry)
        meta = {"name": site_dir.name, "description": f"fedseg synthetic site {index}",
                "modality": "synthetic", "spatial_dims": dims, "task": task, "labels": labels,
                "shift": shift_k.__dict__, **entries}
        (site_dir / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        written.append(site_dir)
    return written


def _save_case(site_dir: Path, name: str, image: np.ndarray, label: np.ndarray, dims: int,
               spacing: tuple[float, ...], index: int) -> dict[str, str]:
    if dims == 2:
        pixels = np.clip(image / 1.5 * 255, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(site_dir / "images" / f"{name}.png")
        Image.fromarray(label.astype(np.uint16 if label.max() > 255 else np.uint8)).save(
            site_dir / "labels" / f"{name}.png")
        return {"image": f"images/{name}.png", "label": f"labels/{name}.png"}
    angle = 0.1 * (index + 1)  # a small per-site rotation: affines are never the identity
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = [-10.0 * (index + 1), 5.0, 2.5 * index]
    nib.save(nib.Nifti1Image(image, affine), site_dir / "images" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.uint16), affine), site_dir / "labels" / f"{name}.nii.gz")
    return {"image": f"images/{name}.nii.gz", "label": f"labels/{name}.nii.gz"}


def _relabel(label: np.ndarray) -> np.ndarray:
    """Instance ids 1..N for the objects still visible after overlaps."""
    out = np.zeros_like(label)
    for new, old in enumerate(v for v in np.unique(label) if v != 0):
        out[label == old] = new + 1
    return out
