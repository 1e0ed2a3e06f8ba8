"""Site inference: the global model + this site's own local layers on a folder of images."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from PIL import Image

from fedseg.client.instance_trainer import segment_instances
from fedseg.client.state import SiteState
from fedseg.common.data import NIFTI_SUFFIXES, PNG_SUFFIXES, DataError, image_transforms
from fedseg.common.models import ModelSpec, build_model

log = logging.getLogger(__name__)


def load_site_model(model_path: str | Path, state_dir: str | Path | None
                    ) -> tuple[torch.nn.Module, ModelSpec, int]:
    """Global shared weights from ``model/global.pt`` plus the site's local layers.

    Returns:
        (model in eval mode, its spec, the run's patch size = sliding-window ROI / tile).

    Raises:
        DataError: unreadable model file, or a state dir without the local layers it needs.
    """
    try:
        saved = torch.load(model_path, map_location="cpu", weights_only=True)
        spec = ModelSpec.from_dict(saved["model"])
    except Exception as err:  # noqa: BLE001 - any failure means the file is not a fedseg model
        raise DataError(f"{model_path}: not a fedseg global model ({err})") from None
    model = build_model(spec)
    model.load_state_dict(saved["state_dict"], strict=False)
    local = SiteState(state_dir).load_local_layers() if state_dir else None
    if saved["local_keys"] and local is None and any(
            torch.is_floating_point(v) for k, v in model.state_dict().items() if k in saved["local_keys"]):
        log.warning("no local layers in %s: site-local layers keep their initial values", state_dir)
    if local:
        model.load_state_dict(local, strict=False)
    return model.eval(), spec, int(saved["patch_size"])


@torch.no_grad()
def predict_folder(model_path: str | Path, state_dir: str | Path | None, images_dir: str | Path,
                   out_dir: str | Path, device: str = "cpu") -> list[tuple[Path, float]]:
    """Write one label map per image: NIfTI with the input's affine, PNG for 2D images; a Mask
    R-CNN model writes instance maps (16-bit PNG, ids 1..N, by overlapping tiles).

    Returns:
        (output file, seconds) per case.
    """
    model, spec, patch = load_site_model(model_path, state_dir)
    model.to(device)
    images = sorted(p for p in Path(images_dir).iterdir()
                    if p.name.lower().endswith(PNG_SUFFIXES + NIFTI_SUFFIXES))
    if not images:
        raise DataError(f"{images_dir}: no .png/.jpg/.nii.gz images")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dims = spec.spatial_dims
    done = []
    for path in images:
        start = time.perf_counter()
        image = image_transforms(path)(str(path))
        if image.ndim != dims + 1:
            raise DataError(f"{path}: has shape {tuple(image.shape)}, the model is {dims}D")
        if spec.model == "maskrcnn":
            instances, _ = segment_instances(model, image, patch, device)
            pred = instances.numpy().astype(np.uint16)
        else:
            logits = sliding_window_inference(image[None].to(device), (patch,) * dims, 4, model, 0.25)
            pred = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            target = out_dir / path.name
            nib.save(nib.Nifti1Image(pred, nib.load(path).affine), target)
        else:
            target = out_dir / f"{path.name.rsplit('.', 1)[0]}.png"
            Image.fromarray(pred).save(target)
        done.append((target, time.perf_counter() - start))
    return done
