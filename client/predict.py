"""Site inference: the global model + this site's own local layers on a folder of images."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from fedseg.client.site_model import saved_model
from fedseg.client.tasks import task_for
from fedseg.common.data import NIFTI_SUFFIXES, PNG_SUFFIXES, DataError, image_transforms


@torch.no_grad()
def predict_folder(model_path: str | Path, state_dir: str | Path | None, images_dir: str | Path,
                   out_dir: str | Path, device: str = "cpu", overlay: bool = False) -> list[tuple[Path, float]]:
    """Write one label map per image: NIfTI with the input's affine, PNG for 2D images (a Mask
    R-CNN model writes instance maps: 16-bit PNG, ids 1..N).

    Args:
        overlay: also write ``<case>_overlay.png``, the labels in colour over the image (the
            middle slice of a volume), for a person; the label files stay label maps.

    Returns:
        (output file, seconds) per case.
    """
    model, spec, patch = saved_model(model_path, state_dir)
    task = task_for(spec)
    model.to(device)
    images = sorted(p for p in Path(images_dir).iterdir()
                    if p.name.lower().endswith(PNG_SUFFIXES + NIFTI_SUFFIXES))
    if not images:
        raise DataError(f"{images_dir}: no .png/.jpg/.nii.gz images")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for path in images:
        start = time.perf_counter()
        image = image_transforms(path)(str(path))
        if image.ndim != spec.spatial_dims + 1:
            raise DataError(f"{path}: has shape {tuple(image.shape)}, the model is {spec.spatial_dims}D")
        pred = task.infer(model, image, patch, device).labels.numpy().astype(task.label_dtype)
        stem = path.name.split(".")[0]
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            target = out_dir / path.name
            nib.save(nib.Nifti1Image(pred, nib.load(path).affine), target)
        else:
            target = out_dir / f"{stem}.png"
            Image.fromarray(pred).save(target)
        if overlay:
            Image.fromarray(overlay_image(image.numpy(), pred)).save(out_dir / f"{stem}_overlay.png")
        done.append((target, time.perf_counter() - start))
    return done


def overlay_image(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """RGB uint8: the image (channel-first, z-scored; a volume's middle slice) in grey or its own
    colours, each label (class or instance) tinted in a distinct colour at 45% opacity."""
    if labels.ndim == 3:
        middle = labels.shape[-1] // 2
        image, labels = image[..., middle], labels[..., middle]
    shown = image[:3].transpose(1, 2, 0) if image.shape[0] >= 3 else np.repeat(image[:1].transpose(1, 2, 0), 3, -1)
    low, high = shown.min(axis=(0, 1)), shown.max(axis=(0, 1))
    rgb = (shown - low) / (high - low + 1e-6)
    palette = np.array([[0.9, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.3, 0.95], [0.95, 0.8, 0.1],
                        [0.8, 0.1, 0.8], [0.1, 0.85, 0.85]])
    for value in np.unique(labels[labels > 0]):
        mask = labels == value
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * palette[(int(value) - 1) % len(palette)]
    return (rgb * 255).clip(0, 255).astype(np.uint8)
