"""Site inference: the global model + this site's own local layers on a folder of images; with
several models an ensemble, and per-case uncertainty maps and pre-annotations for the people who
correct the model's proposals."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from fedseg.client.adaptation import adapt_to_site
from fedseg.client.export import OnnxNetwork, exported_model
from fedseg.client.site_model import SavedModel, saved_model
from fedseg.client.tasks import task_for
from fedseg.common.atomic import atomic_write_json
from fedseg.common.data import NIFTI_SUFFIXES, DataError, image_files
from fedseg.common.transforms import image_transforms, resampled
from fedseg.common.precision import site_precision

log = logging.getLogger(__name__)
PRE_ANNOTATIONS = "pre_annotations.json"
OVERLAY_MIN_EDGE = 256  # overlays smaller than this are enlarged (nearest pixel) for a person to see
ADAPT_IMAGES = 32  # images (spread over the folder) the norms adapt on: bounded memory and time


@dataclass(frozen=True)
class Predicted:
    """One case's outputs: the label file, seconds, and the uncertainty score when asked for:
    the image's summed per-pixel entropy (nats) per predicted foreground pixel, so a case whose
    small or missing prediction sits in a wide band of doubt scores high (on synthetic shifted
    sites its rank correlation with the Dice error was 0.79 and 0.84; the mean entropy over the
    predicted foreground alone correlated negatively)."""

    image: Path
    labels: Path
    seconds: float
    uncertainty: float | None = None


@torch.no_grad()
def predict_folder(model_path: str | Path, state_dir: str | Path | None, images_dir: str | Path,
                   out_dir: str | Path, device: str = "cpu", overlay: bool = False,
                   ensemble: list[Path] | None = None, uncertainty: bool = False,
                   pre_annotate: bool = False, adapt: bool = False, amp: str = "auto") -> list[Predicted]:
    """Write one label map per image: NIfTI with the input's affine, PNG for 2D images (a Mask
    R-CNN model writes instance maps: 16-bit PNG, ids 1..N).

    Args:
        overlay: also write ``<case>_overlay.png``, the labels in colour over the image (the
            middle slice of a volume), for a person; the label files stay label maps.
        ensemble: more fedseg models (other rounds' checkpoints, other runs) whose class
            probabilities are averaged with the main model's.
        uncertainty: also write ``<case>_uncertainty`` maps: per-pixel entropy of the averaged
            probabilities (of the ensemble, else of test-time flips along the axes the run's
            training mirrored patches along: none, for scanner images), same geometry as the image.
        pre_annotate: write ``pre_annotations.json``, the predicted labels as a dataset.json
            fragment, most uncertain case first, so annotators correct the worst cases first.
        adapt: first adapt each model's norm layers to this folder's images (BatchNorm
            statistics, then a few bounded entropy-minimization steps on the norm affines; no
            label is read, the saved models are not changed).
        amp: mixed precision of inference (``auto``: bf16/fp16 on CUDA, float32 on CPU).

    Returns:
        What was written for each case, in file order.
    """
    model, spec, patch, trained_flips, _, spacing = _load(model_path, state_dir)
    members = [model] + [_load(path, state_dir).model for path in ensemble or []]
    task = task_for(spec)
    if adapt and any(isinstance(m, OnnxNetwork) for m in members):
        raise DataError(f"{model_path}: --adapt changes a model's norm layers; an exported (ONNX) model "
                        "is fixed: adapt with the run's .pt model")
    if (len(members) > 1 or uncertainty or pre_annotate) and not task.dense_logits:
        raise DataError(f"{model_path}: ensembles, uncertainty and pre-annotations need per-pixel "
                        f"class probabilities; a {spec.model} model has none")
    for member in members:
        member.to(device)
    images = image_files(images_dir)
    if not images:
        raise DataError(f"{images_dir}: no .png/.jpg/.nii.gz images")
    if adapt:
        adapt_members(members, task, images, patch, device, model_path, spacing)
    precision = site_precision(amp, device, predict=True)
    averaged = task.dense_logits and (len(members) > 1 or uncertainty or pre_annotate)
    test_flips = trained_flips if averaged and len(members) == 1 else ()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for path in images:
        start = time.perf_counter()
        image = image_transforms(path)(str(path))
        if image.ndim != spec.spatial_dims + 1:
            raise DataError(f"{path}: has shape {tuple(image.shape)}, the model is {spec.spatial_dims}D")
        # on the run's grid for the network; the prediction comes back onto the image's own
        network_image, like = (resampled(image, spacing), image) if spacing else (image, None)
        with precision.autocast():
            if averaged:
                probs = task.probabilities(members, network_image, patch, device, flips=test_flips, like=like).float()
            else:
                labels = task.infer(model, network_image, patch, device, like=like).labels
        score = entropy = None
        if averaged:
            labels = probs.argmax(dim=0)
            entropy = -(probs * probs.clamp_min(1e-8).log()).sum(dim=0)
            score = float(entropy.sum() / ((labels > 0).sum() + 1))
        pred = labels.numpy().astype(task.label_dtype)
        stem = path.name.split(".")[0]
        target = _write_map(path, pred, out_dir, stem)
        if uncertainty and entropy is not None:
            scaled = entropy.numpy().astype(np.float32)
            if not path.name.lower().endswith(NIFTI_SUFFIXES):  # 8-bit PNG: 255 = log(classes)
                scaled = (scaled / math.log(probs.shape[0]) * 255).clip(0, 255).astype(np.uint8)
            _write_map(path, scaled, out_dir, f"{stem}_uncertainty")
        if overlay:
            picture = overlay_image(image.numpy(), pred)
            scale = max(1, OVERLAY_MIN_EDGE // max(picture.shape[:2]))  # small slices: whole pixels, enlarged
            picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
            Image.fromarray(picture).save(out_dir / f"{stem}_overlay.png")
        done.append(Predicted(path, target, time.perf_counter() - start, score))
    if pre_annotate:
        write_pre_annotations(done, out_dir)
    return done


def _load(path: str | Path, state_dir: str | Path | None) -> SavedModel:
    """A fedseg model file (.pt with the site's local layers), or one ``fedseg export`` wrote."""
    if str(path).endswith(".onnx"):
        if state_dir:
            log.info("%s holds the local layers it was exported with; --state-dir is not read", path)
        return exported_model(path)
    return saved_model(path, state_dir)


def adapt_members(members: list[torch.nn.Module], task, images: list[Path], patch: tuple[int, ...], device: str,
                  model_path: str | Path, spacing: tuple[float, ...] = ()) -> None:
    """Test-time adaptation of every model to (up to ``ADAPT_IMAGES`` of) the folder's images, on
    the run's grid (``spacing``)."""
    chosen = images[:: max(1, -(-len(images) // ADAPT_IMAGES))]
    pixels = [resampled(image_transforms(path)(str(path)), spacing) for path in chosen]
    for member in members:
        if not adapt_to_site(member, task, pixels, patch_size=patch, seed=0, device=device):
            raise DataError(f"{model_path}: --adapt does not apply to this model (no BatchNorm statistics "
                            f"and no per-pixel class probabilities)")
        member.eval()


def write_pre_annotations(done: list[Predicted], out_dir: Path) -> Path:
    """``pre_annotations.json``: a dataset.json fragment of the predicted labels, most uncertain
    first. Once an annotator has corrected a label and the site has added it to its own
    dataset.json (``training``), the next round trains on it."""
    ordered = sorted(done, key=lambda d: -(d.uncertainty or 0.0))
    path = out_dir / PRE_ANNOTATIONS
    atomic_write_json(path, {
        "description": "fedseg pre-annotations, most uncertain first: correct these labels, then "
                       "add the pairs to the site's dataset.json 'training' list",
        "training": [{"image": str(d.image.resolve()), "label": str(d.labels.resolve()),
                      "uncertainty": d.uncertainty} for d in ordered]})
    return path


def _write_map(source: Path, values: np.ndarray, out_dir: Path, stem: str) -> Path:
    """NIfTI with the source image's affine, or PNG for 2D images."""
    if source.name.lower().endswith(NIFTI_SUFFIXES):
        target = out_dir / f"{stem}.nii.gz"
        nib.save(nib.Nifti1Image(values, nib.load(source).affine), target)
    else:
        target = out_dir / f"{stem}.png"
        Image.fromarray(values).save(target)
    return target


# the colour of label (or instance) k is PALETTE[(k - 1) % len(PALETTE)]
PALETTE = np.array([[0.9, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.3, 0.95], [0.95, 0.8, 0.1],
                    [0.8, 0.1, 0.8], [0.1, 0.85, 0.85]])


def overlay_image(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """RGB uint8: the image (channel-first, z-scored; a volume's middle slice) in grey or its own
    colours, each label (class or instance) tinted in a distinct colour at 45% opacity."""
    if labels.ndim == 3:
        middle = labels.shape[-1] // 2
        image, labels = image[..., middle], labels[..., middle]
    shown = image[:3].transpose(1, 2, 0) if image.shape[0] >= 3 else np.repeat(image[:1].transpose(1, 2, 0), 3, -1)
    low, high = shown.min(axis=(0, 1)), shown.max(axis=(0, 1))
    rgb = (shown - low) / (high - low + 1e-6)
    for value in np.unique(labels[labels > 0]):
        mask = labels == value
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * PALETTE[(int(value) - 1) % len(PALETTE)]
    return (rgb * 255).clip(0, 255).astype(np.uint8)
