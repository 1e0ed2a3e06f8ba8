"""DICOM as a hospital's PACS exports it, built for tests from NIfTI volumes: a single-frame MR or
CT series per volume (pydicom) and a DICOM SEG of its label map (highdicom)."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SOP_CLASSES = {"MR": "1.2.840.10008.5.1.4.1.1.4", "CT": "1.2.840.10008.5.1.4.1.1.2"}
PATIENT = ("DOE^JANE", "MRN-0042-7")  # what must never reach a site folder


def write_series(folder: Path, volume: np.ndarray, spacing: tuple[float, float, float], modality: str = "MR",
                 localizer: bool = False) -> list[FileDataset]:
    """``volume[x, y, z]`` as one file per slice z in ``folder``: rows run along y, columns
    along x, slice z at z * spacing[2] mm (axial, LPS)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    datasets = []
    for z in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"IM{z:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientName, ds.PatientID = modality, PATIENT[0], PATIENT[1]
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "19550101", "F", "20260101", "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID, ds.Manufacturer = "A1", "", "1", "fedseg-tests"
        ds.SeriesNumber, ds.InstanceNumber = 1, z + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER" if localizer else "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, z * spacing[2]]
        ds.PixelSpacing, ds.SliceThickness = [spacing[1], spacing[0]], spacing[2]
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.ascontiguousarray(volume[:, :, z].T.astype(np.int16)).tobytes()
        ds.save_as(path, enforce_file_format=True)
        datasets.append(ds)
    return datasets


def write_seg(path: Path, source: list[FileDataset], labels: np.ndarray, names: list[str]) -> None:
    """``labels[x, y, z]`` (0 background, 1..K) as a DICOM SEG of ``source``, one segment per name."""
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i, segment_label=name, segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for i, name in enumerate(names, start=1)]
    frames = np.stack([labels[:, :, z].T for z in range(labels.shape[2])]).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=source, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=2,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="fedseg-tests",
        manufacturer_model_name="tests", software_versions="1", device_serial_number="1")
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
