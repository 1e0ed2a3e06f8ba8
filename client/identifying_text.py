"""The identifying-text scan of a site folder (``fedseg check``) and the case file names the
site's redaction keeps out of every reply: file names that look like a patient's, text embedded
in NIfTI headers and PNG/JPEG chunks."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
from PIL import Image

from fedseg.common.data import NIFTI_SUFFIXES, parse_dataset_json


def case_files(site_dir: str | Path) -> list[str]:
    """File names of every image and label a site folder holds (dataset.json's entries and what
    lies in images/ and labels/), sorted: what must never leave the site."""
    site_dir = Path(site_dir)
    names = {p.name for sub in ("images", "labels", "imagesTr", "labelsTr", "imagesTs")
             if (site_dir / sub).is_dir() for p in (site_dir / sub).iterdir()}
    spec, _ = parse_dataset_json(site_dir)
    if spec is not None:
        names |= {Path(p).name for case in spec.training + spec.test for p in (case.image, case.label)}
    return sorted(names)


IDENTIFYING_NAME = re.compile(
    r"(19|20)\d{2}[-_.]?(0[1-9]|1[0-2])[-_.]?(0[1-9]|[12]\d|3[01])"  # a date: 19550101, 2021-03-04
    r"|\d{7,}"  # a record or accession number
    r"|\^"  # a DICOM person name (LAST^FIRST)
    r"|patient|mrn|dob|birth", re.IGNORECASE)
NIFTI_TEXT_FIELDS = ("descrip", "aux_file", "intent_name", "db_name")
TRIVIAL_TEXT = re.compile(r"none|[\d.]+|[\d.]+ ?mm", re.IGNORECASE)  # "none", a software version


def identifying_text(site_dir: str | Path) -> list[str]:
    """Text in a site's files that may identify a patient: dates, record numbers or DICOM names
    in file names, NIfTI header text fields, PNG text chunks. It stays at the site (fedseg never
    sends it), but a hospital should know it is there; ``fedseg check --strict`` fails on it."""
    found = [f"{name}: file name looks like it holds a date, record number or patient name"
             for name in case_files(site_dir) if IDENTIFYING_NAME.search(name)]
    spec, _ = parse_dataset_json(Path(site_dir))
    embedded: dict[str, list[Path]] = {}
    for case in (spec.training + spec.test) if spec else ():
        for path in (case.image, case.label):
            for what in _embedded_text(path):
                embedded.setdefault(what, []).append(path)
    for what, paths in embedded.items():  # one line per distinct text, not one per file
        more = f" (and {len(paths) - 1} more file(s))" if len(paths) > 1 else ""
        found.append(f"{paths[0]}: {what}{more}")
    return found


def _embedded_text(path: Path) -> list[str]:
    try:
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            header = nib.load(path).header
            values = {f: header[f].item() for f in NIFTI_TEXT_FIELDS if f in header}
            texts = {f: v.decode(errors="replace").strip("\x00 ") for f, v in values.items()
                     if isinstance(v, bytes)}
            return [f"NIfTI header {f} = {t!r}" for f, t in texts.items()
                    if t and not TRIVIAL_TEXT.fullmatch(t)]
        with Image.open(path) as image:
            return [f"PNG/JPEG text chunk {k!r}" for k, v in image.info.items() if isinstance(v, str) and v.strip()]
    except Exception:  # noqa: BLE001 - unreadable files are check_site's to report
        return []
