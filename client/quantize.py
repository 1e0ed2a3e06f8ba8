"""``fedseg export --quantize int8``: an int8 ONNX model for fast inference on a CPU, by ONNX
Runtime's static quantization (QDQ: per-channel int8 weights, uint8 activations) calibrated on
the site's own unlabeled images, cropped into patches as ``fedseg predict``'s sliding windows see
them. It is written only when its labels agree with the float model's on those patches."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedseg.common.data import DataError, image_files
from fedseg.common.transforms import PatchSize, image_transforms, resampled, roi_size

CALIBRATION_PATCHES = 32  # patches the activation ranges are calibrated on
MIN_LABEL_AGREEMENT = 0.98  # of calibration voxels whose int8 label is the float model's


def calibration_patches(images_dir: str | Path, in_channels: int, patch: PatchSize, spatial_dims: int,
                        count: int = CALIBRATION_PATCHES, seed: int = 0,
                        spacing: tuple[float, ...] = ()) -> np.ndarray:
    """``count`` random patches (N, C, *patch) of the folder's images, loaded, z-scored and
    resampled to the run's ``spacing`` as ``fedseg predict`` loads them (smaller images are
    zero-padded).

    Raises:
        DataError: no image in the folder, or images of another shape than the model takes.
    """
    folder = Path(images_dir)
    paths = image_files(folder) if folder.is_dir() else []
    if not paths:
        raise DataError(f"{folder}: no .png/.nii.gz images to calibrate the int8 model on")
    rng = np.random.default_rng(seed)
    patches = []
    for i in range(count):
        path = paths[i % len(paths)]
        image = resampled(image_transforms(path)(str(path)), spacing).as_subclass(torch.Tensor)
        if image.ndim != spatial_dims + 1 or image.shape[0] != in_channels:
            raise DataError(f"{path}: shape {tuple(image.shape)}; the model takes {in_channels} channel(s) in "
                            f"{spatial_dims}D")
        roi = roi_size(patch, spatial_dims)
        pad = [p for size, edge in zip(reversed(image.shape[1:]), reversed(roi)) for p in (0, max(0, edge - size))]
        image = torch.nn.functional.pad(image, pad)
        starts = [int(rng.integers(0, size - edge + 1)) for size, edge in zip(image.shape[1:], roi)]
        patches.append(image[(slice(None), *(slice(s, s + e) for s, e in zip(starts, roi)))].numpy())
    return np.stack(patches).astype(np.float32)


def quantize_int8(float_onnx: Path, output: Path, patches: np.ndarray) -> dict[str, Any]:
    """Write ``output``, ``float_onnx`` quantized to int8 with activation ranges calibrated on
    ``patches``.

    Returns:
        What the check found: the share of patch voxels whose label the int8 model keeps.

    Raises:
        RuntimeError: the int8 model changes more labels than ``MIN_LABEL_AGREEMENT`` allows
            (nothing written).
    """
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    class Patches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": patches[i:i + 1]} for i in range(len(patches))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    staged = output.with_name(output.name + ".partial")
    logging.disable(logging.WARNING)  # the quantizer warns on every 1-D norm weight it leaves per-tensor
    try:
        with tempfile.TemporaryDirectory(prefix="fedseg-int8-") as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(str(float_onnx), str(prepared))  # shape inference and graph clean-up first
            # 7-bit weights: ONNX Runtime's u8s8 kernels on CPUs without VNNI (AVX2, plain AVX-512) saturate
            # with full-range per-channel weights, and an export runs on whatever CPU a hospital has
            quantize_static(str(prepared), str(staged), Patches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True)
    finally:
        logging.disable(logging.NOTSET)
    run = {name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
           for name, path in (("float", float_onnx), ("int8", staged))}
    labels = {name: session.run(None, {"image": patches})[0].argmax(1) for name, session in run.items()}
    agreement = float((labels["float"] == labels["int8"]).mean())
    if agreement < MIN_LABEL_AGREEMENT:
        staged.unlink()
        raise RuntimeError(f"the int8 model keeps the float model's label on {agreement:.1%} of the calibration "
                           f"voxels (at least {MIN_LABEL_AGREEMENT:.0%} needed); nothing written: use the float "
                           "export, or --amp bf16 with fedseg predict")
    staged.replace(output)
    return {"format": "int8 (ONNX Runtime static quantization, QDQ, per-channel 7-bit weights)",
            "calibration_patches": len(patches), "label_agreement": agreement}
