"""``fedseg ingest DICOM_DIR SITE_DIR``: a folder of DICOM studies (CT or MR series, labels as
DICOM SEG or a NIfTI mask in a series' folder) becomes a site folder in fedseg's contract.

pydicom reads the files; highdicom builds each series' volume (sorting, spacing and orientation
checked, the modality's rescale applied) and maps each SEG onto its image grid; nibabel writes
NIfTI. Every case gets a new opaque id: no file name, dataset.json entry or NIfTI header holds a
patient identifier. The mapping from case ids to the DICOM UIDs goes to a file outside the site
folder that the hospital keeps and fedseg never reads. A series that cannot be used (a localizer,
no pixel data, uneven or missing slices, mixed geometry, another modality) is listed with the
reason, and the rest is ingested.
"""

from __future__ import annotations

import csv
import logging
import os
import secrets
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fedseg.common.atomic import atomic_write_json
from fedseg.common.data import DataError

log = logging.getLogger(__name__)

MODALITIES = {"CT": "CT", "MR": "MRI"}  # DICOM Modality -> dataset.json modality
INSTALL = "pip install 'fedseg[dicom]' (pydicom, highdicom)"
CASE_ID_LETTERS = "bcdfghjkmnpqrstvwxz"  # no digits (never a date or a record number), no vowels (no words)
ATOL_MM = 1e-3  # how far a NIfTI voxel centre may sit from its DICOM slice's position


@dataclass
class Ingested:
    """What an ingest did: the cases written and every series left out, with its reason."""

    site_dir: Path
    mapping: Path
    cases: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def ingest(dicom_dir: str | Path, site_dir: str | Path, mapping: str | Path | None = None) -> Ingested:
    """Turn ``dicom_dir`` into the site folder ``site_dir`` (written whole, or not at all).

    Args:
        mapping: where the case id -> DICOM UID table goes (default: ``<site_dir>-dicom-ids.csv``
            beside the site folder); it stays with the hospital.

    Raises:
        DataError: the packages are missing, ``site_dir`` exists, or no series can be used.
    """
    pydicom, hd = dicom_packages()
    source, target = Path(dicom_dir), Path(site_dir)
    mapping = Path(mapping) if mapping else target.with_name(target.name + "-dicom-ids.csv")
    if target.exists():
        raise DataError(f"{target}: exists; ingest writes a new site folder")
    if mapping.resolve().is_relative_to(target.resolve()):
        raise DataError(f"{mapping}: the id mapping must stay outside the site folder")
    series, segs, skipped = scan_dicom(pydicom, source)
    out = Ingested(target, mapping, skipped=skipped)
    staged = target.with_name(target.name + ".partial")
    shutil.rmtree(staged, ignore_errors=True)
    (staged / "images").mkdir(parents=True)
    (staged / "labels").mkdir()
    rows, training, test, modalities, label_names = [], [], [], set(), None
    for uid, datasets in sorted(series.items()):
        first = datasets[0]
        where = f"series {uid} ({_folder(datasets, source)})"
        try:
            volume, image = read_series(hd, datasets)
        except DataError as err:
            out.skipped.append(f"{where}: {err}")
            continue
        try:
            labels, names = _labels(hd, volume, image, segs.get(uid, []), datasets, source)
        except DataError as err:
            out.skipped.append(f"{where}: {err}")
            continue
        if labels is not None and label_names is not None and names != label_names:
            out.skipped.append(f"{where}: its segments {names} differ from the other cases' {label_names}")
            continue
        case = "case-" + "".join(secrets.choice(CASE_ID_LETTERS) for _ in range(8))
        nib.save(image, staged / "images" / f"{case}.nii.gz")
        if labels is not None:
            label_names = names
            nib.save(labels, staged / "labels" / f"{case}.nii.gz")
            training.append({"image": f"images/{case}.nii.gz", "label": f"labels/{case}.nii.gz"})
        else:
            test.append(f"images/{case}.nii.gz")
        modalities.add(MODALITIES[first.Modality])
        rows.append({"case": case, "study_uid": str(first.StudyInstanceUID), "series_uid": uid,
                     "patient_id": str(first.get("PatientID", "")), "folder": _folder(datasets, source)})
        out.cases.append(case)
    if not rows:
        shutil.rmtree(staged)
        raise DataError(f"{source}: no usable CT or MR series\n  " + "\n  ".join(out.skipped or ["no DICOM files"]))
    if len(modalities) > 1:
        shutil.rmtree(staged)
        raise DataError(f"{source}: holds both CT and MR series; ingest each modality into a site folder of its own")
    names = label_names or []
    atomic_write_json(staged / "dataset.json", {
        "name": target.name, "description": "ingested from DICOM by fedseg", "modality": modalities.pop(),
        "spatial_dims": 3, "task": "semantic", "labels": {"0": "background", **{str(i): n for i, n in
                                                                              enumerate(names, start=1)}},
        "training": training, "test": test})
    _write_mapping(mapping, rows)
    staged.rename(target)
    return out


def dicom_packages() -> tuple[Any, Any]:
    try:
        import highdicom
        import pydicom
    except ImportError as err:
        raise DataError(f"reading DICOM needs {INSTALL} ({err})") from None
    return pydicom, highdicom


def scan_dicom(pydicom: Any, source: Path) -> tuple[dict[str, list[Any]], dict[str, list[Any]], list[str]]:
    """(image series UID -> its datasets, referenced series UID -> SEG datasets, what was left out)."""
    if not source.is_dir():
        raise DataError(f"{source}: not a folder")
    series: dict[str, list[Any]] = defaultdict(list)
    segs: dict[str, list[Any]] = defaultdict(list)
    skipped = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        if path.name.lower().endswith((".nii", ".nii.gz")):
            continue  # a mask beside a series: read with its series
        try:
            ds = pydicom.dcmread(path, defer_size="1 KB")
        except pydicom.errors.InvalidDicomError:
            continue  # not DICOM (a README, a DICOMDIR's neighbours)
        except (OSError, ValueError) as err:
            skipped.append(f"{path}: unreadable ({err})")
            continue
        ds.filename = str(path)
        modality = ds.get("Modality", "")
        if modality == "SEG":
            refs = ds.get("ReferencedSeriesSequence") or []
            if not refs:
                skipped.append(f"{path}: a SEG that references no series")
            for ref in refs:
                segs[str(ref.SeriesInstanceUID)].append(ds)
        elif modality in MODALITIES:
            series[str(ds.SeriesInstanceUID)].append(ds)
        elif "SeriesInstanceUID" in ds and str(ds.SeriesInstanceUID) not in series:
            skipped.append(f"{path}: modality {modality or 'unknown'} (fedseg ingests CT and MR)")
    unmatched = sorted(set(segs) - set(series))
    skipped += [f"{s.filename}: a SEG of series {uid}, which is not in {source}" for uid in unmatched for s in segs[uid]]
    return dict(series), dict(segs), skipped


def read_series(hd: Any, datasets: list[Any]) -> tuple[Any, nib.Nifti1Image]:
    """A CT/MR series as a highdicom volume and as NIfTI on the same grid.

    Raises:
        DataError: why the series cannot be used.
    """
    if (why := unusable(datasets[0], datasets)) is not None:
        raise DataError(why)
    try:
        volume = hd.get_volume_from_series(datasets, dtype=np.float32)
    except (ValueError, RuntimeError, AttributeError, TypeError) as err:
        raise DataError(f"its slices do not form one volume (a slice missing, uneven spacing, or another series' "
                        f"slices mixed in): {err}") from None
    image = volume_nifti(volume)
    if (why := _geometry_problem(image, datasets)) is not None:
        raise DataError(why)
    return volume, image


def unusable(first: Any, datasets: list[Any]) -> str | None:
    if any("LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])] for ds in datasets):
        return "a localizer"
    if any("PixelData" not in ds for ds in datasets):
        return "a file without pixel data"
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        return "multi-frame images (enhanced CT/MR) are not ingested; export the series as single frames"
    try:
        first.pixel_array
    except Exception as err:  # noqa: BLE001 - pydicom's decoders raise many kinds; each means "cannot read"
        syntax = first.file_meta.TransferSyntaxUID.name if "TransferSyntaxUID" in first.file_meta else "unknown"
        return f"its pixel data cannot be decoded here (transfer syntax {syntax}): {str(err).splitlines()[0]}"
    return None


def volume_nifti(volume: Any) -> nib.Nifti1Image:
    """The volume as NIfTI (highdicom turns DICOM's LPS into NIfTI's RAS) with its axes in the
    closest RAS order, as other sites' NIfTI files usually are, without any header text."""
    image = nib.as_closest_canonical(volume.to_nibabel())
    return _clean(nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), image.affine))


def _clean(image: nib.Nifti1Image) -> nib.Nifti1Image:
    for key in ("descrip", "aux_file", "intent_name", "db_name"):
        if key in image.header:
            image.header[key] = b""
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    return image


def _geometry_problem(image: nib.Nifti1Image, datasets: list[Any]) -> str | None:
    """Every DICOM slice's first pixel must be a voxel centre of the NIfTI volume."""
    inverse = np.linalg.inv(image.affine)
    for ds in datasets:
        lps = np.array([float(v) for v in ds.ImagePositionPatient])
        ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
        index = inverse @ ras
        corner = image.affine @ np.round(index)
        if np.abs(corner[:3] - ras[:3]).max() > ATOL_MM:
            return f"the slice in {Path(ds.filename).name} is not on the volume's grid"
    return None


def _labels(hd: Any, volume: Any, image: nib.Nifti1Image, segs: list[Any], datasets: list[Any], source: Path
            ) -> tuple[nib.Nifti1Image | None, list[str] | None]:
    """The label map on the image's grid (NIfTI) and the segments' names, from the series' SEG
    (or a NIfTI mask in the series' folder); (None, None) when it has neither."""
    if len(segs) > 1:
        raise DataError(f"{len(segs)} SEG objects reference it; keep one")
    if segs:
        seg = hd.seg.segread(segs[0].filename)
        names = [seg.get_segment_description(n).segment_label for n in seg.segment_numbers]
        try:
            mask = seg.get_volume(combine_segments=True, relabel=True).match_geometry(volume)
        except (ValueError, RuntimeError) as err:
            raise DataError(f"its SEG {Path(segs[0].filename).name} does not fit the image grid ({err})") from None
        labels = nib.as_closest_canonical(mask.to_nibabel())
        values = np.asarray(labels.dataobj)
        if labels.shape != image.shape or not np.allclose(labels.affine, image.affine, atol=ATOL_MM):
            raise DataError(f"its SEG {Path(segs[0].filename).name} does not land on the image grid")
    else:
        masks = sorted({p for ds in datasets for p in Path(ds.filename).parent.glob("*.nii*")})
        if not masks:
            return None, None
        if len(masks) > 1:
            raise DataError(f"{len(masks)} NIfTI masks beside it; keep one")
        labels = nib.as_closest_canonical(nib.load(masks[0]))
        if labels.shape != image.shape or not np.allclose(labels.affine, image.affine, atol=ATOL_MM):
            raise DataError(f"{masks[0].relative_to(source)}: its shape {labels.shape} or affine differs "
                            f"from the image's {image.shape}")
        values = np.asarray(labels.dataobj)
        if not np.array_equal(values, np.round(values)) or values.min() < 0:
            raise DataError(f"{masks[0].relative_to(source)}: not an integer label map")
        names = [f"label-{i}" for i in range(1, int(values.max()) + 1)]
    return _clean(nib.Nifti1Image(values.astype(np.uint8), image.affine)), names


def _folder(datasets: list[Any], source: Path) -> str:
    return str(Path(datasets[0].filename).parent.relative_to(source))


def _write_mapping(path: Path, rows: list[dict[str, str]]) -> None:
    """The case id -> DICOM UID table, readable by its owner only (it identifies patients)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(path.name + ".partial")
    with open(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    staged.replace(path)
