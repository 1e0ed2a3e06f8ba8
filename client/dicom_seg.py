"""``fedseg predict DICOM_DIR OUT_DIR --format dicom-seg``: segment each CT/MR series of a DICOM
folder and write one DICOM SEG per series (highdicom), referencing its source images, one
segment per label with its name, so the hospital's viewer overlays it on the study.

Each series is read as ``fedseg ingest`` reads it and predicted as ``fedseg predict`` predicts a
NIfTI image; the mask goes back onto the series' own frames by its geometry."""

from __future__ import annotations

import tempfile
from importlib.metadata import version
from pathlib import Path

import nibabel as nib
import numpy as np

from fedseg.client.dicom_ingest import dicom_packages, read_series, scan_dicom
from fedseg.client.predict import Predicted, predict_folder
from fedseg.common.data import DataError


def predict_dicom(model_path: str | Path, state_dir: str | Path | None, dicom_dir: str | Path,
                  out_dir: str | Path, device: str = "cpu", amp: str = "auto",
                  label_names: list[str] | None = None) -> tuple[list[Predicted], list[str]]:
    """Write ``OUT_DIR/<SeriesInstanceUID>.seg.dcm`` for every usable series of ``dicom_dir``.

    Returns:
        (what was written, one per series; the series left out, each with its reason).

    Raises:
        DataError: no usable series, or label names that do not match the model's classes.
    """
    pydicom, hd = dicom_packages()
    classes = _classes(model_path)
    names = label_names or [f"label-{i}" for i in range(1, classes)]
    if len(names) != classes - 1:
        raise DataError(f"{len(names)} label name(s) given; the model predicts {classes - 1} foreground class(es)")
    source, out = Path(dicom_dir), Path(out_dir)
    series, _, skipped = scan_dicom(pydicom, source)
    done: list[Predicted] = []
    with tempfile.TemporaryDirectory(prefix="fedseg-dicom-") as tmp:
        images, masks = Path(tmp) / "images", Path(tmp) / "masks"
        images.mkdir()
        read = {}
        for n, (uid, datasets) in enumerate(sorted(series.items())):
            try:
                volume, image = read_series(hd, datasets)
            except DataError as err:
                skipped.append(f"series {uid}: {err}")
                continue
            nib.save(image, images / f"series-{n}.nii.gz")
            read[f"series-{n}"] = (uid, datasets, volume)
        if not read:
            raise DataError(f"{source}: no usable CT or MR series\n  " + "\n  ".join(skipped or ["no DICOM files"]))
        predicted = predict_folder(model_path, state_dir, images, masks, device, amp=amp)
        out.mkdir(parents=True, exist_ok=True)
        for case in predicted:
            uid, datasets, volume = read[case.image.name.split(".")[0]]
            mask = hd.Volume.from_nibabel(nib.load(case.labels)).match_geometry(volume)
            seg = _segmentation(hd, datasets, mask.astype(np.uint8), names)
            target = out / f"{uid}.seg.dcm"
            staged = target.with_name(target.name + ".partial")
            seg.save_as(staged)
            staged.replace(target)
            done.append(Predicted(Path(datasets[0].filename).parent, target, case.seconds))
    return done, skipped


def _classes(model_path: str | Path) -> int:
    """The classes (background included) the model predicts."""
    import torch

    from fedseg.common.model_kinds import ModelSpec

    if str(model_path).endswith(".onnx"):
        from fedseg.client.export import exported_model

        return exported_model(model_path).spec.out_channels
    return ModelSpec.from_dict(torch.load(model_path, map_location="cpu", weights_only=True)["model"]).out_channels


def _segmentation(hd, datasets, mask, names: list[str]):
    """A binary DICOM SEG of ``mask`` (a label map on the series' grid) over ``datasets``."""
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    algorithm = hd.AlgorithmIdentificationSequence(
        name="fedseg", version=version("fedseg"), family=codes.cid7162.ArtificialIntelligence)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i, segment_label=name, segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for i, name in enumerate(names, start=1)]
    return hd.seg.Segmentation(
        source_images=datasets, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=9901,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="fedseg",
        manufacturer_model_name="fedseg U-Net", software_versions=version("fedseg"), device_serial_number="none",
        series_description="fedseg segmentation", omit_empty_frames=False)
