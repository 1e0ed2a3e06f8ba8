"""Site inference: the global model + this site's own local layers on a folder of images."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import torch
from PIL import Image

from fedseg.client.site_model import saved_model
from fedseg.client.tasks import task_for
from fedseg.common.data import NIFTI_SUFFIXES, PNG_SUFFIXES, DataError, image_transforms


@torch.no_grad()
def predict_folder(model_path: str | Path, state_dir: str | Path | None, images_dir: str | Path,
                   out_dir: str | Path, device: str = "cpu") -> list[tuple[Path, float]]:
    """Write one label map per image: NIfTI with the input's affine, PNG for 2D images (a Mask
    R-CNN model writes instance maps: 16-bit PNG, ids 1..N).

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
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            target = out_dir / path.name
            nib.save(nib.Nifti1Image(pred, nib.load(path).affine), target)
        else:
            target = out_dir / f"{path.name.rsplit('.', 1)[0]}.png"
            Image.fromarray(pred).save(target)
        done.append((target, time.perf_counter() - start))
    return done
